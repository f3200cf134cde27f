"""The caller's side of the sandbox: `Sandbox`, a pool of sessions, one per live trajectory, and the
caller's end of each session's socket.

`run` hands each cell to its trajectory's session, starting one (from a spare of the zygote's) when there is
none. A trajectory this Sandbox does not know (read back from a file by a new process), or whose session was
lost or evicted, is rebuilt by replaying `Cell.history` with its output discarded. Cells that timed out or
were killed here are skipped in that replay: they left no trace, so skipping them is exact.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from mathagent.sandbox.protocol import FRAME, GRACE_SECONDS, STATUSES

# The zygote's program, run by path: under `python -I` the package may not be importable by name (see there).
_ZYGOTE_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")
_MAX_FRAME = 64 << 20


@dataclass(frozen=True)
class Cell:
    session: str  # the trajectory id; state persists across the cells of one session
    history: tuple[str, ...]  # code of this session's earlier cells, in order, each already executed once
    code: str  # the cell to run now


@dataclass(frozen=True)
class CellResult:
    output: str  # what the model sees: printed text, then the error if any, cut to the cap with a marker
    status: str  # one of STATUSES
    seconds: float  # wall time of the cell itself, fork included, replay excluded
    replayed: int = 0  # history cells run first because the session's state was not here
    cut: bool = False  # `output` was cut to the cap (printed text cut, or the error's first lines dropped)
    escaped: bool = False  # `output` had code points UTF-8 cannot carry (lone surrogates), written as escapes


class _SessionLost(Exception):
    """The session supervisor died or stopped answering; its state is gone."""


class Sandbox:
    """A pool of isolated Python sessions, one per live trajectory, forked from a zygote that preloaded the
    math modules. `run` is thread-safe; at most `workers` cells run at once (default: one per core)."""

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout: float = 10.0,
        memory_mb: int = 2048,
        max_output_chars: int = 2000,
        network: bool = False,
        max_processes: int = 64,
        max_file_mb: int = 16,
        max_sessions: int | None = None,
        cgroup: bool = True,
        cpus: float | None = 1.0,
    ):
        from mathagent.errors import UserError

        workers = workers or os.cpu_count() or 1
        max_sessions = max_sessions or _default_max_sessions()
        for name, value, low in (
            ("workers", workers, 1), ("timeout", timeout, 0.01), ("memory_mb", memory_mb, 64),
            ("max_output_chars", max_output_chars, 80), ("max_processes", max_processes, 4),
            ("max_file_mb", max_file_mb, 1), ("max_sessions", max_sessions, 1), ("cpus", cpus or 0.01, 0.01),
        ):  # fmt: skip
            if value < low:
                raise UserError(f"sandbox {name} must be at least {low}, got {value}")
        if not sys.platform.startswith("linux"):
            raise UserError("the sandbox needs Linux (namespaces, prctl, memfd)")
        self.workers = workers
        self.timeout = float(timeout)
        self.max_sessions = max_sessions
        self._config = {
            "timeout": self.timeout,
            "memory_mb": memory_mb,
            "max_output_chars": max_output_chars,
            "network": network,
            "max_processes": max_processes,
            "max_file_mb": max_file_mb,
            "spares": workers,
            # One memory cgroup per session where the machine allows it; False: the supervisor's polled
            # budget everywhere (what a machine without a writable memory cgroup gets).
            "cgroup": cgroup,
            # Cores' worth of CPU time a session's processes get together (a cgroup quota where the machine
            # allows it); None: no quota.
            "cpus": cpus,
            # Tests find a sandbox's processes by this mark in their environment.
            "mark": f"{os.getpid()}-{os.urandom(4).hex()}",
        }
        self.isolation: dict | None = None  # what the first session reported was in force
        self.stats = collections.Counter()  # cells, replayed, sessions, zygotes, lost
        self._closed = False
        self._lock = threading.Lock()  # guards _sessions and stats
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._zygote_lock = threading.Lock()
        self._zygote: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self._start_zygote()

    # -- the caller's API ---------------------------------------------------------------------------------

    def run(self, cells: Sequence[Cell]) -> list[CellResult]:
        """Run `cells` concurrently (cells of one session in order); results come back in input order."""
        if self._closed:
            raise RuntimeError("run() on a closed Sandbox")
        by_session: dict[str, list[int]] = {}
        for i, cell in enumerate(cells):
            by_session.setdefault(cell.session, []).append(i)
        futures = {
            session: self._pool.submit(self._run_in_order, [cells[i] for i in indices])
            for session, indices in by_session.items()
        }
        results: list[CellResult | None] = [None] * len(cells)
        for session, indices in by_session.items():
            for i, result in zip(indices, futures[session].result()):
                results[i] = result
        return results  # type: ignore[return-value]

    def submit(self, cell: Cell) -> Future:
        """Run one cell in the background; a future of its CellResult. One cell of a session at a time: the
        caller submits a session's next cell once its previous result is back."""
        if self._closed:
            raise RuntimeError("submit() on a closed Sandbox")
        return self._pool.submit(self._run_cell, cell)

    @property
    def mark(self) -> str:
        """The value of MATHAGENT_SANDBOX in the environment of every process of this sandbox: how to find them."""
        return self._config["mark"]

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    def live_sessions(self) -> set[str]:
        """The trajectories that hold a session now."""
        with self._lock:
            return set(self._sessions)

    def reserve(self, sessions: int) -> None:
        """`sessions` new trajectories will soon run their first cells: have their sessions started now, in
        the background (while the caller's engine generates their actions), instead of one by one as each
        first cell arrives. Counts down as sessions are handed out; a later call replaces it."""
        if self._closed:
            return
        with self._lock:
            room = self.max_sessions - len(self._sessions)
        with self._zygote_lock:
            try:
                self._control.send(f"reserve {max(0, min(sessions, room))}".encode())
            except OSError:
                pass  # a dead zygote is replaced at the next spawn

    def forget(self, session: str) -> None:
        """The trajectory is finished: end its session process and free its state."""
        with self._lock:
            record = self._sessions.pop(session, None)
        if record is not None:
            with record.lock:
                record.end()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            records = list(self._sessions.values())
            self._sessions.clear()
        for record in records:
            record.end()  # without the lock: a cell in flight sees its session die and returns "killed"
        self._pool.shutdown(wait=True)
        with self._zygote_lock:
            self._stop_zygote()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sessions -------------------------------------------------------------------------------------------

    def _run_in_order(self, cells: list[Cell]) -> list[CellResult]:
        return [self._run_cell(cell) for cell in cells]

    def _record(self, session: str) -> _Session:
        evicted = None
        with self._lock:
            record = self._sessions.get(session)
            if record is None:
                if len(self._sessions) >= self.max_sessions:
                    # Least recently used first; it is replayed from its history if it comes back.
                    for name, other in self._sessions.items():
                        if not other.lock.locked():
                            evicted = self._sessions.pop(name)
                            break
                record = self._sessions[session] = _Session()
            self._sessions.move_to_end(session)
        if evicted is not None:
            with evicted.lock:
                evicted.end()
        return record

    def _run_cell(self, cell: Cell) -> CellResult:
        record = self._record(cell.session)
        with record.lock:
            for attempt in range(3):
                if record.process is None:
                    record.process = self._spawn()
                    record.ran = []
                history = list(cell.history)
                if record.ran == history:
                    reset, todo = False, []
                elif record.ran == history[: len(record.ran)]:
                    reset, todo = False, list(range(len(record.ran), len(history)))
                else:  # the state holds cells this history does not: start over
                    reset, todo = True, list(range(len(history)))
                    record.rolled_back.clear()
                replay = [i for i in todo if i not in record.rolled_back]
                request = {
                    "reset": reset,
                    "cells": [{"code": history[i], "index": i + 1, "output": False} for i in replay]
                    + [{"code": cell.code, "index": len(history) + 1, "output": True}],
                }
                started = False
                try:
                    record.process.send(request)
                    for i in replay:
                        reply = self._counted(record.process.receive(self._deadline()))
                        if not reply["kept"]:
                            record.rolled_back.add(i)
                        if reply.get("lost"):
                            raise _SessionLost("state lost during replay")
                    started = True
                    reply = self._counted(record.process.receive(self._deadline()))
                except _SessionLost:
                    # The cells known to leave no trace (rolled_back) are still skipped when replaying.
                    record.process.kill()
                    record.process, record.ran = None, []
                    with self._lock:
                        self.stats["lost"] += 1
                    if not started:
                        continue  # nothing of this cell ran yet: replay into a fresh session
                    return CellResult(
                        "SandboxError: the cell's session stopped answering and was ended", "killed", 0.0
                    )
                record.ran = history + [cell.code]
                if not reply["kept"]:
                    record.rolled_back.add(len(history))
                if reply.get("lost"):  # the cell failed and took the holder's state with it: replay next time
                    record.ran = []
                with self._lock:
                    self.stats["cells"] += 1
                    self.stats["replayed"] += len(replay)
                return CellResult(reply["output"], reply["status"], reply["seconds"], replayed=len(replay),
                                  cut=reply.get("cut") is True, escaped=reply.get("escaped") is True)
        # The session died three times replaying this history: an error for this trajectory alone, not for
        # the stage (the other trajectories' cells go on).
        return CellResult("SandboxError: the session died three times while replaying this trajectory's earlier "
                          "cells", "killed", 0.0)

    def _counted(self, reply: dict) -> dict:
        """Count what a session reports beside the cell: OOM-score changes the kernel refused."""
        failures = reply.get("oom_score_failures")
        if isinstance(failures, int) and failures > 0:
            with self._lock:
                self.stats["oom_score_failures"] += failures
                if self.isolation is not None:
                    self.isolation["oom_score_failures"] = self.stats["oom_score_failures"]
        return reply

    def _deadline(self) -> float:
        # The supervisor enforces `timeout` itself; this is the watchdog for a supervisor that hangs.
        return time.monotonic() + self.timeout * 1.5 + GRACE_SECONDS + 10.0

    # -- the zygote -----------------------------------------------------------------------------------------

    def _start_zygote(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": "/",
            # One thread per BLAS: the pool already runs one cell per core, and threads would make the
            # address-space cap count their stacks.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MATHAGENT_SANDBOX": self._config["mark"],
        }
        config = dict(self._config, control_fd=theirs.fileno())
        self._zygote = subprocess.Popen(
            [sys.executable, "-I", "-B", _ZYGOTE_MAIN, json.dumps(config)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the caller's stdout may carry records: nothing may leak into it
            env=env,
            cwd="/",
            start_new_session=True,  # a Ctrl-C meant for the caller is not sent to the sandbox
        )
        theirs.close()
        self._control = ours
        self._zygote_ready = False
        self.stats["zygotes"] += 1

    def _stop_zygote(self) -> None:
        if self._control is not None:
            self._control.close()  # the zygote exits on EOF; its launchers and sessions die with it
            self._control = None
        if self._zygote is not None:
            try:
                self._zygote.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()
            self._zygote = None

    def _spawn(self) -> _Process:
        for attempt in range(2):
            with self._zygote_lock:
                if self._closed:
                    raise RuntimeError("run() on a Sandbox closed meanwhile")
                try:
                    if not self._zygote_ready:
                        self._control.settimeout(120)
                        ready = json.loads(self._control.recv(1 << 16) or b"null")
                        if not ready:
                            raise OSError("the zygote exited while starting")
                        self._zygote_ready = True
                    self._control.settimeout(30)
                    self._control.send(b"spawn")
                    _, fds, _, _ = socket.recv_fds(self._control, 1 << 16, 1)
                    if not fds:
                        raise OSError("the zygote did not answer")
                except OSError:
                    # A dead or hung zygote is replaced; its sessions die with it and are replayed.
                    self._stop_zygote_after_failure()
                    continue
            with self._lock:
                self.stats["sessions"] += 1
            process = _Process(socket.socket(fileno=fds[0]))
            ready = process.wait_ready()
            if self.isolation is None:
                # The holder's OOM score is lowered where there is a memory cgroup; the replies say how often
                # the kernel refused (`_counted`).
                self.isolation = dict(ready["isolation"], oom_score_failures=self.stats["oom_score_failures"])
            return process
        raise RuntimeError("the sandbox zygote failed twice; its stderr above says why")

    def _stop_zygote_after_failure(self) -> None:
        if self._zygote is not None:
            self._zygote.kill()
        self._stop_zygote()
        self._start_zygote()


SESSION_MEMORY_MB = 16  # what a live idle session holds, at most (S and the holder, mostly pages shared with the zygote)


def _default_max_sessions() -> int:
    """As many live sessions as half of the memory available now holds, between 64 and 1024. A rollout keeps
    one per live trajectory; past the limit the least recently used is ended and replayed when it returns,
    which cost a 512-trajectory rollout twice its session start-ups at the old fixed 256."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) >> 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 256
    return max(64, min(1024, available // 2 // SESSION_MEMORY_MB))


class _Session:
    """The caller's record of one trajectory: its supervisor process and which cells its state holds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.process: _Process | None = None
        self.ran: list[str] = []  # code of the cells the state went through, rolled back ones included
        self.rolled_back: set[int] = set()  # indices into `ran` of cells that left no trace

    def end(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None
        self.ran, self.rolled_back = [], set()


class _Process:
    """The caller's end of one session supervisor: a stream socket of length-prefixed JSON, and a pidfd."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pidfd: int | None = None

    def wait_ready(self) -> dict:
        self.sock.settimeout(30)
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, FRAME.size, 1)
        except OSError as e:
            self.kill()
            raise RuntimeError(f"a sandbox session failed to start: {e}") from e
        if fds:
            self.pidfd = fds[0]
        if len(data) != FRAME.size:
            self.kill()
            raise RuntimeError("a sandbox session failed to start; its stderr above says why")
        try:
            return json.loads(self._read_exactly(FRAME.unpack(data)[0], time.monotonic() + 30))
        except _SessionLost as e:
            self.kill()
            raise RuntimeError("a sandbox session failed to start; its stderr above says why") from e

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        try:
            self.sock.settimeout(30)
            self.sock.sendall(FRAME.pack(len(data)) + data)
        except OSError as e:
            raise _SessionLost(str(e)) from e

    def receive(self, deadline: float) -> dict:
        (size,) = FRAME.unpack(self._read_exactly(FRAME.size, deadline))
        if size > _MAX_FRAME:
            raise _SessionLost("oversized reply")
        try:
            reply = json.loads(self._read_exactly(size, deadline))
        except (ValueError, RecursionError) as e:
            raise _SessionLost("unreadable reply") from e
        if (
            not isinstance(reply, dict)
            or reply.get("status") not in STATUSES
            or not isinstance(reply.get("kept"), bool)
        ):
            raise _SessionLost("malformed reply")
        return reply

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _SessionLost("no answer before the deadline")
            try:
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(min(size - got, 1 << 20))
            except OSError as e:  # socket.timeout is an OSError
                raise _SessionLost(str(e)) from e
            if not chunk:
                raise _SessionLost("the session closed its socket")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        # SIGKILL to the pid-namespace init takes every process of the trajectory with it; the pidfd makes
        # sure the signal cannot reach an unrelated process that reused a pid.
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self.pidfd)
            self.pidfd = None
        self.sock.close()
