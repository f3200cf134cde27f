"""The supervisor: the trusted process between the caller and a trajectory's cells, which runs no model code.
It keeps the session's holder (`cell.Holder`, replaced after a failed cell), hands each cell to it and
answers the caller: one JSON reply per cell, after its length (`protocol.FRAME`), with a status of
`protocol.STATUSES`. Two shapes, one logic (`Supervisor`):

- shared (`serve_sessions`, root with cgroups): one process supervises every session of the sandbox, a
  thread each (`CgroupSupervisor`). The zygote forks each holder straight into new namespaces, as the init
  of its own pid namespace; the supervisor finds a session's processes and CPU time through its cgroups.
- one per session (`NamespaceSupervisor`, elsewhere): S, forked by the zygote or a launcher as the init of
  the session's pid namespace, enters the other namespaces (`jail`), mounts the session's file system and
  forks the holder.

A cell runs in the holder's own process, so nothing the holder says about a cell can be trusted: the cell
can send a result from the holder's pid and keep running. What the supervisor decides from outside instead:
the wall deadline and the session's CPU time (every process of the session, living and ended), and the
cell's end. A result counts only once the holder is idle, one thread blocked receiving its next command; the
supervisor then stops it (SIGSTOP, which no process can catch, and which reaches a pid namespace's init from
outside) and kills every other process of the session, and continues it with the next cell. A cell that sent
a result and went on computing is a timeout; between cells nothing of a session runs.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import platform
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback

from mathagent.sandbox.budgets import CgroupReader, PolledBudget, SessionCgroup, set_oom_score
from mathagent.sandbox.cell import Holder, prepare_cell_process
from mathagent.sandbox.jail import PR_SET_PDEATHSIG, isolate, keep_only_fds, kill, prctl, reap, set_process_name
from mathagent.sandbox.protocol import FRAME, GRACE_SECONDS, KEPT_STATUSES, MAX_CODE_BYTES, STATUSES, cpu_limit

CPU_CHECK_SECONDS = 0.1  # how often the supervisor reads the session's CPU time while a cell runs
_SO_SNDBUFFORCE = 32
_PF_EXITING = 0x4  # in /proc/PID/stat's flags: the process is in exit()
# The call an idle holder is blocked in, as /proc/PID/syscall names it: recvfrom(2), which Python's
# socket.recv makes on a blocking socket.
_RECV_CALLS = {"x86_64": "45", "aarch64": "207"}
RECV_CALL = _RECV_CALLS.get(platform.machine())


def chain_sockets() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """The two SEQPACKET channels between a supervisor and a holder: (commands, the holder's end of them,
    results, the holder's end of them). A command holds a whole cell; the supervisor learns from the kernel
    who sent each result."""
    commands, chain_commands = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    results, chain_results = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        commands.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, MAX_CODE_BYTES + (1 << 16))
    except OSError:
        commands.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_CODE_BYTES + (1 << 16))
    commands.shutdown(socket.SHUT_RD)
    results.shutdown(socket.SHUT_WR)
    results.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel tells us who sent a result
    return commands, chain_commands, results, chain_results


def describe(isolation: dict, config: dict, memory_version: int | None, quota_version: int | None,
             notes: list[str], recv_call: str | None) -> dict:  # fmt: skip
    """The isolation report of a session: what the holder's namespaces and mounts put in force, and the
    budgets, filter, uids and cell end around them."""
    isolation["memory"] = f"cgroup v{memory_version}" if memory_version else "polled"
    cpus = config["cpus"]
    isolation["cpu"] = (f"{cpus:g} core{'s' if cpus != 1 else ''} (cgroup v{quota_version})" if quota_version
                        else "no quota (no writable cpu cgroup)" if cpus else "no quota")  # fmt: skip
    for note in notes:
        key = "memory" if note.startswith("no memory") else "cpu"
        isolation[key] += f" ({note})"
    isolation.setdefault("seccomp", config.get("syscall_filter_note"))  # the holder's, where it reports them
    isolation.setdefault("uids", config.get("uid_source"))
    isolation["cell_end"] = ("decided by the supervisor: deadline and CPU time read from outside, "
                             "a result counts once the holder is idle, stopped between cells")
    if recv_call is None:
        isolation["cell_end"] += " (idle: one sleeping thread; its system call unreadable here)"
    return isolation


class Supervisor:
    """What a supervisor does for one session, in either shape: hand cells to the holder, decide when each
    has ended (the deadline, the CPU time, the holder idle and stopped), kill what cells leave behind and
    answer the caller. The shapes differ in where the holder comes from and how the session's processes and
    CPU time are found (`_start_chain`, `_processes`, `_cpu_seconds`, `_kill_all_but`, `_end`)."""

    def __init__(self, config: dict, caller: socket.socket, memory, polled: PolledBudget | None,
                 recv_call: str | None):  # fmt: skip
        self.config = config
        self.caller = caller
        self.memory = memory  # the memory cgroup's OOM-kill counter (oom_kills()), or None
        self.polled = polled
        self.recv_call = recv_call
        self.timeout = config["timeout"]
        self.cpu_limit = cpu_limit(self.timeout)  # seconds of CPU a cell's processes may use together
        self.cap = config["max_output_chars"]
        self.output_limit = config["max_file_mb"] << 20
        self.seq = 0
        self.holder, self.holder_pidfd, self.holder_commands = 0, None, -1
        self.printed = -1  # the output memfd: fd 1 and 2 of every cell
        self.stopped = False  # the holder is stopped (SIGSTOP) until its next cell
        self.cpu_mark = 0.0  # the session's CPU time when the holder was stopped
        self.oom_scores = False  # the holder's OOM score was lowered: it raises it while a cell runs
        self.oom_score_failures = 0  # since the last reply
        self.commands = self.results = None
        self.max_command = 0

    def _adopt(self, pid: int, pidfd: int, commands: socket.socket, results: socket.socket,
               holder_commands: int) -> None:  # fmt: skip
        """A new holder, idle and unstopped, with an empty namespace."""
        self.commands, self.results, self.holder, self.holder_pidfd = commands, results, pid, pidfd
        self.holder_commands = holder_commands  # the commands socket's fd number in the holder
        self.max_command = commands.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - 1024
        self.stopped = False
        if self.memory is not None:
            # Set by the supervisor, which is root: lowering a score needs CAP_SYS_RESOURCE, and a score set so
            # is the lowest the holder may set itself later, when a cell has ended.
            self.oom_scores = set_oom_score(SessionCgroup.OOM_SCORE_HOLDER, pid)
            self.oom_score_failures += not self.oom_scores

    def _signal_holder(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.holder_pidfd, signum)
        except ProcessLookupError:
            pass

    def _idle(self, pid: int) -> bool:
        """The holder has stopped computing: one thread, blocked receiving its next command."""
        try:
            if len(os.listdir(f"/proc/{pid}/task")) != 1:
                return False
            if self.recv_call is None:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    return f.read().rsplit(b")", 1)[1].split()[0] == b"S"
            with open(f"/proc/{pid}/syscall") as f:
                call = f.read().split()
        except PermissionError:
            # Closed to us after all: in a user namespace, the holder's memory still belongs to the host's
            # (where the zygote was started), so its system call is not ours to read.
            self.recv_call = None
            return self._idle(pid)
        except OSError:
            return False
        return len(call) > 1 and call[0] == self.recv_call and int(call[1], 16) == self.holder_commands

    def _stop(self) -> None:
        """Stop the idle holder until its next cell, and kill everything else of the session.

        SIGSTOP cannot be caught, blocked or ignored, and a task blocked in a system call that has it pending
        runs no user code again before it is continued: the kernel handles every pending signal before it
        returns to user space, so even a handler the cell installed for a signal already pending is not
        entered first. A process the cell left could continue the holder before it is killed; the second
        SIGSTOP, with nobody left to send SIGCONT, settles it. The session's CPU time is read here too:
        nothing of it runs until the next cell, which starts from this mark."""
        self._signal_holder(signal.SIGSTOP)
        processes = self._kill_all_but({self.holder})
        self._signal_holder(signal.SIGSTOP)
        self.stopped, self.cpu_mark = True, self._cpu_seconds(processes)

    def _resume(self) -> None:
        if self.stopped:
            self._signal_holder(signal.SIGCONT)
            self.stopped = False

    # -- what each shape provides ----------------------------------------------------------------------------

    def _start_chain(self) -> None:
        """End the holder (if any) with every process of the session, and start a new one."""
        raise NotImplementedError

    def _processes(self) -> dict[int, tuple[int, bool, int]]:
        """pid -> (parent pid, alive, CPU clock ticks) of the session's processes, where the shape needs them."""
        raise NotImplementedError

    def _cpu_seconds(self, processes: dict[int, tuple[int, bool, int]]) -> float:
        raise NotImplementedError

    def _survivors(self, keep: set[int]) -> tuple[dict[int, tuple[int, bool, int]], list[int]]:
        """The session's processes as `_processes` gives them, and those of them alive but not in `keep`."""
        raise NotImplementedError

    def _kill(self, pid: int) -> None:
        """SIGKILL one process of the session."""
        raise NotImplementedError

    def _kill_all_but(self, keep: set[int]) -> dict[int, tuple[int, bool, int]]:
        """SIGKILL every process of the session except `keep`, and return once none of them runs any more; the
        session's processes as they are then. A process in uninterruptible sleep needs time to die; past 200
        rounds we say so and go on."""
        for attempt in itertools.count():
            processes, victims = self._survivors(keep)
            if not victims:
                return processes
            for pid in victims:
                self._kill(pid)
            if attempt > 2:
                time.sleep(min(0.001 * attempt, 0.05))
            if attempt > 200:
                print(f"sandbox: processes {victims} survive SIGKILL", file=sys.stderr)
                return processes

    def _death(self, pid: int) -> dict | None:
        """How the holder `pid` ended, where we can learn it (None: unknown)."""
        raise NotImplementedError

    def _end(self) -> None:
        """The caller is gone: end the session."""
        raise NotImplementedError

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
        self._end()

    def _read(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = self.caller.recv(size - len(data))
            except OSError:  # a spare session the zygote dropped unused (connection reset)
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
        command = json.dumps({"kind": "run", "seq": self.seq, "code": code, "index": index,
                              "oom_scores": self.oom_scores}).encode()  # fmt: skip
        if len(command) > self.max_command:
            error = f"SandboxError: the cell is {len(command)} bytes long, more than {self.max_command}"
            return self._reply("error", error, 0.0, lost=False, kept=True)
        oom_kills = self.memory.oom_kills() if self.memory is not None else 0
        processes = self._processes() if self.polled is not None or not self.stopped else {}
        if self.polled is not None:
            self.polled.start(processes)
        # A stopped holder has used no CPU since the mark; a new one (trusted code so far) is read now.
        cpu_start = self.cpu_mark if self.stopped else self._cpu_seconds(processes)
        started = time.perf_counter()
        self._resume()
        try:
            self.commands.send(command)
        except OSError:  # every process of the chain died: start from an empty namespace
            self._start_chain()
            self.commands.send(command)
            lost = True
        outcome, message = self._await(self.seq, started + self.timeout + GRACE_SECONDS, cpu_start)
        seconds = time.perf_counter() - started
        if outcome == "result":
            status, error = message["status"], message["error"]
        elif outcome == "died":
            status, error = "killed", _death_message(message)
        elif outcome == "over budget":
            status, error = "memory", ""
        elif outcome == "cpu":
            status, error = "timeout", f"TimeoutError: the cell used more than {self.cpu_limit} s of CPU time"
        else:
            status, error = "timeout", f"TimeoutError: the cell ran longer than {self.timeout:g} s"
        # The holder ran the cell to its end, is idle and stopped, and holds the new state (a timeout it caught
        # itself is undone all the same).
        kept = outcome == "result" and status in KEPT_STATUSES
        stopped = self.memory.oom_kills() - oom_kills if self.memory is not None else 0
        if stopped or outcome == "over budget":
            # The kernel stopped the cell or some of its processes (or we did, where it is polled): the
            # session went over its budget, whatever the cell's own process saw of it.
            status = "memory"
            error = (f"MemoryError: the session went over its {self.config['memory_mb']} MB of memory (its "
                     f"processes, memfds and files together); "
                     + ("the cell was stopped" if not kept else f"{stopped} of the cell's processes were stopped"))
        if not kept:
            # The state the cell left cannot be trusted (or is gone with the holder): a new holder with an empty
            # namespace, and the caller replays the cells that were kept (client). What the cell printed is
            # read first: the new holder may come with a new output file.
            reply = self._reply(status, error, seconds, lost=True, kept=kept)
            self._start_chain()
            return reply
        return self._reply(status, error, seconds, lost=lost, kept=kept)

    def _reply(self, status: str, error: str, seconds: float, *, lost: bool, kept: bool) -> dict:
        output, cut = _fit(self._printed(), error, self.cap)
        output, escaped = _utf8_safe(output)
        reply = {"status": status, "output": output, "cut": cut, "escaped": escaped, "seconds": seconds,
                 "lost": lost, "kept": kept, "oom_score_failures": self.oom_score_failures}  # fmt: skip
        self.oom_score_failures = 0
        return reply

    def _await(self, seq: int, deadline: float, cpu_start: float) -> tuple[str, dict | None]:
        """Wait for the cell's end: (outcome, message). "result" once the holder has sent its result and is
        idle and stopped (a result it sent while it goes on computing is not an end), "died" when it died,
        "over budget" (the polled memory budget), "cpu" past the CPU limit, "deadline" past the wall one."""
        poller = select.poll()
        poller.register(self.results, select.POLLIN)
        poller.register(self.holder_pidfd, select.POLLIN)
        result, settle_wait = None, 0.0
        next_cpu_check = time.perf_counter() + CPU_CHECK_SECONDS
        while True:
            now = time.perf_counter()
            if now >= deadline:
                return "deadline", None
            wait = deadline
            if result is not None:
                if self._idle(self.holder):
                    self._stop()
                    return "result", result
                settle_wait = min(max(settle_wait * 2, 0.0001), 0.01)  # an honest holder takes microseconds
                wait = min(wait, now + settle_wait)
            if self.polled is not None:
                if self.polled.over(self._processes()):
                    return "over budget", None
                wait = min(wait, now + PolledBudget.INTERVAL)
            if now >= next_cpu_check:
                if self._cpu_seconds(self._processes()) - cpu_start > self.cpu_limit + GRACE_SECONDS:
                    return "cpu", None
                next_cpu_check = now + CPU_CHECK_SECONDS
            wait = min(wait, next_cpu_check)
            for fd, _ in poller.poll(max(wait - now, 0) * 1000):
                if fd == self.holder_pidfd:
                    return "died", self._death(self.holder)
                message, sender = self._receive()
                if sender == -1:  # every process of the chain is gone
                    return "died", self._death(self.holder)
                if (result is None and message is not None and message.get("kind") == "result"
                        and message.get("seq") == seq and sender == self.holder and _valid_result(message)):
                    if message["status"] not in KEPT_STATUSES:
                        return "result", message  # the holder's own timeout: the chain is replaced anyway
                    result = message

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



class NamespaceSupervisor(Supervisor):
    """S: one session's own supervisor process, the init of its pid namespace (forked by the zygote, or by a
    launcher where a user namespace comes first). It mounts the session's file system, forks the holder and
    finds the session's processes in /proc: all of it is the session's."""

    def __init__(self, config: dict, caller: socket.socket, uid: int, namespaces: int, workdir: str | None,
                 cgroups: list[SessionCgroup], notes: list[str]):  # fmt: skip
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        set_process_name(b"sandbox-S")
        # Only what this session needs crosses into it: whatever else the zygote or launcher held (other
        # sessions' sockets, cgroup directories of the host's mount namespace) is closed here, before the
        # holder is forked.
        keep_only_fds({0, 1, 2, caller.fileno(), *(fd for cgroup in cgroups for fd in cgroup.fds())})
        memory = next((cgroup for cgroup in cgroups if cgroup.events is not None), None)
        self.cgroups, self.uid = cgroups, uid
        os.setsid()  # our own process group and session: kill(0) from a cell reaches nobody outside
        self.isolation, self.workdir = isolate(config, uid, namespaces, workdir)
        if self.isolation["mount_namespace"]:
            mounts, directories = [path for path in ("/tmp", "/dev/shm") if os.path.isdir(path)], []
        else:
            mounts, directories = [], [self.workdir]
        polled = None if memory else PolledBudget(config["memory_mb"] << 20, mounts, directories)
        # The holder's idle state, as S reads it from /proc (root reads any process's; elsewhere a holder
        # that is not dumpable hides it, and S goes by its thread count and sleep alone).
        recv_call = RECV_CALL if os.geteuid() == 0 or self.isolation["user_namespace"] else None
        super().__init__(config, caller, memory, polled, recv_call)
        quota = next((cgroup for cgroup in cgroups if cgroup.cpus is not None), None)
        describe(self.isolation, config, memory.version if memory else None, quota.version if quota else None,
                 notes, recv_call)  # fmt: skip
        # Our own diagnostics (a bug in this package) still go to the caller's stderr; cells never see that fd.
        sys.stderr = open(os.dup(2), "w", buffering=1)
        self.printed = prepare_cell_process(config["mark"], self.workdir)
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

    def _start_chain(self) -> None:
        if self.commands is not None:
            self.commands.close()
            self.results.close()
        if self.holder_pidfd is not None:
            os.close(self.holder_pidfd)
            self.holder_pidfd = None
        self._kill_all_but(set())
        commands, chain_commands, results, chain_results = chain_sockets()
        pid = os.fork()
        if pid == 0:
            try:
                for sock in (commands, results, self.caller):
                    sock.close()
                Holder(chain_commands, chain_results, printed=self.printed, cgroups=self.cgroups,
                       polled=self.polled is not None, config=self.config, uid=self.uid,
                       isolation=self.isolation).serve()  # it closes our other fds
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        holder_commands = chain_commands.fileno()
        chain_commands.close()
        chain_results.close()
        self._adopt(pid, os.pidfd_open(pid), commands, results, holder_commands)

    def _processes(self) -> dict[int, tuple[int, bool, int]]:
        """Every process under us (in a pid namespace: all of /proc). A zombie, or a process already in exit()
        (it may have closed its files but not yet be a zombie), is not alive: it runs no more code. The ticks
        are its own and its collected children's."""
        table = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rindex(b")") + 2 :].split()
                ticks = sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
                table[int(name)] = (int(fields[1]), _running(fields), ticks)
        me = os.getpid()
        children = collections.defaultdict(list)
        for pid, (parent, _, _) in table.items():
            children[parent].append(pid)
        under, stack = {}, list(children[me])
        while stack:
            pid = stack.pop()
            under[pid] = table[pid]
            stack.extend(children[pid])
        return under

    def _cpu_seconds(self, processes: dict[int, tuple[int, bool, int]]) -> float:
        """What a cell's threads, children and daemons take is all here, wherever the cell moved it."""
        collected = os.times()
        ticks = sum(info[2] for info in processes.values())
        return ticks / os.sysconf("SC_CLK_TCK") + collected.children_user + collected.children_system

    def _survivors(self, keep: set[int]) -> tuple[dict[int, tuple[int, bool, int]], list[int]]:
        reap()  # we are the namespace's init: its orphans are ours to collect
        processes = self._processes()
        return processes, [pid for pid, (_, alive, _) in processes.items() if alive and pid not in keep]

    def _kill(self, pid: int) -> None:
        kill(pid)

    def _death(self, pid: int) -> dict | None:
        """How our child `pid` ended."""
        deadline = time.perf_counter() + 0.1
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if done:
                return _died(pid, status)
            if time.perf_counter() > deadline:
                return None
            time.sleep(0.002)

    def _end(self) -> None:
        self._kill_all_but(set())
        os._exit(0)


class CgroupSupervisor(Supervisor):
    """One session in the shared supervisor (`serve_sessions`), served by a thread of its own. The zygote
    forks its holders, each the init of a new pid namespace with its own mounts (`zygote`): when a holder
    dies, every process of its namespace dies with it. The session's processes are those of its cgroups
    (which no process of the session can leave) and its CPU time theirs, ended ones included."""

    def __init__(self, config: dict, caller: socket.socket, session: dict, fds: list[int], link: _ZygoteLink):
        self.session, self.link = session["session"], link
        self.cgroup = CgroupReader(session["cgroups"])
        super().__init__(config, caller, self.cgroup if self.cgroup.memory_version else None, None, RECV_CALL)
        self.notes = session["notes"]
        self._take(session, fds)

    def start(self) -> None:
        """Wait for the first holder to be set up, tell the caller what is in force, then serve it."""
        try:
            isolation = self._await_ready()
            if isolation is not None:
                describe(isolation, self.config, self.cgroup.memory_version, self.cgroup.quota_version,
                         self.notes, self.recv_call)  # fmt: skip
                ready = json.dumps({"isolation": isolation}).encode()
                try:
                    self.caller.sendall(FRAME.pack(len(ready)) + ready)
                except OSError:  # a spare session the zygote dropped unused
                    isolation = None
            if isolation is not None:
                self.serve()
                return
        except BaseException:
            traceback.print_exc()
        self._end()

    def _take(self, holder: dict, fds: list[int]) -> None:
        commands, results, printed, pidfd = fds
        self.printed = printed
        results = socket.socket(fileno=results)
        results.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._adopt(holder["pid"], pidfd, socket.socket(fileno=commands), results, holder["commands_fd"])

    def _await_ready(self) -> dict | None:
        """The first holder's report of what it put in force, once it is set up (None: it died first)."""
        poller = select.poll()
        poller.register(self.results, select.POLLIN)
        poller.register(self.holder_pidfd, select.POLLIN)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for fd, _ in poller.poll(1000):
                if fd == self.holder_pidfd:
                    return None
                message, sender = self._receive()
                if sender == -1:
                    return None
                if sender == self.holder and message and message.get("kind") == "ready":
                    return message.get("isolation")
        return None

    def _end_holder(self) -> None:
        """Kill the holder, and with it every process of its namespace; return once they are gone."""
        if self.holder_pidfd is None:
            return
        self._signal_holder(signal.SIGKILL)
        exited = select.poll()
        exited.register(self.holder_pidfd, select.POLLIN)
        exited.poll(10_000)  # readable once it has exited: its namespace is empty
        os.close(self.holder_pidfd)
        self.holder_pidfd = None
        self.link.forget(self.holder)
        for sock in (self.commands, self.results):
            sock.close()
        os.close(self.printed)
        self.printed = -1

    def _start_chain(self) -> None:
        self._end_holder()
        holder, fds = self.link.holder(self.session)
        self._take(holder, fds)

    def _processes(self) -> dict[int, tuple[int, bool, int]]:
        return {}  # the budget is the cgroup's, the CPU time the cgroup's counter

    def _cpu_seconds(self, processes: dict[int, tuple[int, bool, int]]) -> float:
        return self.cgroup.cpu_seconds()

    def _survivors(self, keep: set[int]) -> tuple[dict[int, tuple[int, bool, int]], list[int]]:
        return {}, [pid for pid in self.cgroup.pids() if pid not in keep and _alive(pid)]

    def _kill(self, pid: int) -> None:
        self.cgroup.kill(pid)

    def _death(self, pid: int) -> dict | None:
        return self.link.death(pid)

    def _end(self) -> None:
        self._end_holder()
        self.link.end(self.session)
        self.cgroup.close()
        self.caller.close()


class _ZygoteLink:
    """The shared supervisor's line to the zygote: new holders on request, the ended sessions, and how each
    holder (the zygote's child) ended, which the zygote reports as it collects them."""

    def __init__(self, holders: socket.socket):
        self.holders = holders
        self.lock = threading.Lock()
        self.ended = threading.Condition()
        self.deaths: dict[int, int] = {}  # holder pid -> wait status

    def holder(self, session: int) -> tuple[dict, list[int]]:
        with self.lock:
            self.holders.send(json.dumps({"kind": "holder", "session": session}).encode())
            data, fds, _, _ = socket.recv_fds(self.holders, 1 << 16, 4)
        holder = json.loads(data) if data else {"error": "the zygote is gone"}
        if "error" in holder:
            raise OSError(f"no new holder: {holder['error']}")
        return holder, fds

    def end(self, session: int) -> None:
        with self.lock:
            try:
                self.holders.send(json.dumps({"kind": "end", "session": session}).encode())
            except OSError:
                pass  # the zygote is gone, and the session's cgroups are stale

    def died(self, pid: int, status: int) -> None:
        with self.ended:
            self.deaths[pid] = status
            self.ended.notify_all()

    def death(self, pid: int, wait: float = 2.0) -> dict | None:
        with self.ended:
            self.ended.wait_for(lambda: pid in self.deaths, wait)
            status = self.deaths.pop(pid, None)
        return _died(pid, status) if status is not None else None

    def forget(self, pid: int) -> None:
        with self.ended:
            self.deaths.pop(pid, None)


def serve_sessions(config: dict, sessions: socket.socket, holders: socket.socket) -> None:
    """The shared supervisor's process: a thread per session the zygote starts, until the zygote is gone."""
    set_process_name(b"sandbox-super")
    keep_only_fds({0, 1, 2, sessions.fileno(), holders.fileno()})
    _, most = resource.getrlimit(resource.RLIMIT_NOFILE)  # eight files per live session
    resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
    threading.stack_size(1 << 20)
    link = _ZygoteLink(holders)
    threads, pruned = [], 0  # the threads of sessions maybe alive; how many were after the last pruning
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sessions, 1 << 16, 5)
        except OSError:
            break
        if not data:
            break
        message = json.loads(data)
        if message["kind"] == "died":
            link.died(message["pid"], message["status"])
            continue
        caller = socket.socket(fileno=fds[0])
        supervisor = CgroupSupervisor(config, caller, message, fds[1:], link)
        thread = threading.Thread(target=supervisor.start, daemon=True)
        thread.start()
        threads.append(thread)
        if len(threads) > 2 * pruned + 64:  # the ended ones dropped now and then: O(1) a session, not O(live)
            threads = [t for t in threads if t.is_alive()]
            pruned = len(threads)
    # The zygote is gone, and its holders with it (their parent-death signal).
    deadline = time.monotonic() + 5
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _running(f.read().rsplit(b")", 1)[1].split())
    except OSError:
        return False


def _running(fields: list[bytes]) -> bool:
    """From /proc/PID/stat's fields after the name: not a zombie and not in exit() (a process there may have
    closed its files but not yet be a zombie): it runs no more code."""
    return fields[0] not in b"ZX" and not int(fields[6]) & _PF_EXITING


def _utf8_safe(text: str) -> tuple[str, bool]:
    """`text` with every code point UTF-8 cannot carry (a lone surrogate, which a cell can put in an
    exception's message) written as its escape, `\\ud800`; and whether there was one. A record holding one
    could not be written, and the stage would stop on it."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8"), True


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
