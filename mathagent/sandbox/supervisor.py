"""S, the supervisor of one session: the trusted process between the caller and the trajectory's cells,
which runs no model code. The zygote (`zygote`) forks it, as root and the init of the session's pid
namespace, or through a launcher. S enters its other namespaces (`jail`), mounts the session's file system,
keeps the holder (`cell.Holder`, replaced after a failed cell), hands each cell to it and answers the caller:
one JSON reply per cell, after its length (`protocol.FRAME`), with a status of `protocol.STATUSES`.

A cell runs in the holder's own process, so nothing the holder says about a cell can be trusted: the cell
can send a result from the holder's pid and keep running. What S decides from outside instead: the wall
deadline and the session's CPU time (read from /proc, every process of the namespace), and the cell's end.
A result counts only once the holder is idle, one thread blocked receiving its next command; S then stops
it (SIGSTOP, which no process can catch) and kills everything else in the namespace, and continues it with
the next cell. A cell that sent a result and went on computing is a timeout; between cells nothing of a
session runs.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import platform
import select
import signal
import socket
import struct
import sys
import time
import traceback

from mathagent.sandbox.budgets import PolledBudget, SessionCgroup, set_oom_score
from mathagent.sandbox.cell import Holder
from mathagent.sandbox.jail import PR_SET_PDEATHSIG, isolate, keep_only_fds, kill, prctl, reap, set_process_name
from mathagent.sandbox.protocol import FRAME, GRACE_SECONDS, KEPT_STATUSES, MAX_CODE_BYTES, STATUSES

CPU_CHECK_SECONDS = 0.1  # how often S reads the session's CPU time while a cell runs
_SO_SNDBUFFORCE = 32
_PF_EXITING = 0x4  # in /proc/PID/stat's flags: the process is in exit()
# The call an idle holder is blocked in, as /proc/PID/syscall names it: recvfrom(2), which Python's
# socket.recv makes on a blocking socket.
_RECV_CALLS = {"x86_64": "45", "aarch64": "207"}


class Supervisor:
    """S: the trusted process of one trajectory. It runs no model code; it keeps the holder chain, hands
    cells to it, decides when each has ended (the deadline, the CPU time, the holder idle and stopped),
    kills what cells leave behind and answers the caller."""

    def __init__(self, config: dict, caller: socket.socket, uid: int, namespaces: int, workdir: str | None,
                 cgroups: list[SessionCgroup], notes: list[str]):  # fmt: skip
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        set_process_name(b"sandbox-S")
        # Only what this session needs crosses into it: whatever else the zygote or launcher held (other
        # sessions' sockets, cgroup directories of the host's mount namespace) is closed here, before the
        # holder is forked.
        keep_only_fds({0, 1, 2, caller.fileno(), *(fd for cgroup in cgroups for fd in cgroup.fds())})
        self.config = config
        self.cgroups = cgroups
        self.memory = next((cgroup for cgroup in cgroups if cgroup.events is not None), None)
        self.caller = caller
        self.uid = uid
        self.timeout = config["timeout"]
        self.cpu_limit = math.ceil(self.timeout) + 1  # seconds of CPU a cell's processes may use together
        self.cap = config["max_output_chars"]
        self.output_limit = config["max_file_mb"] << 20
        os.setsid()  # our own process group and session: kill(0) from a cell reaches nobody outside
        self.isolation, self.workdir = isolate(config, uid, namespaces, workdir)
        if self.isolation["mount_namespace"]:
            mounts, directories = [path for path in ("/tmp", "/dev/shm") if os.path.isdir(path)], []
        else:
            mounts, directories = [], [self.workdir]
        self.polled = None if self.memory else PolledBudget(config["memory_mb"] << 20, mounts, directories)
        self.isolation["memory"] = f"cgroup v{self.memory.version}" if self.memory else "polled"
        quota = next((cgroup for cgroup in cgroups if cgroup.cpus is not None), None)
        cpus = config["cpus"]
        self.isolation["cpu"] = (f"{cpus:g} core{'s' if cpus != 1 else ''} (cgroup v{quota.version})" if quota
                                 else "no quota (no writable cpu cgroup)" if cpus else "no quota")  # fmt: skip
        for note in notes:
            key = "memory" if note.startswith("no memory") else "cpu"
            self.isolation[key] += f" ({note})"
        self.isolation["seccomp"] = config["syscall_filter_note"]
        self.isolation["uids"] = config["uid_source"]
        # The holder's idle state, as S reads it from /proc (root reads any process's; elsewhere a holder
        # that is not dumpable hides it, and S goes by its thread count and sleep alone).
        self.recv_call = _RECV_CALLS.get(platform.machine()) if os.geteuid() == 0 or self.isolation[
            "user_namespace"] else None  # fmt: skip
        self.isolation["cell_end"] = ("decided by the supervisor: deadline and CPU time read from outside, "
                                      "a result counts once the holder is idle, stopped between cells")
        if self.recv_call is None:
            self.isolation["cell_end"] += " (idle: one sleeping thread; its system call unreadable here)"
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
        self.holder, self.holder_pidfd, self.holder_commands = 0, None, -1
        self.stopped = False  # the holder is stopped (SIGSTOP) until its next cell
        self.cpu_mark = 0.0  # the session's CPU time when the holder was stopped
        self.oom_scores = False  # the holder's OOM score was lowered: it raises it while a cell runs
        self.oom_score_failures = 0  # since the last reply
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
        if self.holder_pidfd is not None:
            os.close(self.holder_pidfd)
            self.holder_pidfd = None
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
                for sock in (commands, results, self.caller):
                    sock.close()
                Holder(chain_commands, chain_results, printed=self.printed, cgroups=self.cgroups,
                       polled=self.polled is not None, config=self.config, uid=self.uid,
                       isolation=self.isolation, cpu_limit=self.cpu_limit).serve()  # it closes our other fds
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        self.holder_commands = chain_commands.fileno()  # the same number in the holder and its successors
        chain_commands.close()
        chain_results.close()
        self.commands, self.results, self.holder = commands, results, pid
        self.holder_pidfd = os.pidfd_open(pid)
        self.stopped = False
        if self.memory is not None:
            # Set by S, which is root: lowering a score needs CAP_SYS_RESOURCE, and a score set so is the
            # lowest the holder may set itself later, when a cell has ended.
            self.oom_scores = set_oom_score(SessionCgroup.OOM_SCORE_HOLDER, pid)
            self.oom_score_failures += not self.oom_scores

    def _processes(self) -> dict[int, tuple[int, bool, int]]:
        """pid -> (parent pid, alive, CPU clock ticks) for every process under us (in a pid namespace: all of
        /proc). A zombie, or a process already in exit() (it may have closed its files but not yet be a
        zombie), is not alive: it runs no more code. The ticks are its own and its collected children's."""
        table = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rindex(b")") + 2 :].split()
                state, parent, flags = fields[0], int(fields[1]), int(fields[6])
                ticks = sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
                table[int(name)] = (parent, state not in b"ZX" and not flags & _PF_EXITING, ticks)
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
        """The CPU time the session's processes have used, living and ended: what a cell's threads, children
        and daemons take is all here, wherever the cell moved it."""
        collected = os.times()
        ticks = sum(info[2] for info in processes.values())
        return ticks / os.sysconf("SC_CLK_TCK") + collected.children_user + collected.children_system

    def _kill_all_but(self, keep: set[int]) -> dict[int, tuple[int, bool, int]]:
        """SIGKILL every process under us except `keep`, and return once none of them runs any more; the
        process table as it is then."""
        for attempt in itertools.count():
            reap()
            processes = self._processes()
            victims = [pid for pid, (_, alive, _) in processes.items() if alive and pid not in keep]
            if not victims:
                return processes
            for pid in victims:
                kill(pid)
            if attempt > 2:
                time.sleep(min(0.001 * attempt, 0.05))  # a process in uninterruptible sleep: give it time
            if attempt > 200:
                print(f"sandbox: processes {victims} survive SIGKILL", file=sys.stderr)
                return processes

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
        except OSError:
            return False
        return len(call) > 1 and call[0] == self.recv_call and int(call[1], 16) == self.holder_commands

    def _stop(self, pid: int) -> None:
        """Stop the idle holder until its next cell, and kill everything else of the session.

        SIGSTOP cannot be caught, blocked or ignored, and a task blocked in a system call that has it pending
        runs no user code again before it is continued: the kernel handles every pending signal before it
        returns to user space, so even a handler the cell installed for a signal already pending is not
        entered first. A process the cell left could continue the holder before it is killed; the second
        SIGSTOP, with nobody left to send SIGCONT, settles it. The session's CPU time is read here too:
        nothing of it runs until the next cell, which starts from this mark."""
        kill(pid, signal.SIGSTOP)
        processes = self._kill_all_but({pid})
        kill(pid, signal.SIGSTOP)
        self.stopped, self.cpu_mark = True, self._cpu_seconds(processes)

    def _resume(self) -> None:
        if self.stopped:
            kill(self.holder, signal.SIGCONT)
            self.stopped = False

    def _take_successor(self, successor: int) -> None:
        """The holder's thread-free fork holds the state from now on (see cell.Holder)."""
        os.close(self.holder_pidfd)
        self.holder, self.holder_pidfd = successor, os.pidfd_open(successor)

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
            # namespace, and the caller replays the cells that were kept (client).
            self._start_chain()
            lost = True
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
                holder = result.get("successor", self.holder)
                if self._idle(holder):
                    if holder != self.holder:
                        self._take_successor(holder)
                    self._stop(holder)
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
                    return "died", self._own_child_died(self.holder, wait=0.1)
                message, sender = self._receive()
                if sender == -1:  # every process of the chain is gone
                    return "died", self._own_child_died(self.holder, wait=0.1)
                if (result is None and message is not None and message.get("kind") == "result"
                        and message.get("seq") == seq and sender == self.holder and _valid_result(message)):
                    if message["status"] not in KEPT_STATUSES:
                        return "result", message  # the holder's own timeout: the chain is replaced anyway
                    result = message
                    if not self._valid_successor(result):
                        result.pop("successor", None)

    def _valid_successor(self, result: dict) -> bool:
        """A successor the holder named is a child of the holder's (else the holder itself must go idle)."""
        successor = result.get("successor")
        return isinstance(successor, int) and self._processes().get(successor, (0, False, 0))[0] == self.holder

    def _own_child_died(self, pid: int, wait: float = 0.0) -> dict | None:
        """How `pid` ended, if it is our child: a holder's successor becomes ours when the holder dies."""
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
