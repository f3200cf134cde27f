"""What a sandbox session costs the machine as shipped, against the least the same shape can cost: one
supervisor for every session, each holder the init of its own namespaces.

Shipped (as root with cgroups), a session is one Python process forked from the sympy-loaded zygote: the
holder, the init of new pid, mount, IPC and network namespaces, which mounts its own view and drops its uid,
supervised by a thread of the shared supervisor (`supervisor.CgroupSupervisor`) through its cgroups; before
issue 27 it was two (S, the init, and the holder S forked). The other is that shape stripped to its kernel
work, with the sandbox's own functions (`jail`, `budgets`, `syscalls`): the zygote's process forks the holder
into the namespaces, the holder mounts the same read-only template, tmpfs, /proc and devpts, drops its uid and
installs the system-call filter, and this process ends each cell as the supervisor does (the holder idle in
its receive, SIGSTOP, every other process of the session's cgroup killed, the cgroup's CPU read). It is not
the sandbox: no caller socket, output memfd, replay, thread stop or ready report, no client. What is left
between the two is the sandbox's own Python and its protocol.

Both run the same sequence: N sessions one after another, two trivial cells each, then the session ends. The
machine's CPU time per session (`executor.machine_cpu_seconds`: /proc/stat, every core, kernel threads
included), the two run alternately. As root only (the shape's namespaces are made without a user namespace).

    .venv/bin/python benchmarks/session_shape.py [--sessions 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mathagent.sandbox import Cell, Sandbox, syscalls, zygote  # noqa: E402
from mathagent.sandbox.jail import (  # noqa: E402
    CLONE_NEWPID,
    UidPool,
    _unshare,
    drop_privileges,
    enter_namespaces,
    isolate,
    keep_only_fds,
    kill,
    read_only_template,
    setns,
)
from mathagent.sandbox.supervisor import _RECV_CALLS  # noqa: E402

from benchmarks.executor import machine_cpu_seconds  # noqa: E402

CELLS = ("x = 1", "print(x + 1)")
# The system call an idle holder is blocked in, as the supervisor reads it (None: an architecture without it).
RECVFROM = _RECV_CALLS.get(platform.machine())


class OneSupervisor:
    """This process as the zygote and the supervisor of the other shape."""

    def __init__(self):
        zygote.preload()
        self.config = {"network": False, "max_file_mb": 16, "memory_mb": 2048, "max_processes": 64, "cgroup": True,
                       "cpus": 1, "zygote": os.getpid()}  # fmt: skip
        self.filter, _ = syscalls.syscall_filter()
        self.template, self.config["read_only_template"] = read_only_template()
        self.hierarchies = [(h, os.open(h[0], os.O_RDONLY | os.O_DIRECTORY)) for h in zygote._hierarchies(self.config, cpu_time=False)]
        self.own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
        self.uids = UidPool()

    def session(self, n: int) -> None:
        cgroups, _ = zygote._session_cgroups(self.config, self.hierarchies, n)
        uid = self.uids.take()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _unshare(CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                self._holder(theirs, cgroups, uid)
            except BaseException:
                import traceback

                traceback.print_exc()
            os._exit(1)
        setns(self.own_pid_namespace, CLONE_NEWPID)
        theirs.close()
        for cgroup in cgroups:
            cgroup.close_files()
        directories = [os.path.join(hierarchy[0], cgroup.name)
                       for (hierarchy, _), cgroup in zip(self.hierarchies, cgroups)]  # fmt: skip
        cpu_files = [os.path.join(d, name) for d in directories for name in ("cpu.stat", "cpuacct.usage")
                     if os.path.exists(os.path.join(d, name))]  # fmt: skip
        for code in CELLS:
            kill(pid, signal.SIGCONT)
            mine.send(code.encode())
            json.loads(mine.recv(1 << 16))
            while not self._idle(pid):
                time.sleep(0.0001)
            kill(pid, signal.SIGSTOP)
            for directory in directories:  # every other process of the session
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    for other in f.read().split():
                        if int(other) != pid:
                            kill(int(other))
            for path in cpu_files:  # and its CPU time
                with open(path) as f:
                    f.read()
        kill(pid, signal.SIGCONT)
        mine.close()  # the holder exits at EOF, and its namespaces with it
        os.waitpid(pid, 0)
        for cgroup in cgroups:
            cgroup.remove()

    def _holder(self, sock: socket.socket, cgroups: list, uid: int) -> None:
        keep_only_fds({0, 1, 2, self.template, sock.fileno(), *(fd for c in cgroups for fd in c.fds())})
        namespaces = CLONE_NEWPID | enter_namespaces(False, exclude=CLONE_NEWPID, template=self.template)
        os.close(self.template)
        report, _ = isolate(self.config, uid, namespaces, None)
        for cgroup in cgroups:
            cgroup.join()
        keep_only_fds({0, 1, 2, sock.fileno()})
        drop_privileges(self.config, uid, report)
        if self.filter is not None:
            syscalls.install_syscall_filter(self.filter)
        namespace: dict = {"__name__": "__main__"}
        devnull = open(os.devnull, "w")
        sys.stdout = devnull
        while code := sock.recv(1 << 20):
            try:
                exec(code.decode(), namespace)
                status = "ok"
            except Exception:  # noqa: BLE001 - a cell may raise anything
                status = "error"
            sock.send(json.dumps({"status": status}).encode())
        os._exit(0)

    @staticmethod
    def _idle(pid: int) -> bool:
        if len(os.listdir(f"/proc/{pid}/task")) != 1:
            return False
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == RECVFROM


def run_shipped(sandbox: Sandbox, n: int) -> None:
    """Session `n` of the shipped sandbox: its cells one after another, then forgotten."""
    name = f"s{n}"
    history: tuple[str, ...] = ()
    for code in CELLS:
        sandbox.run([Cell(session=name, history=history, code=code)])
        history += (code,)
    sandbox.forget(name)


def machine_ms_per_session(session, numbers: range) -> float:
    """The machine's CPU time per session of `session(n)` for each of `numbers`, the last exits included."""
    start = machine_cpu_seconds()
    for n in numbers:
        session(n)
    time.sleep(0.3)  # the last sessions' exits
    return (machine_cpu_seconds() - start) / len(numbers) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    why = "not root (the other shape's namespaces)" if os.geteuid() != 0 else (
        None if RECVFROM else f"no system-call number for recvfrom on {platform.machine()}")
    if why:
        print(f"session_shape: skipped, {why}", file=sys.stderr)
        print(json.dumps({"benchmark": "session_shape", "skipped": why}))
        return
    shape = OneSupervisor()
    shipped, other = [], []
    with Sandbox(workers=1) as sandbox:
        sandbox.run([Cell(session="warm", history=(), code="x = 1")])
        sandbox.forget("warm")
        for round_ in range(args.rounds):
            numbers = range(round_ * args.sessions, (round_ + 1) * args.sessions)
            shipped.append(round(machine_ms_per_session(lambda n: run_shipped(sandbox, n), numbers), 2))
            other.append(round(machine_ms_per_session(shape.session, numbers), 2))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"machine CPU ms per session ({args.sessions} sessions of {len(CELLS)} cells, one at a time)")
    for column in ("round", "shipped", "its kernel work alone", "ratio"):
        table.add_column(column)
    for i, (a, b) in enumerate(zip(shipped, other)):
        table.add_row(str(i + 1), f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x")
    Console(stderr=True).print(table)
    print(json.dumps({"benchmark": "session_shape", "sessions": args.sessions, "shipped_ms": shipped,
                      "one_supervisor_ms": other,
                      "ratio": round(sum(shipped) / sum(other), 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
