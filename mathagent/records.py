"""The record contract every stage reads and writes, and JSONL in/out.

Records are plain dicts, one JSON object per line. A stage owns some fields and keeps every other field it
does not understand. The formats (see docs/records.md):

- Problem:    {"id", "question", "answer"?, ...}
- Trajectory: {"id", "problem_id", "question", "answer"?, "messages": [{"role", "content"}, ...], "status",
               "pred"?, "correct"?, "reward"?, ...}

`messages` is the state s_h of the paper: optional system, the user question, then actions a_1, o_1, ... .
An action is an assistant message; an observation is any non-assistant message after the first action, its
content "```output\\n...\\n```" (role `user` by default, as in the M-DPO data; `tool` allowed). An
observation the sandbox made also carries the cell's outcome as data, `"outcome": {"status", "cut"}`, so no
stage has to guess an error back from the text.

I/O rules shared by every stage: read a path or '-' (stdin); write `-o PATH` atomically (temp file + rename)
or stdout; a malformed line or a missing field is a `UserError` "FILE:LINE: what is wrong" unless the stage
was asked to skip invalid lines; `--resume` keeps the finished records of an earlier output and does only the
missing ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jsonlines

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
# The tokens a record carries (`mathagent.tokens`): the prompt's ids, each message's, a sampled action's log-probs.
PROMPT_IDS = "prompt_ids"
TOKEN_IDS = "token_ids"
LOGPROBS = "logprobs"
OBSERVATION_ROLES = ("user", "tool")  # an observation is never the agent's own (assistant) message

# How a cell ended (`outcome.status` of an observation): sandbox.STATUSES, written again because the sandbox's
# zygote imports nothing of mathagent but the sandbox package (a test keeps the two equal).
CELL_OK = "ok"  # it ran to its end
CELL_STATUSES = (CELL_OK, "error", "memory", "timeout", "killed")


def format_observation(output: str) -> str:
    """The content of an observation message: the code's output in an ```output fence."""
    return f"```output\n{output.rstrip(chr(10))}\n```"


def observation_message(output: str, status: str, cut: bool, role: str = "user",
                        escaped: bool = False) -> dict[str, Any]:  # fmt: skip
    """An observation o_h: the output in its fence, and the cell's outcome as data (status, whether the
    output was cut to the sandbox's cap, and, only when it happened, that code points UTF-8 cannot carry
    were written as escapes)."""
    outcome = {"status": status, "cut": cut} | ({"escaped": True} if escaped else {})
    return {"role": role, "content": format_observation(output), "outcome": outcome}


def cell_status(message: dict[str, Any]) -> str | None:
    """The recorded outcome status of an observation, or None for one that came from elsewhere without it."""
    outcome = message.get("outcome")
    status = outcome.get("status") if isinstance(outcome, dict) else None
    return status if status in CELL_STATUSES else None


# For observations without a recorded outcome only: a real Python traceback, or a last line that is an
# exception line ("ZeroDivisionError: division by zero", "sympy.polys.polyerrors.PolynomialError: ...",
# "KeyboardInterrupt") or a timeout notice. Printed results such as "error: 0.001" or "abs_error = 0.1" are
# neither.
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\s*$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*(?:Error|Exception|Exit|Interrupt)|Exception)(?::\s.*|:)?$")
_TIMEOUT_LINE = re.compile(r"^(?:timed?[ _-]?out|timeout)\b", re.IGNORECASE)


def looks_like_error(content: str) -> bool:
    """The text heuristic for an observation that carries no outcome: a traceback, or an exception or timeout
    line as its last line."""
    body = content.strip()
    if body.startswith(OBSERVATION_FENCE):
        body = body[len(OBSERVATION_FENCE):].removesuffix("```")
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if not lines:
        return False
    if _TRACEBACK.search(body):
        return True
    return bool(_EXCEPTION_LINE.match(lines[-1]) or _TIMEOUT_LINE.match(lines[-1]))


def observation_failed(message: dict[str, Any]) -> bool:
    """Whether an observation reports a failed cell (error, memory, timeout, killed): its recorded outcome,
    or, for an observation from elsewhere, the text heuristic `looks_like_error`."""
    status = cell_status(message)
    return looks_like_error(message["content"]) if status is None else status != CELL_OK


