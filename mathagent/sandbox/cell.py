"""The cell runner: the holder of a trajectory's state, and a cell run in a fork of it like a notebook cell.

A holder keeps the trajectory's Python namespace; for each cell it forks a process (ahead of time, while the
model writes the cell) that runs the code in a copy of that namespace. A trailing bare expression is echoed
(`x = 2\\nx+1` prints `3`, a trailing `;` hides it, as in Jupyter); an error shows the exception line after
the last TRACEBACK_FRAMES frames of the cells, none of the harness. SIGALRM (wall clock) and SIGXCPU (the
RLIMIT_CPU) raise inside the cell. If the supervisor keeps the result, the cell's process is the next
holder; otherwise the holder, waiting, reports how the cell's process died.

The chain talks to its supervisor in JSON messages on two SEQPACKET sockets: commands in ("prefork", "run"),
and out "started", "result" (a status of STATUSES and the error text) and "died" (`died`). A cell can write
to the results socket too, so the supervisor goes by the sender's pid as the kernel reports it and drops what
does not parse.
"""

from __future__ import annotations

import ast
import builtins
import errno
import json
import linecache
import os
import resource
import signal
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING

from mathagent.sandbox.jail import (
    PR_SET_DUMPABLE,
    MemoryCgroup,
    PolledBudget,
    drop_privileges,
    prctl,
    reap,
    set_oom_score,
)

if TYPE_CHECKING:
    from mathagent.sandbox.supervisor import Supervisor

STATUSES = ("ok", "error", "memory", "timeout", "killed")
TRACEBACK_FRAMES = 2  # frames of a traceback the model sees, innermost last, besides the exception line
MAX_CODE_BYTES = 4 << 20  # the largest cell the supervisor hands to a holder (one SEQPACKET message)


def died(pid: int, status: int | None) -> dict:
    """The message that says how a cell's process ended, from its wait status."""
    message = {"kind": "died", "pid": pid, "code": None, "signal": None}
    if status is not None and os.WIFEXITED(status):
        message["code"] = os.WEXITSTATUS(status)
    elif status is not None and os.WIFSIGNALED(status):
        message["signal"] = os.WTERMSIG(status)
    return message


class _CellTimeout(BaseException):
    """Raised into a cell by SIGALRM (wall clock) or SIGXCPU (CPU time); a BaseException so that a cell's
    `except Exception` does not swallow it."""


class Holder:
    """A process of the chain: it holds a trajectory's namespace and forks a child for each cell."""

    def __init__(self, supervisor: Supervisor, commands: socket.socket, results: socket.socket):
        self.commands, self.results = commands, results
        self.timeout = supervisor.timeout
        self.cap = supervisor.cap
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
        self.in_cell = False
        # A copy of the output memfd out of the way of fds 1 and 2, to point them back at it for each cell.
        self.printed = os.dup(supervisor.printed)
        self.oom_scores = supervisor.cgroup is not None
        if supervisor.cgroup is not None:
            supervisor.cgroup.join()
        else:
            # The polled budget is only as good as the supervisor's looks: a cell's processes must not keep it
            # off the cores (eight of them allocating at once on two cores passed twice the budget).
            os.nice(PolledBudget.NICE)
        drop_privileges(supervisor.config, supervisor.uid, supervisor.isolation)
        signal.signal(signal.SIGALRM, self._on_limit)
        signal.signal(signal.SIGXCPU, self._on_limit)

    def _on_limit(self, signum, frame):
        if self.in_cell:
            self.in_cell = False
            raise _CellTimeout(signum)

    def serve(self) -> None:
        buffer = bytearray(MAX_CODE_BYTES + (1 << 16))

        def receive() -> dict:
            size = self.commands.recv_into(buffer)
            return json.loads(buffer[:size]) if size else {"kind": "exit"}

        while True:
            command = receive()
            if command["kind"] == "exit":
                os._exit(0)  # the supervisor is gone
            # Not dumpable, from before the fork: the checkpoint's memory is out of reach of the cell (same uid)
            # through /proc/PID/mem or ptrace. The cell's own process is dumpable, to read its /proc/self.
            prctl(PR_SET_DUMPABLE, 0)
            pid = self._fork()
            if pid == 0:
                prctl(PR_SET_DUMPABLE, 1)
                if self.oom_scores:
                    set_oom_score(MemoryCgroup.OOM_SCORE_CELL)
                if command["kind"] == "prefork":  # forked ahead of time: now wait for the cell
                    self._warm_up()
                    command = receive()
                    if command["kind"] != "run":
                        os._exit(0)
                self._run(command)  # this process is the new holder, if the supervisor keeps it
                continue
            # A checkpoint until the cell's process dies; killed instead if the cell's process takes over.
            status = None
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._send(died(pid, status))

    def _fork(self) -> int:
        # The processes a cell left were killed, but until reaped they count against RLIMIT_NPROC.
        for attempt in range(100):
            reap()
            try:
                return os.fork()
            except BlockingIOError:
                time.sleep(0.01)
        return os.fork()

    def _warm_up(self) -> None:
        """After the fork every page is shared copy-on-write with the holder, and the first write to each
        costs a page copy (a few microseconds in a VM, hundreds of them per cell). Take those copies now,
        while nobody waits: freeze what the collector tracks (or its first pass writes to every object)
        and go once through the path a cell takes."""
        import gc

        gc.freeze()
        json.loads(json.dumps({"seq": 0, "kind": "result", "status": "ok", "error": "", "code": "None"}))
        out = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        _execute("None", "<warm-up>", {"__builtins__": builtins}, self)
        out.close()
        linecache.cache.pop("<warm-up>", None)

    def _send(self, message: dict) -> None:
        try:
            self.results.send(json.dumps(message).encode())
        except OSError:
            os._exit(0)

    def _run(self, command: dict) -> None:
        seq, code, index = command["seq"], command["code"], command["index"]
        self._send({"seq": seq, "kind": "started"})
        os.dup2(self.printed, 1)  # an earlier cell may have closed or redirected them
        os.dup2(self.printed, 2)
        # Line-buffered, so that print()s and what subprocesses write straight to fd 1 keep their order.
        out = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stdout = sys.stderr = out
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        status, error = _execute(code, f"<cell {index}>", self.namespace, self)
        if self.oom_scores:  # this process may be the next holder (while still dumpable: /proc/self is ours)
            set_oom_score(MemoryCgroup.OOM_SCORE_HOLDER)
        prctl(PR_SET_DUMPABLE, 0)  # this process may be the next holder: nothing the cell left may write it
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
        result = {"seq": seq, "kind": "result", "status": status, "error": error[-self.cap :]}
        if status != "timeout" and len(os.listdir("/proc/self/task")) > 1:
            # The cell left threads running. Python cannot stop a thread, so a fork of this process (which has
            # only the forking thread) holds the state from here on, and the supervisor kills this one.
            successor = os.fork()
            if successor == 0:
                return  # back to serve(): the new holder
            result["successor"] = successor
            self._send(result)
            while True:
                signal.pause()
        self._send(result)


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
            signal.setitimer(signal.ITIMER_REAL, 0)
            if os.getpid() != me:  # a process the cell forked ran off its end: it must not act as us
                os._exit(0)
    except _CellTimeout as e:
        if e.args[0] == signal.SIGXCPU:
            limit = resource.getrlimit(resource.RLIMIT_CPU)[0]
            return "timeout", f"TimeoutError: the cell used more than {limit} s of CPU time"
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
