"""The cell runner: the holder of a trajectory's state, which runs each cell in its namespace like a
notebook cell.

A holder keeps the trajectory's Python namespace and runs the cells in it, in its own process: no fork per
cell (a fork of a process with sympy loaded, and its exit, cost ~5 ms of CPU each, more than the cells of a
math agent take). A trailing bare expression is echoed (`x = 2\\nx+1` prints `3`, a trailing `;` hides it, as
in Jupyter); an error shows the exception line after the last TRACEBACK_FRAMES frames of the cells, none of
the harness. SIGALRM (wall clock) and SIGPROF (CPU time) raise inside the cell. A cell whose result the
supervisor does not keep (a timeout, a death) ends the holder: the supervisor starts a new one and the caller
replays the kept cells. Python threads a cell leaves running are ended at its end (SystemExit raised in
them); a cell whose threads do not stop is ended like a killed one.

The holder talks to its supervisor in JSON messages on two SEQPACKET sockets: commands in ("run"), and out
"result" (a status of STATUSES and the error text). A cell can write to the results socket too, from the
holder's own pid: the supervisor drops what does not parse, and takes a result as the cell's end only once
the holder is idle again, blocked in `serve`'s receive (see `supervisor`). Everything here (the timers, the
echo, the error text) serves an honest cell; no limit depends on it.
"""

from __future__ import annotations

import ast
import builtins
import errno
import fcntl
import json
import linecache
import mmap
import os
import resource
import signal
import socket
import sys
import threading
import traceback

from mathagent.sandbox.budgets import PolledBudget, SessionCgroup, set_oom_score
from mathagent.sandbox.jail import PR_SET_DUMPABLE, drop_privileges, keep_only_fds, prctl, reap, set_process_name
from mathagent.sandbox.protocol import cpu_limit
from mathagent.sandbox.syscalls import install_syscall_filter

TRACEBACK_FRAMES = 2  # frames of a traceback the model sees, innermost last, besides the exception line
# Address space held back from each cell and handed to the harness after it: a cell that ends at the RLIMIT_AS
# (its namespace keeping what it allocated) must not leave the holder unable to format and send its result.
HARNESS_RESERVE_BYTES = 32 << 20
THREAD_STOP_SECONDS = 0.5  # how long the threads a cell left get to end


class _CellTimeout(BaseException):
    """Raised into a cell by SIGALRM (wall clock) or SIGPROF (CPU time); a BaseException so that a cell's
    `except Exception` does not swallow it."""


