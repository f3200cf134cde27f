"""The record contract every stage reads and writes, and JSONL in/out.

Records are plain dicts, one JSON object per line. A stage owns some fields and keeps every other field it
does not understand. The formats (see docs/records.md):

- Problem:    {"id", "question", "answer"?, ...}
- Trajectory: {"id", "problem_id", "question", "answer"?, "messages": [{"role", "content"}, ...], "status",
               "pred"?, "correct"?, "reward"?, ...}

`messages` is the state s_h of the paper: optional system, the user question, then actions a_1, o_1, ... .
An action is an assistant message; an observation is any non-assistant message after the first action, its
content "```output\\n...\\n```" (role `user` by default, as in the M-DPO data; `tool` allowed).

I/O rules shared by every stage: read a path or '-' (stdin); write `-o PATH` atomically (temp file + rename)
or stdout; a malformed line or a missing field is a `UserError` "FILE:LINE: what is wrong" unless the stage
was asked to skip invalid lines; `--resume` keeps the finished records of an earlier output and does only the
missing ids.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from mathagent.errors import UserError

PROBLEM_FIELDS = ("id", "question")
TRAJECTORY_FIELDS = ("id", "problem_id", "question", "messages", "status")

# How a trajectory ended (or why it is paused).
ANSWERED = "answered"  # the last action holds a \boxed{} answer
STOPPED = "stopped"  # the model ended a turn with neither code nor an answer
MAX_TURNS = "max_turns"  # the turn budget ran out before an answer
LENGTH = "length"  # the last action was cut by the per-turn token limit; rollout continues it
TOOL_CALL = "tool_call"  # the last action's code waits for its observation (`mathagent execute` runs it)
STATUSES = (ANSWERED, STOPPED, MAX_TURNS, LENGTH, TOOL_CALL)

OBSERVATION_FENCE = "```output"


def format_observation(output: str) -> str:
    """The content of an observation message: the code's output in an ```output fence."""
    return f"```output\n{output.rstrip(chr(10))}\n```"


def actions(messages: Sequence[dict[str, str]]) -> list[int]:
    """Indices of the actions a_1..a_H (the assistant messages)."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def last_action(messages: Sequence[dict[str, str]]) -> str | None:
    """The content of the last action, or None before the first one."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)


def is_observation(messages: Sequence[dict[str, str]], index: int) -> bool:
    """An observation is any non-assistant message after the first action."""
    if messages[index]["role"] == "assistant":
        return False
    return any(m["role"] == "assistant" for m in messages[:index])


@dataclass
class InvalidCounter:
    """Counts the lines skipped under --skip-invalid, with the first few reasons."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def check_problem_or_trajectory(record: dict[str, Any]) -> str | None:
    """What rollout accepts: a problem, or a trajectory to continue."""
    fields = TRAJECTORY_FIELDS[:4] if "messages" in record else PROBLEM_FIELDS
    for name in fields:
        if name not in record:
            return f"missing required field '{name}'"
    return None


def _validate(record: Any, required: Sequence[str]) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name in required:
        if name not in record:
            return f"missing required field '{name}'"
    if "messages" in required or "messages" in record:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            return "field 'messages' must be a non-empty list"
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"field 'messages[{j}]' must be an object with string 'role' and 'content'"
    if "status" in record and record["status"] not in STATUSES:
        return f"field 'status' is {record['status']!r}, expected one of {', '.join(STATUSES)}"
    if "id" in record and not isinstance(record["id"], (str, int)):
        return "field 'id' must be a string or an integer"
    return None


def read_records(
    path: str,
    *,
    required: Sequence[str] = ("id",),
    skip_invalid: bool = False,
    invalid: InvalidCounter | None = None,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file ('-' is stdin), checking that each has the `required` fields (and
    passes `check`, which returns what is wrong or None).

    Blank lines are ignored. A bad line raises `UserError("FILE:LINE: ...")`, or is counted in `invalid`
    and skipped when `skip_invalid`.
    """
    name = "<stdin>" if path == "-" else path
    if path == "-":
        stream: IO[str] = sys.stdin
    else:
        try:
            stream = open(path, encoding="utf-8")
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e.strerror}") from None
    try:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"{name}:{lineno}: malformed JSON: {e.msg} (column {e.colno})"
            else:
                reason = _validate(record, required)
                if reason is None and check is not None:
                    reason = check(record)
                if reason is None:
                    if "id" in record:
                        record["id"] = str(record["id"])
                    yield record
                    continue
                problem = f"{name}:{lineno}: {reason}"
            if not skip_invalid:
                raise UserError(problem)
            if invalid is not None:
                invalid.add(problem)
    finally:
        if stream is not sys.stdin:
            stream.close()


def _stale_temp_files(path: str) -> list[str]:
    """Temporary files a killed run left beside `path` (see RecordWriter)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    return sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith(prefix) and name.endswith(".tmp")
    )


def read_finished(path: str) -> list[dict[str, Any]]:
    """For --resume: the complete records an earlier run left, in the output itself or in the temporary file
    of a run that was killed before publishing it.

    A killed run's last line may be cut; such a line is dropped, since its record will be made again. Later
    copies of an id win.
    """
    sources = ([path] if os.path.exists(path) else []) + _stale_temp_files(path)
    kept: dict[str, dict[str, Any]] = {}
    for source in sources:
        with open(source, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    kept[str(record["id"])] = record
    return list(kept.values())


class RecordWriter:
    """Writes JSONL records to stdout or, atomically, to a path.

    To a path, records stream into a temporary file beside it (flushed record by record) that replaces the
    target only on a clean close: a failed or killed run never leaves half a file, and what it did finish is
    still in its temporary file, where `read_finished` finds it for --resume. A clean close removes the
    temporary files of earlier killed runs.
    """

    def __init__(self, path: str | None, *, keep: Iterable[dict[str, Any]] = (), stdout: IO[str] | None = None):
        self.path = None if path in (None, "-") else path
        self.count = 0
        self._tmp: IO[str] | None = None
        if self.path is None:
            self._out: IO[str] = stdout or sys.stdout
        else:
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise UserError(f"{self.path}: directory {directory} does not exist")
            self._stale = _stale_temp_files(self.path)
            self._tmp = tempfile.NamedTemporaryFile(
                "w", encoding="utf-8", dir=directory, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp",
                delete=False,
            )
            self._out = self._tmp
        for record in keep:
            self._out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if self._tmp is None:
            self._out.flush()
            return
        self._tmp.flush()
        if ok:
            os.fsync(self._tmp.fileno())
        self._tmp.close()
        if ok:
            os.replace(self._tmp.name, self.path)
            for stale in self._stale:
                if os.path.exists(stale):
                    os.unlink(stale)
        # On failure the temporary file stays: it holds the finished records for --resume.
        self._tmp = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