# --------------------------------------------------------------------------------------------------------
# The shape of a trajectory's messages: prompt x, then actions a_h (assistant) and observations o_h (the rest)
# --------------------------------------------------------------------------------------------------------


def actions(messages: Sequence[dict[str, str]]) -> list[int]:
    """Indices of the actions a_1..a_H (the assistant messages)."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def first_action(messages: Sequence[dict[str, str]]) -> int | None:
    """The index of a_1, or None for messages without an action."""
    return next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)


def split_prompt(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, response): the prompt is every message before the first action; the response is the rest
    (actions and observations)."""
    start = first_action(messages)
    if start is None:
        return list(messages), []
    return list(messages[:start]), list(messages[start:])


def last_action(messages: Sequence[dict[str, str]]) -> str | None:
    """The content of the last action, or None before the first one."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)


def is_observation(messages: Sequence[dict[str, str]], index: int) -> bool:
    """An observation is any non-assistant message after the first action."""
    if messages[index]["role"] == "assistant":
        return False
    start = first_action(messages)
    return start is not None and start < index


# --------------------------------------------------------------------------------------------------------
# Keys and groups: what makes two message lists the same, and the problems of a file
# --------------------------------------------------------------------------------------------------------


def messages_key(messages: Sequence[dict[str, str]]) -> str:
    # Roles and contents only: two responses are the same text whatever extra keys a message carries.
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def group_by_problem(trajectories: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Trajectories by str(problem_id), problems in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in trajectories:
        groups.setdefault(str(t["problem_id"]), []).append(t)
    return groups


def problem_rng(seed: int, problem_id: Any) -> random.Random:
    """The random generator of one problem: its draws do not depend on the rest of the file."""
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and Python processes.
    return random.Random(f"{seed}:{problem_id}")


def check_messages(value: Any, name: str = "messages", *, starts_with_action: bool = False) -> str | None:
    """What is wrong with a list of messages (None: nothing): each an object with string role and content;
    with `starts_with_action`, a response, whose first message is an action."""
    if not isinstance(value, list) or not value:
        return f"field '{name}' must be a non-empty list of messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"field '{name}[{j}]' must be an object with string 'role' and 'content'"
    if starts_with_action and value[0]["role"] != "assistant":
        return f"field '{name}' must start with an assistant message (the first action)"
    return None


def check_prompt(value: Any, name: str = "prompt") -> str | None:
    """What is wrong with a prompt given on its own (the messages before the first action)."""
    problem = check_messages(value, name)
    if problem is None and first_action(value) is not None:
        return f"field '{name}' has an assistant message: the prompt is the messages before the first action"
    return problem


def check_token_fields(record: dict[str, Any]) -> str | None:
    """What is wrong with a record's token-id fields (None: nothing, or none there): `prompt_ids` and each
    message's `token_ids` lists of ids, a message's `logprobs` as long as its `token_ids` (`mathagent.tokens`)."""
    value = record.get(PROMPT_IDS)
    if value is not None and not _ints(value):
        return f"field '{PROMPT_IDS}' must be a list of token ids (integers)"
    for name in ("messages", "chosen", "rejected", "completion"):
        for j, m in enumerate(record.get(name) or ()):
            if not isinstance(m, dict):
                continue
            if TOKEN_IDS in m and not _ints(m[TOKEN_IDS]):
                return f"field '{name}[{j}].token_ids' must be a list of token ids (integers)"
            lps = m.get(LOGPROBS)
            if lps is not None:
                if TOKEN_IDS not in m or not isinstance(lps, list) or len(lps) != len(m[TOKEN_IDS]):
                    return f"field '{name}[{j}].logprobs' must be a list as long as its token_ids"
                if not set(map(type, lps)) <= {float, int, type(None)}:
                    return f"field '{name}[{j}].logprobs' must hold numbers (or null)"
    return None


def _ints(value: Any) -> bool:
    # By the set of types, not element by element: a record holds thousands of ids, and reading checks them all.
    return isinstance(value, list) and (not value or (set(map(type, value)) == {int} and min(value) >= 0))


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
        problem = check_messages(record.get("messages"))
        if problem is not None:
            return problem
    problem = check_token_fields(record)
    if problem is not None:
        return problem
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
    unique_ids: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file ('-' is stdin), checking that each has the `required` fields (and
    passes `check`, which returns what is wrong or None), and with `unique_ids` that no id comes twice (a
    stage that keys sessions or --resume on ids).

    Blank lines are ignored. A bad line (bytes that are not UTF-8 included) raises
    `UserError("FILE:LINE: ...")`, or is counted in `invalid` and skipped when `skip_invalid`.
    """
    name = "<stdin>" if path == "-" else path
    if path == "-":
        stream: IO[bytes] = sys.stdin.buffer
    else:
        if os.path.isdir(path):
            raise UserError(f"{path}: is a directory, not a JSONL file")
        try:
            stream = open(path, "rb")
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e.strerror}") from None
    seen: dict[str, int] = {}
    position = [0]  # the line the reader is on (blank lines are skipped before it sees them)

    def lines() -> Iterator[bytes]:
        for lineno, raw in enumerate(stream, 1):
            if raw.strip():
                position[0] = lineno
                yield raw

    reader = jsonlines.Reader(lines(), loads=json.loads)
    try:
        while True:
            try:
                record, problem = reader.read(allow_none=True), None
            except EOFError:
                break
            except jsonlines.InvalidLineError as e:
                record, problem = None, _line_problem(e)
            except RecursionError:
                record, problem = None, "malformed JSON: nested too deeply"
            lineno = position[0]
            if problem is None:
                problem = _validate(record, required)
            if problem is None and check is not None:
                problem = check(record)
            if problem is None and unique_ids and "id" in record:
                first = seen.setdefault(str(record["id"]), lineno)
                if first != lineno:
                    problem = f"duplicate id {str(record['id'])!r} (first on line {first}): ids must be unique"
            if problem is None:
                if "id" in record:
                    record["id"] = str(record["id"])
                yield record
                continue
            problem = f"{name}:{lineno}: {problem}"
            if not skip_invalid:
                raise UserError(problem)
            if invalid is not None:
                invalid.add(problem)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _line_problem(error: jsonlines.InvalidLineError) -> str:
    """What is wrong with a line jsonlines could not decode: bytes that are not UTF-8, or not JSON (a number
    too long to convert included)."""
    cause = error.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"not valid UTF-8 (byte 0x{error.line[cause.start]:02x} at column {cause.start + 1})"
    if isinstance(cause, json.JSONDecodeError):
        return f"malformed JSON: {cause.msg} (column {cause.colno})"
    return f"malformed JSON: {cause if cause is not None else error}"


