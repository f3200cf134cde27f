"""Running model-written code: the executor that turns an action a_h into its observation o_h.

An action of the agent is text plus a ```python cell; the cell runs here and what it printed, plus the error
if any, is what the model observes. Cells of one trajectory share a Python namespace, like a notebook: names
defined in turn 1 are visible in turn 3, and a trailing bare expression is echoed (`x = 2\\nx+1` shows `3`).

    with Sandbox(timeout=10, memory_mb=2048) as sandbox:
        results = sandbox.run([Cell("traj-7", history=(), code="import sympy\\nsympy.sqrt(8)")])
        results[0].output  # '2*sqrt(2)'
        sandbox.forget("traj-7")

Model-written code is hostile, so it never runs in the caller's process. The processes:

    zygote Z (imports sympy, numpy once) --fork--> launcher --fork--> supervisor S, one per trajectory
    caller threads <------------- socket ---------------------------> S: root, pid 1 of its own pid,
                                                                      network and mount namespaces
                                          holder: the namespace, a uid of its own <--fork-- S
                      the next cell's process, forked ahead of time <--fork-- holder

Every cell runs in a fresh fork of the process that holds the trajectory's state (the "holder"). When the cell
finishes, its process becomes the new holder and S kills everything else in the trajectory's pid namespace:
the old holder, and whatever the cell started, daemons that double-forked and called setsid included. When
the cell times out or its process dies, S kills the cell's process instead and the old holder stays: the
cell leaves no trace in the state (files it wrote stay). Cells that merely raise keep their partial effects,
as in a notebook.

A trajectory this Sandbox does not know (read back from a file by a new process) or whose session was lost
is rebuilt by replaying `history` with its output discarded. Cells that timed out or were killed here are
skipped in that replay: they left no trace, so skipping them is exact.

Statuses of a CellResult:
    ok       the cell ran to its end
    error    it raised (SystemExit included); the traceback's last lines are in `output`
    memory   it raised MemoryError (its process hit the address-space cap), or the session went over its
             memory budget and the kernel (or the supervisor) stopped the cell or some of its processes;
             a cell stopped that way is undone like a killed one
    timeout  it ran longer than `timeout` seconds of wall or CPU time; its effects were undone
    killed   its process died (os._exit, a signal, a crash); its effects were undone

The isolation each session gets, and what happens where the OS refuses a mechanism, is in docs/sandbox.md;
`Sandbox.isolation` reports what was in force.
"""

from __future__ import annotations

import ast
import collections
import ctypes
import errno
import itertools
import json
import linecache
import math
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

STATUSES = ("ok", "error", "memory", "timeout", "killed")

# Imported once in the zygote so that a cell does not pay for them (sympy alone takes ~0.5 s).
PRELOADED_MODULES = (
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "random",
    "statistics", "re", "json", "numpy", "sympy", "encodings.idna",
)  # fmt: skip
TRACEBACK_FRAMES = 2  # frames of a traceback the model sees, innermost last, besides the exception line
SESSION_UID_BASE = 1_000_000_000  # per-session uids are taken from here up; none of them has a passwd entry
GRACE_SECONDS = 1.0  # after `timeout`, how long a cell may take to unwind before its process is killed

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_CLONE_NEWIPC = 0x08000000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 1, 4, 24
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MOUNT_OPTIONS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
                  "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}  # fmt: skip
