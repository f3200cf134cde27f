"""Running model-written code: the executor that turns an action a_h into its observation o_h.

An action of the agent is text plus a ```python cell; the cell runs here and what it printed, plus the error
if any, is what the model observes. Cells of one trajectory share a Python namespace, like a notebook: names
defined in turn 1 are visible in turn 3, and a trailing bare expression is echoed (`x = 2\\nx+1` shows `3`).

    with Sandbox(timeout=10, memory_mb=2048) as sandbox:
        results = sandbox.run([Cell("traj-7", history=(), code="import sympy\\nsympy.sqrt(8)")])
        results[0].output  # '2*sqrt(2)'
        sandbox.forget("traj-7")

Model-written code is hostile, so it never runs in the caller's process. The processes, as root with
cgroups (the shared shape):

    supervisor (one, a thread per session) <--- socket ---> caller threads
      └─ zygote Z (imports sympy, numpy once) --fork--> holder, one per trajectory: pid 1 of its own pid,
                                                        mount, IPC and network namespaces, its own cgroups
                                                        and uid; runs the cells

and elsewhere (not root, no cgroups), a supervisor S per session, pid 1 of the session's namespaces, which
forks the holder (Z forks S through a launcher where a user namespace has to come first).

Cells run in the process that holds the trajectory's state (the "holder"), one after another, with no fork
per cell. So the holder's word on a cell is the cell's: the supervisor decides when a cell has ended, from
outside. It enforces the wall deadline and the session's CPU time itself, takes a result only once the holder
is idle (one thread, blocked receiving its next command), then stops the holder (SIGSTOP) and kills every
other process of the session (its cgroup's, or S's pid namespace's): whatever the cell started, daemons that
double-forked and called setsid
included. Between cells nothing of a session runs. When the cell times out, its process dies or it goes over
its memory budget, the supervisor kills the holder with everything in the namespace, starts a new holder, and the caller
rebuilds the state by replaying the trajectory's earlier cells without the failed one (`client`): the cell
leaves no trace in the state (files it wrote stay). Cells that merely raise keep their partial effects, as
in a notebook. A session that is lost is rebuilt the same way.

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
namespace with no interface up, and no socket families but unix and IP), the host's files through a
descriptor (each process of the chain closes every fd outside an allow-list), other sessions (a uid never
handed out twice on the machine, IPC namespace, devpts, memory budget and CPU quota of its own; no file
locks or kernel keys, which would outlive it or reach across), keeping privileges (no capabilities,
no_new_privs), and outliving or overrunning its cell (the supervisor ends it, however it reports itself).

What it does not cover:
- the kernel: the seccomp filter refuses socket families, keys, io_uring and file locks; every other system
  call is open to a cell, and a kernel bug is a way out;
- reading: mounts are read-only, not hidden, so a cell reads what the host's permissions let any user read,
  and connects to a host's unix socket whose file lets any user write (a read-only mount does not stop that);
- its own trajectory: a cell may rewrite the harness it runs in, so what later cells of the same trajectory
  report (their output, ok or error) is the model's to make up; their limits still hold;
- a weaker fallback where the OS refuses a mechanism (a container without CAP_SYS_ADMIN, not root): without a
  network namespace an audit hook refuses Python's own sockets only (ctypes or a subprocess get past it),
  without a mount namespace the host's files are protected by their permissions alone, without a cpu cgroup
  there is no quota (the supervisor still ends each cell at its CPU limit) (docs/sandbox.md);
- memory, at its edges: the polled budget (no writable memory cgroup) can be passed between two looks;
- replay: a state rebuilt after a failed cell or a lost session equals the one before only if its cells are
  deterministic (a random draw is not).

The modules, by process: `client` (the caller's: `Sandbox`, its sessions and their sockets), `zygote` (the
zygote and the launchers), `supervisor` (the supervisor in either shape), `cell` (the holder and a cell's run in it), `__main__` (the
zygote's program); and what they share: `protocol` (what they say to each other), `jail` (namespaces, mounts,
uids, privileges), `budgets` (the memory budget and CPU quota), `syscalls` (the seccomp filter).
"""

from mathagent.sandbox.client import Cell, CellResult, Sandbox
from mathagent.sandbox.protocol import STATUSES

__all__ = ["STATUSES", "Cell", "CellResult", "Sandbox"]