def _stale_temp_files(path: str) -> list[str]:
    """Temporary files a killed run left beside `path` (see RecordWriter)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    if not os.path.isdir(directory):  # nothing was ever written there (the writer then says why it cannot)
        return []
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
        with open(source, "rb") as f:
            reader = jsonlines.Reader(f)
            while True:
                try:
                    record = reader.read(allow_none=True, skip_empty=True)
                except EOFError:
                    break
                except (jsonlines.InvalidLineError, RecursionError):
                    continue  # a line cut by the kill, or one that was never a record
                if isinstance(record, dict) and "id" in record:
                    kept[str(record["id"])] = record
    return list(kept.values())


def finished_records(output: str, resume: bool) -> dict[str, dict[str, Any]]:
    """What --resume keeps: the finished records of an earlier run writing `output`, by id; none without
    --resume or when the output is stdout (there is nothing to read back)."""
    if not resume or output == "-":
        return {}
    return {r["id"]: r for r in read_finished(output)}


def split_finished(
    groups: Sequence[Sequence[dict[str, Any]]], finished: dict[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Sequence[dict[str, Any]]]]:
    """(the finished records to keep, the groups still to do): a group - the trajectories of one input - is
    kept only when every one of its ids is finished, so an input is never half redone."""
    kept: list[dict[str, Any]] = []
    todo: list[Sequence[dict[str, Any]]] = []
    for group in groups:
        if all(r["id"] in finished for r in group):
            kept.extend(finished[r["id"]] for r in group)
        else:
            todo.append(group)
    return kept, todo


@contextlib.contextmanager
def record_stream() -> Iterator[IO[str]]:
    """A private stream to the real stdout for records, while fd 1 points at stderr.

    stdout must carry only JSONL, but libraries print there: vLLM's logger, C extensions, tqdm. For the
    duration of a stage, whatever anything writes to stdout lands on stderr, and only records reach the pipe.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield stream
    finally:
        stream.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        stream.close()