_SO_SNDBUFFORCE = 32
_PF_EXITING = 0x4  # in /proc/PID/stat's flags: the process is in exit()
_FRAME = struct.Struct(">I")
_MAX_FRAME = 64 << 20
_MAX_CODE_BYTES = 4 << 20  # the largest cell the supervisor hands to a holder (one SEQPACKET message)


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
    ):
        from mathagent.errors import UserError

        workers = workers or os.cpu_count() or 1
        max_sessions = max_sessions or _default_max_sessions()
        for name, value, low in (
            ("workers", workers, 1), ("timeout", timeout, 0.01), ("memory_mb", memory_mb, 64),
            ("max_output_chars", max_output_chars, 80), ("max_processes", max_processes, 4),
            ("max_file_mb", max_file_mb, 1), ("max_sessions", max_sessions, 1),
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
                        reply = record.process.receive(self._deadline())
                        if not reply["kept"]:
                            record.rolled_back.add(i)
                        if reply.get("lost"):
                            raise _SessionLost("state lost during replay")
                    started = True
                    reply = record.process.receive(self._deadline())
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
                if reply.get("lost"):  # the cell killed its own checkpoint and then died
                    record.ran = []
                with self._lock:
                    self.stats["cells"] += 1
                    self.stats["replayed"] += len(replay)
                return CellResult(reply["output"], reply["status"], reply["seconds"], replayed=len(replay),
                                  cut=reply.get("cut") is True)
        # The session died three times replaying this history: an error for this trajectory alone, not for
        # the stage (the other trajectories' cells go on).
        return CellResult("SandboxError: the session died three times while replaying this trajectory's earlier "
                          "cells", "killed", 0.0)

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
            [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)],
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
                self.isolation = ready["isolation"]
            return process
        raise RuntimeError("the sandbox zygote failed twice; its stderr above says why")

    def _stop_zygote_after_failure(self) -> None:
        if self._zygote is not None:
            self._zygote.kill()
        self._stop_zygote()
        self._start_zygote()


SESSION_MEMORY_MB = 16  # what a live idle session holds (four processes, mostly shared pages): ~14 MB measured


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
            data, fds, _, _ = socket.recv_fds(self.sock, _FRAME.size, 1)
        except OSError as e:
            self.kill()
            raise RuntimeError(f"a sandbox session failed to start: {e}") from e
        if fds:
            self.pidfd = fds[0]
        if len(data) != _FRAME.size:
            self.kill()
            raise RuntimeError("a sandbox session failed to start; its stderr above says why")
        try:
            return json.loads(self._read_exactly(_FRAME.unpack(data)[0], time.monotonic() + 30))
        except _SessionLost as e:
            self.kill()
            raise RuntimeError("a sandbox session failed to start; its stderr above says why") from e

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        try:
            self.sock.settimeout(30)
            self.sock.sendall(_FRAME.pack(len(data)) + data)
        except OSError as e:
            raise _SessionLost(str(e)) from e

    def receive(self, deadline: float) -> dict:
        (size,) = _FRAME.unpack(self._read_exactly(_FRAME.size, deadline))
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


# =============================================================================================================
# Everything below runs in the zygote and its descendants, never in the caller's process.
# =============================================================================================================

_libc = None


def _libc_call(name: str, *args) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(_libc, name)(*args)
    if result == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return result


def _unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
    else:
        _libc_call("unshare", ctypes.c_int(flags))


def _prctl(option: int, value: int) -> None:
    _libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
               ctypes.c_ulong(0))  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """capset(2) with empty sets (64-bit capabilities: version 3, two data structs)."""
    _libc_call("capset", ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)())


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _libc_call("mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))


class _MemoryCgroup:
    """One session's memory budget as a kernel memory cgroup: every process of the holder chain, whatever
    it forks, its memfds and the files it writes to its tmpfs are charged to one counter, and past the limit
    the kernel's OOM killer stops a process of the session (a cell before its checkpoint, see `join`), not
    the machine.

    Made by the launcher before it enters the session's mount namespace, where every mount is read-only
    afterwards: the files it needs later are opened now, through the host's mounts."""

    OOM_SCORE_CELL, OOM_SCORE_HOLDER = 1000, -500

    def __init__(self, parent: str, version: int, name: str, limit: int):
        self.version, self.name = version, name
        self.parent = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.mkdir(name, 0o700, dir_fd=self.parent)
        except FileExistsError:  # left by a launcher killed before its clean-up
            os.rmdir(name, dir_fd=self.parent)
            os.mkdir(name, 0o700, dir_fd=self.parent)
        path = os.path.join(parent, name)
        try:
            limits = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes") if version == 1 else (
                "memory.max", "memory.swap.max")
            with open(os.path.join(path, limits[0]), "w") as f:
                f.write(str(limit))
            try:
                with open(os.path.join(path, limits[1]), "w") as f:  # no swap past the budget either
                    f.write(str(limit) if version == 1 else "0")
            except OSError:
                pass  # no swap accounting on this kernel
            self.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            self.events = os.open(os.path.join(path, "memory.oom_control" if version == 1 else "memory.events"),
                                  os.O_RDONLY)
            if self.oom_kills() is None:
                raise OSError(errno.ENOTSUP, "this kernel does not count OOM kills per cgroup")
        except OSError:
            self.remove()
            raise

    def join(self) -> None:
        """Move the calling process (a new holder, still root) into the cgroup; its descendants follow.
        Its OOM score is set as root too, which makes it the lowest a process of the chain may set itself:
        a cell raises its own (`OOM_SCORE_CELL`), so the kernel stops a cell before its checkpoint."""
        os.write(self.procs, b"0")
        _set_oom_score(self.OOM_SCORE_HOLDER)

    def oom_kills(self) -> int | None:
        """How many processes of the session the kernel's OOM killer has stopped so far."""
        os.lseek(self.events, 0, os.SEEK_SET)
        for line in os.read(self.events, 4096).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def close_files(self, *which: str) -> None:
        """Close what this process does not need: the supervisor the parent directory, the launcher the
        cgroup's files, a holder (and so every cell) all of them."""
        for name in which or ("procs", "events", "parent"):
            if getattr(self, name, None) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)

    def remove(self) -> None:
        """Delete the cgroup once its processes are gone (the session ended)."""
        self.close_files("procs", "events")
        for _ in range(100):  # the last processes may still be exiting
            try:
                os.rmdir(self.name, dir_fd=self.parent)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.01)
        os.close(self.parent)
        self.parent = None


