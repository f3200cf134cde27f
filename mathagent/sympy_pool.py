"""The grader's side of the sympy workers (`sympy_worker.py`): start them, send a request with a deadline,
kill and replace one that misses it.

`WorkerPool` holds at most `size` child processes, started on first use and shared by the threads of one
`grading.Grader`; a worker that dies or times out is discarded (`WorkerDied`, or None for the deadline), so
the next request gets a fresh one. Nothing here knows what a comparison is: requests and answers are JSON.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any


class WorkerDied(Exception):
    """The worker exited, said something that is not JSON, or the pool is closed."""


class Worker:
    """One child process running `sympy_worker.worker_main`: JSON lines in, JSON lines out."""

    STARTUP_TIMEOUT = 120.0

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from mathagent.sympy_worker import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buffer = b""
        ready = self._read_line(self.STARTUP_TIMEOUT)
        if ready is None or json.loads(ready).get("ready") is not True:
            self.kill()
            raise WorkerDied("the sympy worker did not start")

    def _read_line(self, timeout: float) -> str | None:
        """One line from the worker, or None at the deadline."""
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerDied("the sympy worker exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The worker's answer, or None at the deadline (the worker is then dead: kill it)."""
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(str(e)) from e
        line = self._read_line(timeout)
        if line is None:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkerDied(f"the sympy worker said {line[:80]!r}") from e

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=10)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass


class WorkerPool:
    """At most `size` workers, started on first use; a worker past its deadline is killed and replaced."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._idle: list[Worker] = []
        self._all: list[Worker] = []
        self._slots = threading.Semaphore(self.size)
        self._lock = threading.Lock()
        self._closed = False

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        with self._slots:
            with self._lock:
                if self._closed:
                    raise WorkerDied("the grader is closed")
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = Worker()
                with self._lock:
                    self._all.append(worker)
            try:
                result = worker.call(request, timeout)
            except WorkerDied:
                self._discard(worker)
                raise
            if result is None:
                self._discard(worker)
            else:
                with self._lock:
                    self._idle.append(worker)
            return result

    def _discard(self, worker: Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = self._all, [], []
        for worker in workers:
            worker.kill()