class Holder:
    """The process that holds a trajectory's namespace and runs its cells."""

    def __init__(self, commands: socket.socket, results: socket.socket, *, printed: int,
                 cgroups: list[SessionCgroup], polled: bool, config: dict, uid: int, isolation: dict):  # fmt: skip
        """Set up in a new holder (forked by S, or by the zygote as the init of its own namespaces, which
        joined its cgroups before: `cgroups` empty): join the session's cgroups, keep only our own files,
        drop every privilege. `printed`: the output memfd; `polled`: the memory budget is S's poll, not a
        cgroup; `config`, `uid`, `isolation`: the session's (jail.drop_privileges)."""
        self.commands, self.results = commands, results
        set_process_name(b"sandbox-holder")
        self.timeout = config["timeout"]
        self.cpu_limit = cpu_limit(self.timeout)  # seconds of CPU a cell's threads may use together
        self.cap = config["max_output_chars"]
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
        self.in_cell = False
        self.reserve: mmap.mmap | None = None
        # A copy of the output memfd out of the way of fds 1 and 2, to point them back at it for each cell.
        self.printed = os.dup(printed)
        for cgroup in cgroups:
            cgroup.join()
        if polled:
            # The polled budget is only as good as the supervisor's looks: a cell's processes must not keep it
            # off the cores (eight of them allocating at once on two cores passed twice the budget).
            os.nice(PolledBudget.NICE)
        earlier_stderr, sys.stderr = sys.stderr, open(2, "w", buffering=1, closefd=False)
        if earlier_stderr.fileno() > 2:
            earlier_stderr.close()  # S's copy of the caller's stderr, not ours
        # The holder's files, by an allow-list: stdio (/dev/null and the output memfd), the memfd's copy, and
        # the two sockets to S. No cgroup file, no other session's socket, no directory of the host's.
        keep_only_fds({0, 1, 2, self.printed, commands.fileno(), results.fileno()})
        drop_privileges(config, uid, isolation)
        if config["syscall_filter"] is not None:
            install_syscall_filter(config["syscall_filter"])
        signal.signal(signal.SIGALRM, self._on_limit)
        signal.signal(signal.SIGPROF, self._on_limit)

    def hold_reserve(self) -> None:
        """Map (without touching: no page is charged) the address space the harness gets after the cell."""
        try:
            self.reserve = mmap.mmap(-1, HARNESS_RESERVE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):  # the namespace already holds nearly the whole RLIMIT_AS
            self.reserve = None

    def release_reserve(self) -> None:
        if self.reserve is not None:
            self.reserve.close()
            self.reserve = None

    def _on_limit(self, signum, frame):
        if self.in_cell:
            self.in_cell = False
            raise _CellTimeout(signum)

    def serve(self) -> None:
        peek = bytearray(1)

        def receive() -> dict:
            # The command's length first (the holder waits in this recvfrom between cells), then exactly it:
            # recv of the largest command would map 4 MB for every command and shrink it again.
            size = self.commands.recv_into(peek, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
            data = self.commands.recv(size) if size else b""
            return json.loads(data) if data else {"kind": "exit"}

        while True:
            command = receive()
            if command["kind"] == "exit":
                os._exit(0)  # the supervisor is gone
            if command["kind"] == "run":
                # What an earlier cell started was killed by the supervisor; until reaped it counts against
                # RLIMIT_NPROC.
                reap()
                self._run(command)

    def _send(self, message: dict) -> None:
        try:
            self.results.send(json.dumps(message).encode())
        except OSError:
            os._exit(0)

    def _run(self, command: dict) -> None:
        seq, code, index = command["seq"], command["code"], command["index"]
        # Dumpable while the cell runs, so that it reads its own /proc/self; an OOM kill in the session takes
        # the cell's processes first (their state is rebuilt by replay either way, see `supervisor`). The
        # scores move only where S could lower ours (oom_scores): raising is always allowed, and going back
        # to the score S set never needs a privilege.
        prctl(PR_SET_DUMPABLE, 1)
        oom_scores = command.get("oom_scores") is True
        if oom_scores:
            set_oom_score(SessionCgroup.OOM_SCORE_CELL)
        os.dup2(self.printed, 1)  # an earlier cell may have closed or redirected them
        os.dup2(self.printed, 2)
        # Line-buffered, so that print()s and what subprocesses write straight to fd 1 keep their order.
        out = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stdout = sys.stderr = out
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        self.hold_reserve()
        status, error = _execute(code, f"<cell {index}>", self.namespace, self)
        if oom_scores:  # while still dumpable: /proc/self is ours
            set_oom_score(SessionCgroup.OOM_SCORE_HOLDER)
        prctl(PR_SET_DUMPABLE, 0)  # until the supervisor has killed them, nothing the cell left may write us
        try:
            out.flush()
        except OSError as e:
            if e.errno == errno.EFBIG and status == "ok":
                status, error = "error", _output_limit_message()
        except ValueError:  # the cell closed sys.stdout
            pass
        # What a failed flush left in the buffer must not be written into a later cell's output when this
        # object is collected there: with its raw file closed, it is dropped silently.
        out.buffer.raw.close()
        if status != "timeout" and len(os.listdir("/proc/self/task")) > 1 and not _stop_threads():
            # The supervisor takes a result only from a holder with one thread: one that keeps others is
            # replaced, and its state with it.
            status, error = "killed", ("SandboxError: the cell left threads running that did not stop; the "
                                       "session's state was reset")
        self._send({"seq": seq, "kind": "result", "status": status, "error": error[-self.cap :]})

    def send_ready(self, isolation: dict) -> None:
        """Tell the supervisor that the holder is set up, and what is in force (before any cell ran)."""
        self._send({"kind": "ready", "isolation": isolation})


def _stop_threads(seconds: float = THREAD_STOP_SECONDS) -> bool:
    """End the Python threads a cell left running: SystemExit raised in each at its next bytecode, again until
    they are gone or `seconds` have passed. Whether the holder has one thread again (a thread blocked in C, or
    one started outside Python, stays)."""
    import ctypes
    import time

    me = threading.get_ident()
    deadline = time.monotonic() + seconds
    while len(os.listdir("/proc/self/task")) > 1:
        if time.monotonic() > deadline:
            return False
        for ident in sys._current_frames():
            if ident != me:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(SystemExit))
        time.sleep(0.002)  # the GIL goes to them; each unwinds and its OS thread ends
    return True