def check_output_path(path: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, a missing or read-only
    folder."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; -o names the file to write")
    if not os.path.isdir(directory):
        raise UserError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{path}: directory {directory} is not writable")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _in_use(temp_path: str) -> bool:
    """Whether a live run holds the lock of this temporary output file."""
    try:
        with open(temp_path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


# -- atomic writes: every file the toolkit publishes (records, manifests, plots, models, checkpoints) --------


def staging_path(path: str | os.PathLike, *, directory: bool = False, suffix: str = ".tmp") -> Path:
    """A new, empty file (or directory) beside `path` under a hidden temporary name, to be written and then
    `publish`ed onto `path`. Same file system, so the rename is atomic; the mode is what open() or mkdir()
    would give (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
        staging.chmod(0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        staging = Path(name)
        staging.chmod(0o666 & ~_umask())
    return staging


def publish(staging: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished staging file or directory onto `path`: a reader sees the old one or the new one,
    never half of either. A directory already at `path` is removed first (rename cannot replace one)."""
    path = Path(path)
    if Path(staging).is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(staging, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Write `path` atomically: the block writes the staging path it is given, which is published onto
    `path` when the block ends and removed when it raises.

        with atomic_path("eval.json") as tmp:
            tmp.write_text(text)
    """
    staging = staging_path(path, directory=directory, suffix=suffix)
    try:
        yield staging
        publish(staging, path)
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)  # UTF-8 as it is, not \u escapes


class RecordWriter:
    """Writes JSONL records to stdout or, atomically, to a path.

    To a path, records stream into a temporary file beside it (flushed record by record) that replaces the
    target only on a clean close: a failed or killed run never leaves half a file, and what it did finish is
    still in its temporary file, where `read_finished` finds it for --resume. A clean close removes the
    temporary files of earlier killed runs. The temporary file is locked (flock) while its run is alive, so a
    second run writing the same path refuses at once rather than deleting the first one's work.
    """

    def __init__(self, path: str | None, *, keep: Iterable[dict[str, Any]] = (), stdout: IO[str] | None = None):
        self.path = None if path in (None, "-") else path
        self.count = 0
        self._tmp: IO[str] | None = None
        if self.path is None:
            self._out: IO[str] = stdout or sys.stdout
        else:
            check_output_path(self.path)
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                self._tmp = open(staging_path(self.path), "w", encoding="utf-8")
            except OSError as e:
                raise UserError(f"{self.path}: cannot write in {directory}: {e.strerror}") from None
            # The live temporary file is locked while this run writes it: another run writing the same path
            # finds it locked and refuses at once, instead of taking it for a killed run's leftover.
            fcntl.flock(self._tmp.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._stale = []
            for other in _stale_temp_files(self.path):
                if other != self._tmp.name:
                    if _in_use(other):
                        self._tmp.close()
                        os.unlink(self._tmp.name)
                        raise UserError(f"{self.path}: another run is writing it (its temporary file {other} is in "
                                        "use); not starting")
                    self._stale.append(other)
            self._out = self._tmp
        self._lines = jsonlines.Writer(self._out, dumps=_dumps)
        for record in keep:
            self._lines.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self._lines.write(record)
        self._out.flush()  # record by record: a killed run's finished records are on disk for --resume
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
            publish(self._tmp.name, self.path)
            for stale in self._stale:
                if os.path.exists(stale):
                    os.unlink(stale)
        # On failure the temporary file stays: it holds the finished records for --resume.
        self._tmp = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
