"""Running model-written code: the executor that turns an action a_h into its observation o_h.

An action of the agent is text plus a ```python cell; the cell runs here and what it printed, plus the error
if any, is what the model observes. Cells of one trajectory share a Python namespace, like a notebook: names
defined in turn 1 are visible in turn 3, and a trailing bare expression is echoed (`x = 2\\nx+1` shows `3`).

    with Sandbox(timeout=10, memory_mb=2048) as sandbox:
        results = sandbox.run([Cell("traj-7", history=(), code="import sympy\\nsympy.sqrt(8)")])
        results[0].output  # '2*sqrt(2)'
        sandbox.forget("traj-7")

Model-written code is hostile, so it never runs in the caller's process. The processes:

    zygote Z (imports sympy, numpy once) --fork--> supervisor S, one per trajectory (through a launcher
    caller threads <------------- socket --------> S: root, pid 1 of its own pid,   where not root)
                                                   network and mount namespaces
              holder: the namespace, a uid of its own, runs the cells <--fork-- S

Cells run in the process that holds the trajectory's state (the "holder"), one after another, with no fork
per cell. When a cell finishes, S kills everything else in the trajectory's pid namespace: whatever the cell
started, daemons that double-forked and called setsid included. When the cell times out, its process dies or
it goes over its memory budget, S kills the holder with everything in the namespace, starts a new holder,
and the caller rebuilds the state by replaying the trajectory's earlier cells without the failed one
(`client`): the cell leaves no trace in the state (files it wrote stay). Cells that merely raise keep their
partial effects, as in a notebook. A session that is lost is rebuilt the same way.

Statuses of a CellResult:
    ok       the cell ran to its end
    error    it raised (SystemExit included); the traceback's last lines are in `output`
    memory   it raised MemoryError (its process hit the address-space cap), or the session went over its
             memory budget and the kernel (or the supervisor) stopped the cell or some of its processes;
             a cell stopped that way is undone like a killed one
    timeout  it ran longer than `timeout` seconds of wall or CPU time; its effects were undone
    killed   its process died (os._exit, a signal, a crash); its effects were undone

What a session is kept from, where the OS grants every mechanism (root on Linux; `Sandbox.isolation` reports
what was in force): other processes (a pid namespace: it sees and signals only its own), writing the machine's
files (every mount read-only; a private tmpfs for /tmp and /dev/shm, gone with the session), the network (a
namespace with no interface up), other sessions (a uid, IPC namespace and memory budget of its own), keeping
privileges (no capabilities, no_new_privs), and outliving its cell (S kills what a cell leaves running).

What it does not cover:
- the kernel: there is no seccomp filter, every system call is open to a cell, and a kernel bug is a way out;
- reading: mounts are read-only, not hidden, so a cell reads what the host's permissions let any user read;
- CPU: there is no CPU controller; a cell's processes may take every core until its deadline;
- a weaker fallback where the OS refuses a mechanism (a container without CAP_SYS_ADMIN, not root): without a
  network namespace an audit hook refuses Python's own sockets only (ctypes or a subprocess get past it),
  without a mount namespace the host's files are protected by their permissions alone (docs/sandbox.md);
- memory, at its edges: the polled budget (no writable memory cgroup) can be passed between two looks;
- replay: a state rebuilt after a failed cell or a lost session equals the one before only if its cells are
  deterministic (a random draw is not).

The modules, by process: `client` (the caller's: `Sandbox`, its sessions and their sockets), `supervisor`
(the zygote, the launchers, S), `jail` (namespaces, mounts, uid and rlimits, memory budgets), `cell` (the
holder and a cell's run in it), `__main__` (the zygote's program).
"""

from mathagent.sandbox.cell import STATUSES
from mathagent.sandbox.client import Cell, CellResult, Sandbox

__all__ = ["STATUSES", "Cell", "CellResult", "Sandbox"]
