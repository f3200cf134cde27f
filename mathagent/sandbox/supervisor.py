"""The trusted processes between the caller and the cells, none of which runs model code: the zygote, and
per session the supervisor S (the diagram is in the package's docstring), with a launcher between them where
we are not root.

The zygote is started by the caller (`client.Sandbox`) with `python -I` and an empty environment, imports
the math modules once and keeps `workers` sessions started ahead of need, more when the caller reserves
them. It makes each session's memory cgroup and forks S as the init of a new pid namespace (a launcher does
both where a user namespace has to come first): when S exits, every process of the trajectory is gone. S
enters its other namespaces (`jail`), mounts the session's file system, keeps the holder (`cell.Holder`,
replaced after a failed cell), hands each cell to it, enforces the deadline and the memory budget, kills what a cell
leaves behind, and answers the caller: one JSON reply per cell, after its length (FRAME), with a status of
`cell.STATUSES`.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

from mathagent.sandbox.cell import MAX_CODE_BYTES, STATUSES, Holder
from mathagent.sandbox.jail import (
    CLONE_NEWPID,
    PR_SET_PDEATHSIG,
    MemoryCgroup,
    PolledBudget,
    enter_namespaces,
    host_workdir,
    isolate,
    kill,
    memory_cgroup_parent,
    prctl,
    reap,
    remove_stale_cgroups,
    set_process_name,
    setns,
)

# Imported once in the zygote so that a cell does not pay for them (sympy alone takes ~0.5 s).
PRELOADED_MODULES = (
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "random",
    "statistics", "re", "json", "numpy", "sympy", "encodings.idna",
)  # fmt: skip
SESSION_UID_BASE = 1_000_000_000  # per-session uids are taken from here up; none of them has a passwd entry
GRACE_SECONDS = 1.0  # after `timeout`, how long a cell may take to unwind before its process is killed
FRAME = struct.Struct(">I")  # the length of each JSON message between the caller and S
_SO_SNDBUFFORCE = 32
_PF_EXITING = 0x4  # in /proc/PID/stat's flags: the process is in exit()


def zygote_main(config: dict) -> None:
    """Import the math modules once, then fork one launcher per session the caller asks for."""
    control = socket.socket(fileno=config["control_fd"])
    set_process_name(b"sandbox-zygote")
    started = time.perf_counter()
    for name in PRELOADED_MODULES:
        __import__(name)
    _warm_up()
    import gc

    gc.freeze()  # forked sessions then do not copy pages for the collector's bookkeeping
    try:
        control.send(json.dumps({"import_seconds": round(time.perf_counter() - started, 3)}).encode())
    except (BrokenPipeError, ConnectionResetError):
        os._exit(0)  # the caller closed the sandbox before its first cell (e.g. a rollout without code)
    config["zygote"] = os.getpid()
    uid_base = SESSION_UID_BASE + (os.getpid() % 10_000) * 100_000  # apart from other sandboxes' uids
    config["memory_cgroup"] = memory_cgroup_parent() if config["cgroup"] else None
    if config["memory_cgroup"] is not None:
        remove_stale_cgroups(config["memory_cgroup"][0])
    sessions = itertools.count()
    # As root with every namespace granted, S is forked straight into them (one fork of this large process
    # per session instead of two); elsewhere a launcher enters them, a user namespace first where needed.
    direct = _namespaces_granted(config["network"])
    # unshare(CLONE_NEWPID) works once per pid namespace we are in: after each fork we go back to our own
    # (setns), or the next unshare fails and every later session would share the first one's namespace.
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY) if direct else None
    cgroups: dict[int, MemoryCgroup] = {}  # S's pid -> its session's cgroup, removed when S is collected

    def launch() -> socket.socket:
        caller_end, session_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        uid = uid_base + next(sessions) % 100_000
        budget, note = None, None
        if direct:
            budget, note = _session_cgroup(config, uid)
            enter_namespaces(config["network"], only=CLONE_NEWPID, strict=True)  # our next child is its init
        try:
            pid = os.fork()
        except OSError:
            pid = None
            raise
        finally:
            if direct and pid != 0:  # in the parent only: the child may not leave its new namespace
                setns(own_pid_namespace, CLONE_NEWPID)
        if pid == 0:
            try:
                control.close()
                if own_pid_namespace is not None:
                    os.close(own_pid_namespace)
                for spare in spares:
                    spare.close()
                caller_end.close()
                if not direct:
                    _launcher_main(config, session_end, uid)
                if note is not None:
                    config["memory_note"] = note
                namespaces = CLONE_NEWPID | enter_namespaces(config["network"], exclude=CLONE_NEWPID)
                Supervisor(config, session_end, uid, namespaces, None, budget).serve()
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        session_end.close()
        if budget is not None:
            budget.close_files("procs", "events")
            cgroups[pid] = budget
        return caller_end

    def ended(pid: int) -> None:
        """A session (or launcher) we forked was collected: remove its cgroup, if we made it."""
        if pid in cgroups:
            cgroups.pop(pid).remove()

    # Sessions started ahead of need, so that a new trajectory does not wait for namespaces and forks: always
    # `spares` of them, and as many as the caller said it will soon ask for (b"reserve N"), built one at a
    # time between the caller's requests, while the caller does something else (its engine generates).
    spares: collections.deque[socket.socket] = collections.deque()
    reserved = 0
    while True:
        while len(spares) < config["spares"]:
            spares.append(launch())
        if len(spares) < reserved and not select.select([control], [], [], 0)[0]:
            spares.append(launch())
            continue
        try:
            message = control.recv(1 << 16)
        except ConnectionResetError:  # the caller closed with our ready message unread: the same as EOF
            message = b""
        if message.startswith(b"reserve "):
            reserved = int(message.split()[1])  # the caller keeps it within its max_sessions
            continue
        if not message:  # the caller closed us (or died): end the spares, wait for every session to end
            for spare in spares:
                spare.close()
            signal.alarm(10)  # a session that does not exit by then is killed with us (parent-death signal)
            while True:
                try:
                    pid, _ = os.waitpid(-1, 0)
                except ChildProcessError:
                    os._exit(0)
                ended(pid)
        for pid in reap():
            ended(pid)
        reserved = max(reserved - 1, 0)
        caller_end = spares.popleft() if spares else launch()
        socket.send_fds(control, [b"session"], [caller_end.fileno()])
        caller_end.close()


def _warm_up() -> None:
    # sympy imports and caches a lot lazily on first use; pay for it once here, not in every session.
    import numpy
    import sympy

    x, y = sympy.symbols("x y")
    sympy.solve([x + y - 3, x - y - 1], [x, y])
    sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
    sympy.factor(x**2 - 1), sympy.expand((x + 1) ** 3), sympy.Rational(1, 3) + 1
    sympy.integrate(x**2, (x, 0, 1)), sympy.diff(sympy.exp(x), x), sympy.N(sympy.pi, 20)
    sympy.isprime(97), sympy.factorint(360), sympy.binomial(10, 3), sympy.Matrix([[1, 2], [3, 4]]).det()
    str(sympy.sqrt(8)), repr(x**2 + 1)
    numpy.linalg.solve(numpy.eye(2), numpy.ones(2)), numpy.arange(10).sum()


def _namespaces_granted(network: bool) -> bool:
    """Whether we are root and a child of ours may enter every namespace a session wants, together."""
    if os.geteuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            enter_namespaces(network, strict=True)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _session_cgroup(config: dict, uid: int) -> tuple[MemoryCgroup | None, str | None]:
    """The session's memory cgroup (made before the namespaces: afterwards every mount is read-only), or why
    there is none."""
    if config["memory_cgroup"] is None:
        return None, None
    parent, version = config["memory_cgroup"]
    try:
        name = f"mathagent-{config['zygote']}-{uid}"  # remove_stale_cgroups goes by the zygote's pid
        return MemoryCgroup(parent, version, name, config["memory_mb"] << 20), None
    except OSError as e:
        return None, f"no memory cgroup: {e}"


def _launcher_main(config: dict, session_end: socket.socket, uid: int) -> None:
    """Between the zygote and the session: enter new namespaces, fork the session into them, wait for it."""
    set_process_name(b"sandbox-launch")
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote died: so do we, and our session after us
    if os.getppid() == 1:
        os._exit(0)
    budget, note = _session_cgroup(config, uid)
    if note is not None:
        config["memory_note"] = note
    namespaces = enter_namespaces(config["network"])
    workdir = host_workdir(namespaces, uid)  # None where the session gets a private tmpfs
    pid = os.fork()
    if pid == 0:
        try:
            Supervisor(config, session_end, uid, namespaces, workdir, budget).serve()
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    session_end.close()
    if budget is not None:
        budget.close_files("procs", "events")
    os.waitpid(pid, 0)  # S is the init of the session's pid namespace: its processes are gone with it
    if budget is not None:
        budget.remove()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)


class Supervisor:
    """S: the trusted process of one trajectory. It runs no model code; it keeps the holder chain, hands
    cells to it, enforces the deadline, kills what cells leave behind and answers the caller."""

    def __init__(self, config: dict, caller: socket.socket, uid: int, namespaces: int, workdir: str | None,
                 cgroup: MemoryCgroup | None):
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        set_process_name(b"sandbox-S")
        self.config = config
        self.cgroup = cgroup
        if cgroup is not None:
            cgroup.close_files("parent")
        self.caller = caller
        self.uid = uid
        self.timeout = config["timeout"]
        self.cap = config["max_output_chars"]
        self.output_limit = config["max_file_mb"] << 20
        os.setsid()  # our own process group and session: kill(0) from a cell reaches nobody outside
        self.isolation, self.workdir = isolate(config, uid, namespaces, workdir)
        if self.isolation["mount_namespace"]:
            mounts, directories = [path for path in ("/tmp", "/dev/shm") if os.path.isdir(path)], []
        else:
            mounts, directories = [], [self.workdir]
        self.polled = None if cgroup else PolledBudget(config["memory_mb"] << 20, mounts, directories)
        self.isolation["memory"] = f"cgroup v{cgroup.version}" if cgroup else "polled"
        if "memory_note" in config:
            self.isolation["memory"] += f" ({config['memory_note']})"
        os.environ.clear()
        os.environ.update(
            PATH="/usr/local/bin:/usr/bin:/bin", HOME=self.workdir, TMPDIR=self.workdir, LANG="C.UTF-8",
            OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MATHAGENT_SANDBOX=config["mark"],
        )  # fmt: skip
        os.chdir(self.workdir)
        # fd 1 and 2 of every cell are this memfd: the supervisor reads what a cell printed even after
        # killing it, and what subprocesses print lands there too.
        self.printed = os.memfd_create("cell-output", 0)
        import fcntl

        fcntl.fcntl(self.printed, fcntl.F_SETFL, os.O_APPEND)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        # Our own diagnostics (a bug in this package) still go to the caller's stderr; cells never see that fd.
        sys.stderr = open(os.dup(2), "w", buffering=1)
        os.dup2(self.printed, 1)
        os.dup2(self.printed, 2)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size cap fails with EFBIG instead
        self.seq = 0
        self.holder = 0
        self.commands = self.results = None
        self._start_chain()
        pidfd = os.pidfd_open(os.getpid()) if hasattr(os, "pidfd_open") else None
        ready = json.dumps({"isolation": self.isolation}).encode()
        try:
            socket.send_fds(self.caller, [FRAME.pack(len(ready))], [pidfd] if pidfd is not None else [])
            self.caller.sendall(ready)
        except OSError:  # a spare session the zygote dropped unused
            os._exit(0)
        if pidfd is not None:
            os.close(pidfd)

    # -- the holder chain ----------------------------------------------------------------------------------

    def _start_chain(self) -> None:
        """Kill the chain (if any) and fork a new holder with an empty namespace."""
        if self.commands is not None:
            self.commands.close()
            self.results.close()
        self._kill_all_but(set())
        commands, chain_commands = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        results, chain_results = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            commands.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, MAX_CODE_BYTES + (1 << 16))
        except OSError:
            commands.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_CODE_BYTES + (1 << 16))
        self.max_command = commands.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - 1024
        commands.shutdown(socket.SHUT_RD)
        results.shutdown(socket.SHUT_WR)
        results.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel tells us who sent a result
        pid = os.fork()
        if pid == 0:
            try:
                holder = Holder(self, chain_commands, chain_results)
                if self.cgroup is not None:
                    self.cgroup.close_files()
                for sock in (commands, results, self.caller):
                    sock.close()
                os.close(self.printed)
                sys.stderr.close()
                holder.serve()
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        chain_commands.close()
        chain_results.close()
        self.commands, self.results, self.holder = commands, results, pid

    def _processes(self) -> dict[int, tuple[int, bool]]:
        """pid -> (parent pid, alive) for every process under us (in a pid namespace: all of /proc). A
        zombie, or a process already in exit() (it may have closed its files but not yet be a zombie), is
        not alive: it runs no more code."""
        table = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                state, parent, _, _, _, _, flags = stat[stat.rindex(b")") + 2 :].split()[:7]
                table[int(name)] = (int(parent), state not in b"ZX" and not int(flags) & _PF_EXITING)
        me = os.getpid()
        children = collections.defaultdict(list)
        for pid, (parent, _) in table.items():
            children[parent].append(pid)
        under, stack = {}, list(children[me])
        while stack:
            pid = stack.pop()
            under[pid] = table[pid]
            stack.extend(children[pid])
        return under

    def _alive(self, pid: int) -> bool:
        return self._processes().get(pid, (0, False))[1]

    def _kill_all_but(self, keep: set[int]) -> None:
        """SIGKILL every process under us except `keep`, and return once none of them runs any more."""
        for attempt in itertools.count():
            reap()
            victims = [pid for pid, (_, alive) in self._processes().items() if alive and pid not in keep]
            if not victims:
                return
            for pid in victims:
                kill(pid)
            if attempt > 2:
                time.sleep(min(0.001 * attempt, 0.05))  # a process in uninterruptible sleep: give it time
            if attempt > 200:
                print(f"sandbox: processes {victims} survive SIGKILL", file=sys.stderr)
                return

    # -- serving the caller --------------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            header = self._read(FRAME.size)
            if header is None:
                break  # the caller is gone or forgot us
            request = json.loads(self._read(FRAME.unpack(header)[0]))
            if request["reset"]:
                self._start_chain()
            for cell in request["cells"]:
                reply = self._run(cell["code"], cell["index"])
                if not cell["output"]:
                    reply["output"] = ""
                data = json.dumps(reply).encode()
                self.caller.sendall(FRAME.pack(len(data)) + data)
        self._kill_all_but(set())
        os._exit(0)

    def _read(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = self.caller.recv(size - len(data))
            except ConnectionResetError:  # a spare session the zygote dropped unused
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _run(self, code: str, index: int) -> dict:
        """Run one cell in the holder; the reply the caller gets."""
        lost = False
        self.seq += 1
        os.ftruncate(self.printed, 0)
        command = json.dumps({"kind": "run", "seq": self.seq, "code": code, "index": index}).encode()
        if len(command) > self.max_command:
            error = f"SandboxError: the cell is {len(command)} bytes long, more than {self.max_command}"
            return {"status": "error", "output": error, "seconds": 0.0, "lost": lost, "kept": True}
        oom_kills = self.cgroup.oom_kills() if self.cgroup is not None else 0
        if self.polled is not None:
            self.polled.start(self._processes())
        started = time.perf_counter()
        try:
            self.commands.send(command)
        except OSError:  # every process of the chain died: start from an empty namespace
            self._start_chain()
            self.commands.send(command)
            lost = True
        outcome, message, cell_pid = self._await(self.seq, started + self.timeout + GRACE_SECONDS)
        seconds = time.perf_counter() - started
        if outcome == "result":
            status, error = message["status"], message["error"]
        elif outcome == "died":
            status, error = "killed", _death_message(message)
        elif outcome == "over budget":
            status, error = "memory", ""
        else:
            status, error = "timeout", f"TimeoutError: the cell ran longer than {self.timeout:g} s"
        # The holder ran the cell to its end (a timeout it caught itself is undone all the same) and holds the
        # new state.
        kept = outcome == "result" and status in ("ok", "error", "memory")
        stopped = self.cgroup.oom_kills() - oom_kills if self.cgroup is not None else 0
        if stopped or outcome == "over budget":
            # The kernel stopped the cell or some of its processes (or we did, where it is polled): the
            # session went over its budget, whatever the cell's own process saw of it.
            status = "memory"
            error = (f"MemoryError: the session went over its {self.config['memory_mb']} MB of memory (its "
                     f"processes, memfds and files together); "
                     + ("the cell was stopped" if not kept else f"{stopped} of the cell's processes were stopped"))
        if kept:
            # The holder ran the cell to its end and holds the new state (or the thread-free copy it forked
            # does, see cell.Holder): whatever else the cell left running goes.
            successor = message.get("successor")
            if isinstance(successor, int) and self._processes().get(successor, (0, False))[0] == cell_pid:
                kill(cell_pid)  # not waited for: it runs no more code, and its exit takes milliseconds
                self._kill_all_but({successor, cell_pid})
                self.holder = successor
            else:
                self._kill_all_but({self.holder})
        else:
            # The state the cell left cannot be trusted (or is gone with the holder): a new holder with an empty
            # namespace, and the caller replays the cells that were kept (client).
            self._start_chain()
            lost = True
        output, cut = _fit(self._printed(), error, self.cap)
        return {"status": status, "output": output, "cut": cut, "seconds": seconds, "lost": lost, "kept": kept}

    def _await(self, seq: int, deadline: float) -> tuple[str, dict | None, int]:
        """Wait for the cell's result, its process's death, or the deadline: (outcome, message, cell pid)."""
        cell_pid, cell_pidfd = 0, None
        poller = select.poll()
        poller.register(self.results, select.POLLIN)
        died_at = None
        try:
            while True:
                now = time.perf_counter()
                if died_at is not None and now > died_at + 0.2:
                    return "died", None, cell_pid  # the holder did not say how: it may be dead too
                wait = min(deadline, died_at + 0.2) if died_at is not None else deadline
                if now >= wait:
                    return "deadline", None, cell_pid
                if self.polled is not None:
                    if self.polled.over(self._processes()):
                        return "over budget", None, cell_pid
                    wait = min(wait, now + PolledBudget.INTERVAL)
                for fd, event in poller.poll((wait - now) * 1000):
                    if fd == cell_pidfd:
                        poller.unregister(cell_pidfd)
                        died_at = time.perf_counter()
                        died = self._own_child_died(cell_pid)
                        if died:
                            return "died", died, cell_pid
                        continue
                    message, sender = self._receive()
                    if sender == -1:  # every process of the chain is gone
                        return "died", self._own_child_died(cell_pid, wait=0.1), cell_pid
                    if message is None:
                        continue
                    kind = message.get("kind")
                    if kind == "started" and message.get("seq") == seq and not cell_pid:
                        cell_pid = sender
                        try:
                            cell_pidfd = os.pidfd_open(sender)
                            poller.register(cell_pidfd, select.POLLIN)
                        except (OSError, AttributeError):
                            pass
                    elif kind == "result" and message.get("seq") == seq and sender == cell_pid:
                        if _valid_result(message):
                            return "result", message, cell_pid
        finally:
            if cell_pidfd is not None:
                os.close(cell_pidfd)

    def _own_child_died(self, pid: int, wait: float = 0.0) -> dict | None:
        """How `pid` ended, if it is our child: a cell that killed its parent first was handed to us."""
        deadline = time.perf_counter() + wait
        while pid:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if done:
                return _died(pid, status)
            if time.perf_counter() > deadline:
                return None
            time.sleep(0.002)
        return None

    def _receive(self) -> tuple[dict | None, int]:
        """One message from the chain and its sender's pid, as the kernel saw it; sender -1 at EOF."""
        data, ancillary, _, _ = self.results.recvmsg(1 << 20, socket.CMSG_SPACE(12))
        if not data:
            return None, -1
        sender = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("iII", payload[:12])[0]
        try:  # the cell can write to this socket: whatever it sends is hostile until it parses
            message = json.loads(data)
        except (ValueError, RecursionError):  # garbage, or "[[[[..." nested past the parser's recursion limit
            return None, sender
        return (message if isinstance(message, dict) else None), sender

    def _printed(self) -> str:
        size = os.fstat(self.printed).st_size
        return os.pread(self.printed, min(size, self.output_limit), 0).decode("utf-8", "replace")