def cell_environment(mark: str, workdir: str) -> dict[str, str]:
    """The environment a cell runs in: a fixed minimal one, nothing of the caller's."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MATHAGENT_SANDBOX": mark}


def output_memfd() -> int:
    """A new output file for a holder's cells (fd 1 and 2 of each), written in append mode."""
    printed = os.memfd_create("cell-output", 0)
    fcntl.fcntl(printed, fcntl.F_SETFL, os.O_APPEND)
    return printed


def prepare_cell_process(mark: str, workdir: str, printed: int | None = None) -> int:
    """Make this process's surroundings those of a cell, for the holder it is or will fork: a clean
    environment, the work directory, stdin at end of file, fd 1 and 2 the output memfd (`printed`, made here
    if None, and returned): the supervisor reads what a cell printed even after killing it, and what
    subprocesses print lands there too. A write past the file-size cap fails with EFBIG, not a signal."""
    environment = cell_environment(mark, workdir)
    if os.environ.copy() != environment:  # the zygote sets it once where every holder's is the same
        os.environ.clear()
        os.environ.update(environment)
    os.chdir(workdir)
    if printed is None:
        printed = output_memfd()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(printed, 1)
    os.dup2(printed, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return printed


def _printed_size() -> int:
    try:
        return os.fstat(1).st_size
    except OSError:
        return 0


def _output_limit_message() -> str:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20
    return f"OSError: the cell printed more than {limit} MB and was stopped"


def _execute(code: str, filename: str, namespace: dict, holder: Holder) -> tuple[str, str]:
    """Run `code` in `namespace` like a notebook cell; (status, error text)."""
    me = os.getpid()
    echo = None
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, holder.timeout)
            signal.setitimer(signal.ITIMER_PROF, holder.cpu_limit)
            holder.in_cell = True
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            tree = ast.parse(code, filename, "exec")
            if tree.body and isinstance(tree.body[-1], ast.Expr) and not _silenced(tree.body[-1], code):
                echo = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), namespace)
            if echo is not None:
                value = eval(compile(echo, filename, "eval"), namespace)
                if value is not None:
                    print(repr(value), file=sys.stdout)
        finally:
            holder.in_cell = False
            holder.release_reserve()
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.setitimer(signal.ITIMER_PROF, 0)
            if os.getpid() != me:  # a process the cell forked ran off its end: it must not act as us
                os._exit(0)
    except _CellTimeout as e:
        if e.args[0] == signal.SIGPROF:
            return "timeout", f"TimeoutError: the cell used more than {holder.cpu_limit} s of CPU time"
        return "timeout", f"TimeoutError: the cell ran longer than {holder.timeout:g} s"
    except MemoryError as e:
        return "memory", _format_error(e) if str(e) else (
            f"MemoryError: the cell needed more than the sandbox's "
            f"{resource.getrlimit(resource.RLIMIT_AS)[0] >> 20} MB"
        )
    except OSError as e:
        if e.errno == errno.EFBIG and _printed_size() >= resource.getrlimit(resource.RLIMIT_FSIZE)[0]:
            return "error", _output_limit_message()
        return "error", _format_error(e)
    except BaseException as e:
        return "error", _format_error(e)
    return "ok", ""


def _silenced(statement: ast.stmt, code: str) -> bool:
    """A trailing `;` hides a cell's last value, as in Jupyter."""
    line = code.splitlines()[statement.end_lineno - 1].encode()  # AST columns count UTF-8 bytes
    return line[statement.end_col_offset :].lstrip().startswith(b";")


def _format_error(exception: BaseException) -> str:
    """The exception line, after the last TRACEBACK_FRAMES frames from the cells (none of the harness)."""
    report = traceback.TracebackException.from_exception(exception)
    frames = list(report.stack)
    first = next((i for i, frame in enumerate(frames) if frame.filename.startswith("<cell ")), len(frames))
    report.stack = traceback.StackSummary.from_list(frames[first:][-TRACEBACK_FRAMES:])
    return "".join(report.format(chain=False))