def _set_oom_score(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:  # lowering it needs CAP_SYS_RESOURCE (a user namespace's root has none on the host)
        pass


def _memory_cgroup_parent() -> tuple[str, int] | None:
    """The directory of our own memory cgroup, and the cgroup version, if we may create sessions' cgroups
    with a memory limit under it: root (or a delegated cgroup) and the memory controller available."""
    with open("/proc/self/cgroup") as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for version in (2, 1):
        for fields in mounts:
            dash = fields.index("-")
            fstype, options = fields[dash + 1], fields[dash + 3].split(",")
            if (fstype, version) not in (("cgroup2", 2), ("cgroup", 1)) or (version == 1 and "memory" not in options):
                continue
            own = [path for _, controllers, path in memberships
                   if (version == 2 and controllers == "") or (version == 1 and "memory" in controllers.split(","))]
            root, mountpoint = fields[3], fields[4]
            if not own or not (own[0] + "/").startswith(root.rstrip("/") + "/"):
                continue
            directory = os.path.join(mountpoint, own[0][len(root.rstrip("/")) :].lstrip("/"))
            if version == 2:  # a child has a memory limit only where this cgroup hands the controller down
                try:
                    with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                        if "memory" not in f.read().split():
                            continue
                except OSError:
                    continue
            if os.access(directory, os.W_OK):
                return directory, version
    return None


def _remove_stale_cgroups(parent: str) -> None:
    """Sessions' cgroups left by sandboxes whose zygote was killed before it could remove them."""
    for name in os.listdir(parent):
        if name.startswith("mathagent-"):
            zygote = name.split("-")[1]
            if zygote.isdigit() and not os.path.exists(f"/proc/{zygote}"):
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass


def _zygote_main(config: dict) -> None:
    """Import the math modules once, then fork one launcher per session the caller asks for."""
    control = socket.socket(fileno=config["control_fd"])
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
    uid_base = SESSION_UID_BASE + (os.getpid() % 10_000) * 100_000  # apart from other sandboxes' uids
    config["memory_cgroup"] = _memory_cgroup_parent() if config["cgroup"] else None
    if config["memory_cgroup"] is not None:
        _remove_stale_cgroups(config["memory_cgroup"][0])
    sessions = itertools.count()

    def launch() -> socket.socket:
        caller_end, session_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        uid = uid_base + next(sessions) % 100_000
        if os.fork() == 0:
            try:
                control.close()
                for spare in spares:
                    spare.close()
                caller_end.close()
                _launcher_main(config, session_end, uid)
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        session_end.close()
        return caller_end

    # Sessions started ahead of need, so that a new trajectory does not wait for namespaces and forks.
    spares: collections.deque[socket.socket] = collections.deque()
    while True:
        while len(spares) < config["spares"]:
            spares.append(launch())
        try:
            message = control.recv(1 << 16)
        except ConnectionResetError:  # the caller closed with our ready message unread: the same as EOF
            message = b""
        if not message:  # the caller closed us (or died): end the spares, wait for every session to end
            for spare in spares:
                spare.close()
            signal.alarm(10)  # a launcher that does not exit by then is killed with us (parent-death signal)
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    os._exit(0)
        while True:  # reap launchers whose session has ended
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
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


def _launcher_main(config: dict, session_end: socket.socket, uid: int) -> None:
    """Between the zygote and the session: enter new namespaces, fork the session into them, wait for it."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote died: so do we, and our session after us
    if os.getppid() == 1:
        os._exit(0)
    budget = None
    if config["memory_cgroup"] is not None:  # before the namespaces: afterwards every mount is read-only
        parent, version = config["memory_cgroup"]
        try:
            budget = _MemoryCgroup(parent, version, f"mathagent-{os.getppid()}-{uid}", config["memory_mb"] << 20)
        except OSError as e:
            config["memory_note"] = f"no memory cgroup: {e}"
    # IPC: SysV shared memory, semaphores and message queues and POSIX message queues are per namespace, so
    # no session reads another's segment by key, and all of them go when the session's last process exits.
    wanted = [_CLONE_NEWPID, _CLONE_NEWNS, _CLONE_NEWIPC] + ([] if config["network"] else [_CLONE_NEWNET])
    if os.geteuid() != 0:
        wanted.insert(0, _CLONE_NEWUSER)  # lets an unprivileged caller still make the namespaces below
    namespaces = 0
    real_uid, real_gid = os.getuid(), os.getgid()  # inside a new user namespace they read as 65534
    try:
        _unshare(sum(wanted))
        namespaces = sum(wanted)
    except OSError:
        for flag in wanted:  # take what the OS allows, one by one
            try:
                _unshare(flag)
                namespaces |= flag
            except OSError:
                pass
    if namespaces & _CLONE_NEWUSER:
        for path, text in (("uid_map", f"0 {real_uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {real_gid} 1")):
            fd = os.open(f"/proc/self/{path}", os.O_WRONLY)  # not open(): O_TRUNC is refused here
            os.write(fd, text.encode())
            os.close(fd)
    workdir = None
    if not namespaces & _CLONE_NEWNS:  # no private tmpfs: a host directory, removed when the session ends
        import tempfile

        workdir = tempfile.mkdtemp(prefix="mathagent-sandbox-")
        if os.geteuid() == 0 and not namespaces & _CLONE_NEWUSER:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
    pid = os.fork()
    if pid == 0:
        try:
            _Supervisor(config, session_end, uid, namespaces, workdir, budget).serve()
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


def _python_paths() -> set[str]:
    """The directories the interpreter imports from and runs out of, none inside another."""
    paths = {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    paths |= {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return {p for p in paths if not any(p.startswith(q + "/") for q in paths)}


def _closed_ancestor(path: str) -> str | None:
    """The first directory above `path` that users other than its owner may not enter, if any."""
    import stat

    ancestor = "/"
    for part in path.strip("/").split("/")[:-1]:
        ancestor = os.path.join(ancestor, part)
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _expose_python() -> None:
    """Let an unprivileged uid reach the Python installation, in our mount namespace only.

    A Python under a directory only root may enter (pyenv in /root, mode 0700) would leave a cell unable to
    import anything the zygote did not import already. The closed directory is covered by an empty tmpfs
    into which just the installation is bind-mounted, so nothing else of it becomes visible.
    """
    closed: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(_python_paths()):
        ancestor = _closed_ancestor(path)
        if ancestor is not None:
            closed[ancestor].append(path)
    for ancestor, paths in closed.items():
        originals = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in paths]
        _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
        for path, fd in zip(paths, originals):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
            os.close(fd)


class _Supervisor:
    """S: the trusted process of one trajectory. It runs no model code; it keeps the holder chain, hands
    cells to it, enforces the deadline, kills what cells leave behind and answers the caller."""

    def __init__(self, config: dict, caller: socket.socket, uid: int, namespaces: int, workdir: str | None,
                 cgroup: _MemoryCgroup | None):
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
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
        self.isolation = self._isolate(namespaces, workdir)
        if namespaces & _CLONE_NEWNS:
            mounts, directories = [path for path in ("/tmp", "/dev/shm") if os.path.isdir(path)], []
        else:
            mounts, directories = [], [self.workdir]
        self.polled = None if cgroup else _PolledBudget(config["memory_mb"] << 20, mounts, directories)
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
        # Our own diagnostics (a bug in this file) still go to the caller's stderr; cells never see that fd.
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
            socket.send_fds(self.caller, [_FRAME.pack(len(ready))], [pidfd] if pidfd is not None else [])
            self.caller.sendall(ready)
        except OSError:  # a spare session the zygote dropped unused
            os._exit(0)
        if pidfd is not None:
            os.close(pidfd)

    def _isolate(self, namespaces: int, workdir: str | None) -> dict:
        report = {
            "user_namespace": bool(namespaces & _CLONE_NEWUSER),
            "pid_namespace": bool(namespaces & _CLONE_NEWPID),
            "mount_namespace": bool(namespaces & _CLONE_NEWNS),
            "ipc_namespace": bool(namespaces & _CLONE_NEWIPC),
            "network": "allowed" if self.config["network"] else "none",
            "read_only_root": False,
            "uid": None,
        }
        if not self.config["network"] and not namespaces & _CLONE_NEWNET:
            report["network"] = "blocked by an audit hook (best effort: Python sockets only)"
        drop_uid = os.geteuid() == 0 and not namespaces & _CLONE_NEWUSER
        if namespaces & _CLONE_NEWNS:
            _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing we mount reaches the host
            if drop_uid:
                _expose_python()
            report["read_only_root"] = self._remount_read_only()
            self.workdir = "/tmp"
            owner = f",uid={self.uid},gid={self.uid}" if drop_uid else ""
            size = 4 * self.config["max_file_mb"]
            _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size}m,mode=0700{owner}")
            if os.path.isdir("/dev/shm"):  # POSIX semaphores and shared memory live there
                _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size}m,mode=0700{owner}")
            if namespaces & _CLONE_NEWPID:
                # A /proc of our pid namespace: cells see only their own processes, not the caller's.
                _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
        else:
            self.workdir = workdir
            if drop_uid and any(_closed_ancestor(path) for path in _python_paths()):
                report["imports"] = "only what the zygote imported: the Python installation is closed to others"
        if drop_uid:
            report["uid"] = self.uid
        if not namespaces & _CLONE_NEWPID:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of cells come to us, so we can find and kill them
        return report

    def _remount_read_only(self) -> bool:
        """Make every mount of our mount namespace read-only; False where one refused."""
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        everything = True
        for fields in mounts:
            target = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            options = fields[5].split(",")
            flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
            # Flags the mount has must be repeated: in a user namespace they are locked, and a remount
            # that drops one is refused.
            flags |= sum(flag for name, flag in _MOUNT_OPTIONS.items() if name in options)
            try:
                _mount(None, target, None, flags, None)
            except OSError:
                everything = False
        return everything

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
            commands.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _MAX_CODE_BYTES + (1 << 16))
        except OSError:
            commands.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_CODE_BYTES + (1 << 16))
        self.max_command = commands.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - 1024
        commands.shutdown(socket.SHUT_RD)
        results.shutdown(socket.SHUT_WR)
        results.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel tells us who sent a result
        pid = os.fork()
        if pid == 0:
            try:
                holder = _Holder(self, chain_commands, chain_results)
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

    def _prefork(self) -> None:
        """Have the holder fork the process of the next cell now, while the model writes it, so that the
        fork (~5 ms for a process with sympy loaded) is not paid while the caller waits."""
        try:
            self.commands.send(b'{"kind": "prefork"}')
        except OSError:
            pass  # the chain is gone; the next cell finds out and starts a new one

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
            self._reap()
            victims = [pid for pid, (_, alive) in self._processes().items() if alive and pid not in keep]
            if not victims:
                return
            for pid in victims:
                _kill(pid)
            if attempt > 2:
                time.sleep(min(0.001 * attempt, 0.05))  # a process in uninterruptible sleep: give it time
            if attempt > 200:
                print(f"sandbox: processes {victims} survive SIGKILL", file=sys.stderr)
                return

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    # -- serving the caller --------------------------------------------------------------------------------

    def serve(self) -> None:
        self._prefork()
        while True:
            header = self._read(_FRAME.size)
            if header is None:
                break  # the caller is gone or forgot us
            request = json.loads(self._read(_FRAME.unpack(header)[0]))
            if request["reset"]:
                self._start_chain()
                self._prefork()
            for cell in request["cells"]:
                reply = self._run(cell["code"], cell["index"])
                if not cell["output"]:
                    reply["output"] = ""
                data = json.dumps(reply).encode()
                self.caller.sendall(_FRAME.pack(len(data)) + data)
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
        """Run one cell in a fork of the holder; the reply the caller gets."""
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
        # The cell's process ran to its end (a timeout it caught itself is undone all the same) and holds the
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
            # The cell's process (or the thread-free copy it forked, see _Holder._run) holds the new state.
            successor = message.get("successor")
            if isinstance(successor, int) and self._processes().get(successor, (0, False))[0] == cell_pid:
                cell_pid = successor
            old = self.holder
            _kill(old)  # not waited for: it is no process of the cell's, and its exit takes milliseconds
            self._kill_all_but({cell_pid, old})  # whatever the cell left running
            self.holder = cell_pid
        else:
            self._kill_all_but({self.holder})  # the cell's effects go; the old holder keeps the state
            if not self._alive(self.holder):  # the cell killed its checkpoint before it died
                self._start_chain()
                lost = True
        self._prefork()
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
                    wait = min(wait, now + _PolledBudget.INTERVAL)
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
                    elif kind == "died" and cell_pid and message.get("pid") == cell_pid:
                        return "died", message, cell_pid
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


class _PolledBudget:
    """One session's memory budget where no memory cgroup can be made (not root, a read-only cgroupfs): while
    a cell runs, its supervisor adds up every INTERVAL what the session holds and stops the cell past the
    limit. Counted: the private memory of every process of the chain, the memfds they hold and the files in
    the session's tmpfs. Memory the cell takes between two looks (at most one RLIMIT_AS per process) can
    pass the limit for that long; shared pages a process maps privately may be counted twice."""

    INTERVAL = 0.02
    NICE = 10  # added to the cells' scheduling niceness
    SLACK = 8 << 20  # what a cell that allocates nothing still takes (copies of the pages it writes)

    def __init__(self, limit: int, mounts: list[str], directories: list[str]):
        self.limit = limit
        self.mounts = mounts  # the session's own tmpfs mounts: their used blocks
        self.directories = directories  # host directories of the session's: the blocks of their files
        self.allowed = limit

    def start(self, processes: dict[int, tuple[int, bool]]) -> None:
        """Before a cell: a session already over the budget (files an earlier cell left before it was stopped)
        may still run cells that do not grow it, one that deletes them say, as under a cgroup."""
        self.allowed = max(self.limit, self.used(processes) + self.SLACK)

    def over(self, processes: dict[int, tuple[int, bool]]) -> bool:
        return self.used(processes) > self.allowed

    def used(self, processes: dict[int, tuple[int, bool]]) -> int:
        total, memfds = 0, {}
        for pid, (_, alive) in processes.items():
            if not alive:
                continue
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                    for line in f:
                        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                            total += int(line.split()[1]) << 10
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                        info = os.stat(f"/proc/{pid}/fd/{fd}")
                        memfds[info.st_dev, info.st_ino] = info.st_blocks * 512  # allocated, not the sparse size
            except OSError:  # the process ended meanwhile
                continue
        total += sum(memfds.values())
        for path in self.mounts:
            info = os.statvfs(path)
            total += (info.f_blocks - info.f_bfree) * info.f_frsize
        for path in self.directories:
            for directory, _, names in os.walk(path):
                for name in names:
                    try:
                        total += os.lstat(os.path.join(directory, name)).st_blocks * 512
                    except OSError:
                        pass
        return total


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _valid_result(message: dict) -> bool:
    return message.get("status") in STATUSES and isinstance(message.get("error"), str)


def _died(pid: int, status: int | None) -> dict:
    """The message that says how a cell's process ended, from its wait status."""
    died = {"kind": "died", "pid": pid, "code": None, "signal": None}
    if status is not None and os.WIFEXITED(status):
        died["code"] = os.WEXITSTATUS(status)
    elif status is not None and os.WIFSIGNALED(status):
        died["signal"] = os.WTERMSIG(status)
    return died


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


class _CellTimeout(BaseException):
    """Raised into a cell by SIGALRM (wall clock) or SIGXCPU (CPU time); a BaseException so that a cell's
    `except Exception` does not swallow it."""


class _Holder:
    """A process of the chain: it holds a trajectory's namespace and forks a child for each cell."""

    def __init__(self, supervisor: _Supervisor, commands: socket.socket, results: socket.socket):
        self.commands, self.results = commands, results
        self.timeout = supervisor.timeout
        self.cap = supervisor.cap
        self.namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        self.in_cell = False
        # A copy of the output memfd out of the way of fds 1 and 2, to point them back at it for each cell.
        self.printed = os.dup(supervisor.printed)
        self.oom_scores = supervisor.cgroup is not None
        if supervisor.cgroup is not None:
            supervisor.cgroup.join()
        else:
            # The polled budget is only as good as the supervisor's looks: a cell's processes must not keep it
            # off the cores (eight of them allocating at once on two cores passed twice the budget).
            os.nice(_PolledBudget.NICE)
        self._drop_privileges(supervisor)
        signal.signal(signal.SIGALRM, self._on_limit)
        signal.signal(signal.SIGXCPU, self._on_limit)

    def _drop_privileges(self, supervisor: _Supervisor) -> None:
        config = supervisor.config
        limits = (
            (resource.RLIMIT_AS, config["memory_mb"] << 20),
            (resource.RLIMIT_FSIZE, config["max_file_mb"] << 20),
            (resource.RLIMIT_NPROC, config["max_processes"]),
            (resource.RLIMIT_NOFILE, 256),
            (resource.RLIMIT_CORE, 0),
            # Each process of the chain runs one cell, so a per-process CPU limit is a per-cell one.
            (resource.RLIMIT_CPU, math.ceil(self.timeout) + 1),
        )
        if supervisor.isolation["uid"] is not None:
            # A uid of its own per session: it cannot write what it does not own, cannot signal or trace
            # the caller, and RLIMIT_NPROC (not enforced for root) counts this trajectory's processes only.
            os.setgroups([])
            os.setresgid(supervisor.uid, supervisor.uid, supervisor.uid)
            os.setresuid(supervisor.uid, supervisor.uid, supervisor.uid)
        else:
            # Root of a user namespace (or an unprivileged caller): no capabilities, now or after an exec,
            # so a cell cannot undo the read-only mounts.
            for cap in range(64):
                try:
                    _prctl(_PR_CAPBSET_DROP, cap)
                except OSError:
                    break
            _drop_capabilities()
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries do not give a cell its privileges back
        for which, value in limits:
            _, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))
        if supervisor.isolation["network"].startswith("blocked by an audit hook"):
            sys.addaudithook(_no_network)

    def _on_limit(self, signum, frame):
        if self.in_cell:
            self.in_cell = False
            raise _CellTimeout(signum)

    def serve(self) -> None:
        buffer = bytearray(_MAX_CODE_BYTES + (1 << 16))

        def receive() -> dict:
            size = self.commands.recv_into(buffer)
            return json.loads(buffer[:size]) if size else {"kind": "exit"}

        while True:
            command = receive()
            if command["kind"] == "exit":
                os._exit(0)  # the supervisor is gone
            # Not dumpable, from before the fork: the checkpoint's memory is out of reach of the cell (same uid)
            # through /proc/PID/mem or ptrace. The cell's own process is dumpable, to read its /proc/self.
            _prctl(_PR_SET_DUMPABLE, 0)
            pid = self._fork()
            if pid == 0:
                _prctl(_PR_SET_DUMPABLE, 1)
                if self.oom_scores:
                    _set_oom_score(_MemoryCgroup.OOM_SCORE_CELL)
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
            self._send(_died(pid, status))

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _fork(self) -> int:
        # The processes a cell left were killed, but until reaped they count against RLIMIT_NPROC.
        for attempt in range(100):
            self._reap()
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
        _execute("None", "<warm-up>", {"__builtins__": __builtins__}, self)
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
            _set_oom_score(_MemoryCgroup.OOM_SCORE_HOLDER)
        _prctl(_PR_SET_DUMPABLE, 0)  # this process may be the next holder: nothing the cell left may write it
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


def _execute(code: str, filename: str, namespace: dict, holder: _Holder) -> tuple[str, str]:
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


def _no_network(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") and args:
        sock = args[0]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            raise PermissionError(errno.EACCES, "network access is disabled in the sandbox")


if __name__ == "__main__":
    _zygote_main(json.loads(sys.argv[1]))