def _died(pid: int, status: int | None) -> dict:
    """How a cell's process (the holder) ended, from its wait status."""
    message = {"kind": "died", "pid": pid, "code": None, "signal": None}
    if status is not None and os.WIFEXITED(status):
        message["code"] = os.WEXITSTATUS(status)
    elif status is not None and os.WIFSIGNALED(status):
        message["signal"] = os.WTERMSIG(status)
    return message


def _valid_result(message: dict) -> bool:
    return message.get("status") in STATUSES and isinstance(message.get("error"), str)


def _death_message(message: dict | None) -> str:
    if message and isinstance(message.get("signal"), int) and message["signal"]:
        try:
            name = signal.Signals(message["signal"]).name
        except ValueError:
            name = f"signal {message['signal']}"
        return f"SandboxError: the cell's process was killed by {name}"
    if message and isinstance(message.get("code"), int):
        return f"SystemExit: the cell ended its process with exit code {message['code']}"
    return "SandboxError: the cell's process died"


def _fit(printed: str, error: str, cap: int) -> tuple[str, bool]:
    """Printed text then the error, cut to `cap` characters: the error is kept, the printed text is cut
    from its end with a marker saying how much was cut. Also whether anything was cut."""
    printed = printed.rstrip("\n")
    error = error.strip("\n")
    cut = False
    if len(error) > cap // 2:  # the error's last lines (the exception is the last one) in half the cap
        lines = error.splitlines()
        while len(lines) > 1 and sum(len(line) + 1 for line in lines) > cap // 2:
            lines.pop(0)
        error, cut = "\n".join(lines)[-(cap // 2) :], True
    room = cap - len(error) - (1 if error else 0)
    if len(printed) > room:
        marker = f"\n[... {len(printed):d} more characters cut]"  # an upper bound on the marker's length
        keep = max(room - len(marker), 0)
        printed, cut = printed[:keep] + f"\n[... {len(printed) - keep} more characters cut]", True
    return "\n".join(part for part in (printed, error) if part), cut
