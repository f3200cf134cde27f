r"""Answer extraction, answer equivalence and the outcome reward r(tau) of a trajectory.

A trajectory tau is scored only by its final answer (an outcome reward). The rule-based reward `r1` is
DeepSeek-R1's (Guo et al., 2025; the rule as the talk's slide states it), which rewards the format as well as
the answer:

    r1(tau)     = +1    if the last action gives its answer in \boxed{} and a_hat == a*
                  -0.5  if the last action gives its answer in \boxed{} and a_hat != a*
                  -1    if the last action has no \boxed{} answer (whatever else it states)
    binary(tau) = 1[a_hat == a*]

where a* is the reference answer and "==" is mathematical equivalence. The M-DPO paper itself trains on the
correct / incorrect split alone (binary). With `--answer-modes` that also read an unboxed "The answer is 5",
`correct` grades that answer, but r1 still gives -1: the format is part of the reward. This module implements
the three parts:

- extraction: `extract_answer` finds a_hat in the last action's text (the last \boxed{}/\fbox{}, or
  "The answer is ...", or GSM8K's "#### N");
- equivalence: `Grader.is_equivalent(pred, gold)` decides a_hat == a*;
- the reward: `Grader.reward(pred, gold, kind)`, and `grade_trajectory` for a whole record.

Equivalence builds on math-verify's LaTeX parser (latex2sympy2_extended) and replaces the parts of its
comparison that are wrong or unsafe for training. A comparison goes, in order:

1. normalization of both strings (`normalize_answer`): math delimiters, spacing, \left/\right, \dfrac,
   units and \text{} wrappers, '$', thousands separators (1,\!000 and 1,000), degrees, '%' (a unit: "50%"
   is 50, never 0.5; `percent_scaling=True` asks for the lenient x100 rule of some published graders);
2. "x = 3" against "3" (a lone variable on the left), then structure: tuples and intervals in order with
   their brackets, sets and solution lists ("1, 2", "x = \pm 1", "2 or 5") as multisets, unions,
   matrices by shape, each part compared by this same procedure;
3. choice letters ("(C)", "\text{(C)}": "C", "(C)", "c" all match), otherwise case-sensitive single letters
   (math-verify grades the symbol "c" equal to "C"), exact numbers as rationals without sympy (integers,
   decimals, fractions, mixed and repeating decimals, scientific notation: 0.0000001 != 0.0000002 and 1000001
   != 1000000, where math-verify rounds floats to 6 decimals), word answers as text;
4. everything else in a sympy worker: exact numbers (radicals, pi, factorials) exactly when small and to 60
   significant digits otherwise, never with an absolute tolerance (1/2004! != 1/2006!, e^-100 != e^-101,
   which math-verify `chop`s to zero); a decimal against an irrational within |a - b| <= abs_tol +
   rel_tol * |b| (b the reference); expressions in variables by evaluation at fixed points (an identity
   test), equations up to a constant factor; '^' is always a power, never XOR.

Step 4 runs in child processes with a deadline, so the grader is safe to call from any thread (math-verify's
signal.alarm timeouts work only in the main thread), behind size guards (towers of powers, huge factorials
and binomials) and a memory limit. A comparison that fails, times out or is refused by a guard grades
not-equal and is counted in `GradingStats` (`Grader.stats`). A command creates one `Grader`, hands it to the
functions that grade, reports its counters and closes it: there is no grader at module level.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

from mathagent.errors import UserError
ANSWER_MODES = ("boxed", "answer_is", "gsm8k")
REWARD_KINDS = ("r1", "binary")

# Tolerances for a decimal against an irrational reference. Exact numbers never use them.
DEFAULT_REL_TOL = 1e-9
DEFAULT_ABS_TOL = 1e-12
# Answers longer than this (after normalization) are compared as strings only: a real final answer is short,
# and sympy's parse time grows fast with length.
MAX_ANSWER_CHARS = 1000
# Collections (tuples, sets, matrices) with more elements than this are compared as strings only.
MAX_ELEMENTS = 64


# --------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------

_BOXED_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _match_braces(text: str, open_index: int) -> int | None:
    """Index of the '}' closing the '{' at open_index; escaped braces (\\{ \\}) do not count."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal set braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces matched.

    Also accepts the brace-less form `\\boxed 5` (the next token). A last box that never closes (a cut-off
    generation) is skipped in favour of the last complete one. An empty box is no answer (None).
    """
    for match in reversed(list(_BOXED_START.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_braces(text, i)
            if close is None:
                continue
            content = text[i + 1 : close].strip()
        elif match.end() < len(text) and text[match.end()] in " \t":
            token = re.match(r"[^\s$]+", text[i:])
            content = token.group(0).rstrip(".,") if token else ""
        else:
            continue
        return content or None
    return None


_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:)\s*:?\s*(.+?)\s*(?:\n|$)", re.IGNORECASE
)
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*(?:\n|$)")


def _strip_answer_phrase(answer: str) -> str:
    """Trim what surrounds an answer written in prose: math delimiters, a final period, \\boxed."""
    answer = answer.strip()
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    answer = answer.rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left) : -len(right)].strip()
            break
    return answer.rstrip(".").strip()


def extract_answer(text: str, modes: Sequence[str] = ("boxed",)) -> str | None:
    """The final answer a_hat of a text, or None when it states none.

    `modes` lists the allowed forms, tried in the given order (the first that finds something wins):
    "boxed" (the last \\boxed{}), "answer_is" (the last "The answer is ..."), "gsm8k" (the last "#### N",
    commas and a leading '$' removed as in the GSM8K reference solutions).
    """
    unknown = [m for m in modes if m not in ANSWER_MODES]
    if unknown:
        raise ValueError(f"unknown answer modes {unknown}; choose from {ANSWER_MODES}")
    if not text:
        return None
    for mode in modes:
        if mode == "boxed":
            found = extract_boxed(text)
        elif mode == "answer_is":
            matches = _ANSWER_IS.findall(text)
            found = _strip_answer_phrase(matches[-1]) if matches else None
        else:
            matches = _GSM8K_ANSWER.findall(text)
            found = matches[-1].replace(",", "").replace("$", "").rstrip(".").strip() if matches else None
        if found:
            return found
    return None


# --------------------------------------------------------------------------------------------------------
# Normalization (strings only, no sympy)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalized:
    """An answer after string normalization, with the markers it carried."""

    text: str
    percent: bool = False
    was_text: bool = False  # the answer was written in \text{} (a word answer, or a choice like \text{(C)})
    degrees: bool = False  # the whole answer was a number of degrees ("30^\circ" is kept as 30)


_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_THIN_SPACE = re.compile(r"(?<!\\)\\[,;:!]")  # also a thousands separator: 1\,000
_SPACING = re.compile(r"(?<!\\)\\[> ]|\\q?quad|~|\\displaystyle|\\textstyle")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)\s*(\.)?")
_DEGREES = re.compile(r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree|\\?text\{\s*degrees?\s*\})")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d[\d.,]*|\\frac\{\d+\}\{\d+\})$")
_TEXT_COMMAND = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname)"
_TRAILING_TEXT_UNIT = re.compile(r"(?<=\S)\s*" + _TEXT_COMMAND + r"\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?\s*$")
_TEXT_WRAPPER = re.compile(_TEXT_COMMAND + r"\s*\{([^{}]*)\}")
_PLAIN_UNIT = re.compile(r"^([-+]?[\d.,/]+)\s+(?:[A-Za-z]{2,}\.?\s*)+(?:\^\{?\d\}?)?$")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_SIMPLE_LHS = re.compile(r"^(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z,]*\))?|\\[A-Za-z]+)$")  # x, x_1, f(x), \theta
_IN_PREFIX = re.compile(r"^[A-Za-z]\s*\\in\s*")


def _remove_whitespace(s: str) -> str:
    # Space is insignificant in math mode except between two letters ("\pi r" must not become "\pir").
    s = re.sub(r"(?<=[A-Za-z])\s+(?=[A-Za-z])", "\x00", s)
    s = re.sub(r"\s+", "", s)
    return s.replace("\x00", " ")


def normalize_answer(answer: str) -> Normalized:
    """A canonical string for an answer: delimiters, spacing, \\left/\\right, \\dfrac, degrees, units,
    dollar signs, thousands separators and \\text{} wrappers removed; '%' removed and remembered."""
    s = answer.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    for left, right in _DELIMITERS:
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            s = s[len(left) : -len(right)].strip()
            break
    s = s.replace("\n", " ").replace("\u2212", "-").replace("\u221e", "\\infty").replace("\u03c0", "\\pi ")
    s = re.sub(r"\u221a\s*(\d+|[A-Za-z])", r"\\sqrt{\1}", s).replace("\u221a", "\\sqrt")
    # "3 and 5", "x = 1 \text{ or } x = -1": a list of solutions.
    s = re.sub(r"\s*\\text\{\s*(?:and|or)\s*\}\s*", ",", s)
    s = re.sub(r"\s+(?:and|or)\s+(?=[-+\d\\(\[]|[A-Za-z]\s*=)", ",", s)
    s = re.sub(r"(?<=\d),\\!\s*(?=\d{3})", "", s)  # MATH's thousands separator: 11,\! 111
    s = _THIN_SPACE.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _LEFT_RIGHT.sub("", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = s.replace("{,}", "")
    degrees = False
    if _DEGREES.search(s):
        bare = _DEGREES.sub("", s).strip()
        compact = re.sub(r"\s+", "", bare)
        if _PLAIN_NUMBER.match(compact) or parse_exact_number(compact) is not None:
            s, degrees = bare, True  # "30^\circ" answers "how many degrees": 30
        else:
            # Inside an expression ("\cos 20^\circ") a degree is pi/180 radians.
            s = re.sub(r"(\d+(?:\.\d+)?)" + _DEGREES.pattern, r"(\1\\pi/180)", s)
            s = _DEGREES.sub("", s)
    percent = bool(re.search(r"\\?%", s))
    s = re.sub(r"\s*\\?%", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    # A unit after a number ("5 \text{cm}", "12 \mbox{inches}^2") is dropped; a whole-answer \text{} is kept.
    while True:
        stripped = _TRAILING_TEXT_UNIT.sub("", s)
        if stripped == s or not stripped.strip():
            break
        s = stripped.strip()
    was_text = bool(re.search(_TEXT_COMMAND + r"\s*\{", s))
    s = _TEXT_WRAPPER.sub(r"\1", s)
    unit = _PLAIN_UNIT.match(s.strip())
    if unit:
        s = unit.group(1)
    s = _IN_PREFIX.sub("", s.strip())
    s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _remove_whitespace(s).rstrip(".")
    return Normalized(s, percent=percent, was_text=was_text, degrees=degrees)


# --------------------------------------------------------------------------------------------------------
# Exact numbers (the fast path: no sympy)
# --------------------------------------------------------------------------------------------------------

_DECIMAL = re.compile(r"^([-+]?)(\d+\.?\d*|\.\d+)$")
_FRAC = re.compile(r"^([-+]?)\\frac(?:\{([-+]?\d+)\}|(\d))(?:\{([-+]?\d+)\}|(\d))$")
_SLASH = re.compile(r"^([-+]?)(\d+)/(\d+)$")
_MIXED = re.compile(r"^([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")
_SCIENTIFIC = re.compile(r"^([-+]?)(\d+\.?\d*)(?:\\times|\\cdot|\*)10\^(?:\{([-+]?\d+)\}|(\d))$")
_REPEATING = re.compile(r"^([-+]?)(\d*)\.(\d*)\\overline\{?(\d+)\}?$")
_PAREN_SLASH = re.compile(r"^([-+]?)\((\d+)\)/\((\d+)\)$")


def parse_exact_number(s: str) -> Fraction | None:
    """An integer, decimal, fraction (\\frac{a}{b}, \\frac12, a/b) or mixed number (2\\frac{1}{2}) as an
    exact rational; None for anything else. `s` is a normalized answer."""
    if len(s) > 200:  # int() of a >4300-digit string raises; nothing that long is a plain number
        return None
    m = _DECIMAL.match(s)
    if m:
        value = Fraction(m.group(2))
        return -value if m.group(1) == "-" else value
    m = _FRAC.match(s)
    if m:
        num = int(m.group(2) or m.group(3))
        den = int(m.group(4) or m.group(5))
        if den == 0:
            return None
        value = Fraction(num, den)
        return -value if m.group(1) == "-" else value
    for pattern in (_SLASH, _PAREN_SLASH):
        m = pattern.match(s)
        if m:
            if int(m.group(3)) == 0:
                return None
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
    m = _REPEATING.match(s)
    if m:
        # 0.1\overline{6} = (16 - 1) / 90: the digits with and without the repeating block.
        whole, fixed, block = m.group(2) or "0", m.group(3), m.group(4)
        value = Fraction(int(whole + fixed + block) - int(whole + fixed), 10 ** len(fixed) * (10 ** len(block) - 1))
        return -value if m.group(1) == "-" else value
    m = _SCIENTIFIC.match(s)
    if m:
        exponent = int(m.group(3) or m.group(4))
        if abs(exponent) <= 400:
            value = Fraction(m.group(2)) * Fraction(10) ** exponent
            return -value if m.group(1) == "-" else value
    m = _MIXED.match(s)
    if m and int(m.group(4)) != 0:
        # MATH writes mixed numbers as 2\frac{1}{2} = 5/2 (not 2 * 1/2).
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -value if m.group(1) == "-" else value
    return None


def _is_decimal(s: str) -> bool:
    return "." in s and _DECIMAL.match(s) is not None


def _terminates(value: Fraction) -> bool:
    """Whether the rational has a finite decimal expansion (its denominator is 2^a 5^b)."""
    den = value.denominator
    for prime in (2, 5):
        while den % prime == 0:
            den //= prime
    return den == 1


# --------------------------------------------------------------------------------------------------------
# Structure: tuples, intervals, sets, unions, matrices
# --------------------------------------------------------------------------------------------------------

_OPEN = "([{"
_CLOSE = ")]}"


def _split_top_level(s: str, separator: str) -> list[str]:
    """Split at `separator` outside of any brackets ((), [], {}, \\{\\}; intervals may mix them)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\langle", i):
            depth += 1
            i += 2 if s[i + 1] == "{" else 7
            continue
        if s.startswith("\\}", i) or s.startswith("\\rangle", i):
            depth -= 1
            i += 2 if s[i + 1] == "}" else 7
            continue
        ch = s[i]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            i += len(separator)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _expand_pm(items: Sequence[str]) -> tuple[str, ...]:
    """Solutions written as a \\pm b are the two answers a + b and a - b."""
    out: list[str] = []
    for item in items:
        if item.count("\\pm") == 1:
            out += [item.replace("\\pm", "+"), item.replace("\\pm", "-")]
        else:
            out.append(item)
    return tuple(out)


def _encloses(s: str, open_len: int, close_len: int) -> bool:
    """Whether the bracket opening `s` is the one closing it (so "(1,2)" yes, "(1)+(2)" no)."""
    inner = s[open_len : len(s) - close_len]
    depth = 0
    i = 0
    while i < len(inner):
        if inner.startswith("\\{", i) or inner.startswith("\\}", i):
            depth += 1 if inner[i + 1] == "{" else -1
            i += 2
            continue
        if inner[i] in _OPEN:
            depth += 1
        elif inner[i] in _CLOSE:
            depth -= 1
        if depth < 0:
            return False
        i += 1
    return depth == 0


_MATRIX = re.compile(r"^[(\[]?\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}[)\]]?$", re.DOTALL)


@dataclass(frozen=True)
class Collection:
    """A structured answer: `kind` in {"set", "list", "tuple", "union", "matrix"}."""

    kind: str
    items: tuple[str, ...]
    brackets: str = ""  # the opening and closing bracket of a tuple or interval, e.g. "(]"
    shape: tuple[int, int] = (0, 0)


def parse_collection(s: str) -> Collection | None:
    """The structure of a normalized answer, or None for a single value."""
    m = _MATRIX.match(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip() != ""]
        cells = [row.split("&") for row in rows]
        width = len(cells[0]) if cells else 0
        if any(len(row) != width for row in cells):
            return Collection("matrix", tuple(s), shape=(-1, -1))
        return Collection("matrix", tuple(c.strip() for row in cells for c in row), shape=(len(cells), width))
    union = _split_top_level(s, "\\cup")
    if len(union) > 1:
        return Collection("union", tuple(union))
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 2, 2):
        inner = s[2:-2]
        return Collection("set", _expand_pm(_split_top_level(inner, ",")) if inner else ())
    if s in ("\\emptyset", "\\varnothing", "\\O"):
        return Collection("set", ())
    if s.startswith("\\langle") and s.endswith("\\rangle"):
        return Collection("tuple", tuple(_split_top_level(s[7:-7], ",")), brackets="()")
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s, 1, 1):
        items = _split_top_level(s[1:-1], ",")
        if len(items) > 1:
            return Collection("tuple", tuple(items), brackets=s[0] + s[-1])
        return None
    items = _split_top_level(s, ",")
    if len(items) > 1:
        return Collection("list", _expand_pm(items))
    if s.count("\\pm") == 1:
        # a \pm b is the two answers a + b and a - b.
        return Collection("list", (s.replace("\\pm", "+"), s.replace("\\pm", "-")))
    return None


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------


@dataclass
class GradingStats:
    """Counts of how comparisons were decided; the failures (`timeouts`, `errors`, `oversize`) graded
    not-equal. Thread-safe: every update holds the lock."""

    comparisons: int = 0
    # How answers and their parts (the items of a tuple count one each) were decided:
    fast: int = 0  # on strings and exact rationals, no sympy
    symbolic: int = 0  # by the sympy worker
    cache_hits: int = 0
    unparsed: int = 0  # sympy could not parse one side: graded not-equal (not a grader failure)
    timeouts: int = 0
    errors: int = 0
    oversize: int = 0  # refused by the size guard: compared as strings only
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    @property
    def failures(self) -> int:
        return self.timeouts + self.errors + self.oversize

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d["failures"] = d["timeouts"] + d["errors"] + d["oversize"]
        return d

    def summary(self) -> str:
        """One line for a command's report: the comparisons, and the answers that could not be graded."""
        d = self.as_dict()
        line = f"grading: {d['comparisons']} comparisons"
        if d["failures"]:
            line += (f", {d['failures']} answers could not be graded and count as wrong ({d['timeouts']} timeouts, "
                     f"{d['errors']} errors, {d['oversize']} refused as oversize)")
        else:
            line += ", none failed"
        return line

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, 0)


# --------------------------------------------------------------------------------------------------------
# The sympy worker: a child process, so that a runaway sympy call can be killed from any thread
# --------------------------------------------------------------------------------------------------------


class _WorkerDied(Exception):
    pass


class _Worker:
    """One child process running `worker_main`: JSON lines in, JSON lines out."""

    STARTUP_TIMEOUT = 120.0

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from mathagent.grading import worker_main; worker_main()"],
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
            raise _WorkerDied("the sympy worker did not start")

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
                raise _WorkerDied("the sympy worker exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The worker's answer, or None at the deadline (the worker is then dead: kill it)."""
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerDied(str(e)) from e
        line = self._read_line(timeout)
        if line is None:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise _WorkerDied(f"the sympy worker said {line[:80]!r}") from e

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


class _WorkerPool:
    """At most `size` workers, started on first use; a worker past its deadline is killed and replaced."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._slots = threading.Semaphore(self.size)
        self._lock = threading.Lock()
        self._closed = False

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        with self._slots:
            with self._lock:
                if self._closed:
                    raise _WorkerDied("the grader is closed")
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = _Worker()
                with self._lock:
                    self._all.append(worker)
            try:
                result = worker.call(request, timeout)
            except _WorkerDied:
                self._discard(worker)
                raise
            if result is None:
                self._discard(worker)
            else:
                with self._lock:
                    self._idle.append(worker)
            return result

    def _discard(self, worker: _Worker) -> None:
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


# --------------------------------------------------------------------------------------------------------
# The grader
# --------------------------------------------------------------------------------------------------------

# latex2sympy2 evaluates binomials while parsing (C(300000, 150000) takes seconds): refuse big ones before.
_BIG_BINOMIAL = re.compile(r"\\[dt]?binom\s*\{?\s*\d{5,}|\d{5,}\s*\}?\s*\\choose")
_CHOICE = re.compile(r"^\(?([A-J])\)$|^([A-J])$")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z'\- ]*$")


class Grader:
    """Decides a_hat == a* with fixed options; holds the sympy workers and the `stats` counters.

    Safe to share between threads. Create one per command, hand it to what grades, and `close()` it (or use
    `with`).
    """

    def __init__(
        self,
        *,
        rel_tol: float = DEFAULT_REL_TOL,
        abs_tol: float = DEFAULT_ABS_TOL,
        percent_scaling: bool = False,
        timeout: float = 5.0,
        workers: int | None = None,
        cache_size: int = 65536,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise UserError(f"--grading-timeout {timeout}: must be a positive number of seconds")
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.percent_scaling = percent_scaling
        self.timeout = timeout
        self.stats = GradingStats()
        self._pool = _WorkerPool(workers or min(4, os.cpu_count() or 1))
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    # ---- public -------------------------------------------------------------------------------------

    def is_equivalent(self, pred: str | None, gold: str | None, *, timeout: float | None = None) -> bool:
        """Whether the predicted answer equals the reference; never raises (a failure is counted, False)."""
        if pred is None or gold is None:
            return False
        self.stats.add("comparisons")
        try:
            pred, gold = str(pred), str(gold)  # an integer answer field (GSM8K-style data) is still an answer
            return self._equal(normalize_answer(gold), normalize_answer(pred), time.monotonic() + (timeout or self.timeout), 0)
        except Exception:  # noqa: BLE001 - a grading bug must not kill a rollout; it is counted instead
            self.stats.add("errors")
            return False

    def reward(self, pred: str | None, gold: str, kind: str = "r1") -> float:
        """The reward of a boxed answer `pred` (None: no boxed answer). r1: +1 correct, -0.5 wrong, -1 none;
        binary: 1 or 0."""
        if kind not in REWARD_KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; choose from {REWARD_KINDS}")
        return outcome_reward(pred is not None, self.is_equivalent(pred, gold), kind)

    # ---- comparison ---------------------------------------------------------------------------------

    def _equal(self, gold: Normalized, pred: Normalized, deadline: float, depth: int) -> bool:
        g, p = gold.text, pred.text
        if not g or not p:
            return False
        if len(g) > MAX_ANSWER_CHARS or len(p) > MAX_ANSWER_CHARS:
            self.stats.add("oversize")
            return g == p
        if g == p:
            self.stats.add("fast")
            return True

        # Equations "x = 3": compare right-hand sides when the left is a lone variable.
        g, p, decided = self._strip_assignments(g, p)
        if decided is not None:
            self.stats.add("fast")
            return decided
        if g == p:
            self.stats.add("fast")
            return True

        # A number of degrees against radians: 30^\circ and \frac{\pi}{6}.
        if gold.degrees and "\\pi" in p and "\\pi" not in g:
            p = f"({p})\\cdot\\frac{{180}}{{\\pi}}"
        elif pred.degrees and "\\pi" in g and "\\pi" not in p:
            g = f"({g})\\cdot\\frac{{180}}{{\\pi}}"

        # Structured answers are compared part by part.
        g_coll, p_coll = parse_collection(g), parse_collection(p)
        if g_coll is not None or p_coll is not None:
            return self._collections_equal(g_coll, p_coll, g, p, deadline, depth)

        # Multiple-choice letters: "(C)", "C", "\text{(C)}". A gold marked as a choice (parentheses or \text)
        # takes the letter in any case ("c", "(c)"), as math-verify does; a bare "C" stays a case-sensitive symbol.
        g_choice = _CHOICE.match(g)
        marked = g_choice is not None and (gold.was_text or g.startswith("("))
        p_choice = _CHOICE.match(p.upper() if marked else p)
        if g_choice and (marked or p_choice):
            self.stats.add("fast")
            return bool(p_choice) and (g_choice.group(1) or g_choice.group(2)) == (p_choice.group(1) or p_choice.group(2))

        # Single letters are case-sensitive (the parser lowercases: math-verify grades "c" equal to "C").
        if len(g) == 1 and len(p) == 1 and g.isalpha() and p.isalpha():
            self.stats.add("fast")
            return False

        # Exact numbers.
        g_num, p_num = parse_exact_number(g), parse_exact_number(p)
        if g_num is not None and p_num is not None:
            self.stats.add("fast")
            if g_num == p_num:
                return True
            if self.percent_scaling and (p_num == g_num * 100 or p_num * 100 == g_num):
                return True
            if _is_decimal(p) != _is_decimal(g) and not (_terminates(g_num) and _terminates(p_num)):
                # A decimal against a repeating fraction (0.3333333333 vs 1/3) can only be close.
                return self._close(float(p_num), float(g_num))
            return False

        # Word answers ("Monday", "\text{no solution}") compare as text, case-insensitively.
        if _WORDS.match(g) and _WORDS.match(p):
            long_word = max(len(w) for w in re.split(r"[ '\-]", g + " " + p) if w) >= 3 or " " in g + p
            if gold.was_text or pred.was_text or long_word:
                self.stats.add("fast")
                return g.lower() == p.lower()
        if (g_num is not None and _WORDS.match(p)) or (p_num is not None and _WORDS.match(g)):
            self.stats.add("fast")
            return False

        return self._symbolic_equal(g, p, deadline)

    def _close(self, pred: float, gold: float) -> bool:
        return abs(pred - gold) <= self.abs_tol + self.rel_tol * abs(gold)

    def _strip_assignments(self, g: str, p: str) -> tuple[str, str, bool | None]:
        """"x = 3" against "3" or "x = 3" compares 3 with 3; "x = 3" against "y = 3" is not equal. A general
        equation ("2x - y + 3 = 0") keeps the other side's "y =" so the two equations are compared whole."""
        g_parts, p_parts = _split_top_level(g, "="), _split_top_level(p, "=")
        g_lhs = g_parts[0] if len(g_parts) == 2 and _SIMPLE_LHS.match(g_parts[0]) else None
        p_lhs = p_parts[0] if len(p_parts) == 2 and _SIMPLE_LHS.match(p_parts[0]) else None
        if g_lhs is not None and p_lhs is not None and g_lhs != p_lhs:
            return g, p, False
        if (g_lhs is None and len(g_parts) > 1) or (p_lhs is None and len(p_parts) > 1):
            return g, p, None
        return (g_parts[1] if g_lhs else g), (p_parts[1] if p_lhs else p), None

    def _collections_equal(
        self, g_coll: Collection | None, p_coll: Collection | None, g: str, p: str, deadline: float, depth: int
    ) -> bool:
        self.stats.add("fast")
        if g_coll is None or p_coll is None or depth > 4:
            return False
        if len(g_coll.items) > MAX_ELEMENTS or len(p_coll.items) > MAX_ELEMENTS:
            self.stats.add("oversize")
            return g == p

        def item_equal(a: str, b: str) -> bool:
            return self._equal(normalize_answer(a), normalize_answer(b), deadline, depth + 1)

        # "x=2, y=3": values by variable against another such list, or in order against a tuple (2, 3).
        g_vars, p_vars = _assignments(g_coll), _assignments(p_coll)
        if g_vars is not None and p_vars is not None and len(g_vars) > 1 and len(p_vars) > 1:
            return g_vars.keys() == p_vars.keys() and all(item_equal(g_vars[v], p_vars[v]) for v in g_vars)
        if g_vars is not None and len(g_vars) > 1 and p_coll.kind == "tuple":
            return _all_pairs(item_equal, tuple(g_vars.values()), p_coll.items)
        if p_vars is not None and len(p_vars) > 1 and g_coll.kind == "tuple":
            return _all_pairs(item_equal, g_coll.items, tuple(p_vars.values()))

        kinds = {g_coll.kind, p_coll.kind}
        if kinds == {"matrix"}:
            return g_coll.shape == p_coll.shape and g_coll.shape[0] >= 0 and _all_pairs(item_equal, g_coll.items, p_coll.items)
        if "matrix" in kinds:
            # A one-row or one-column matrix against a tuple: a vector either way.
            matrix, other = (g_coll, p_coll) if g_coll.kind == "matrix" else (p_coll, g_coll)
            if other.kind != "tuple" or min(matrix.shape) != 1:
                return False
            return _all_pairs(item_equal, g_coll.items, p_coll.items)
        if kinds == {"tuple"}:
            return g_coll.brackets == p_coll.brackets and _all_pairs(item_equal, g_coll.items, p_coll.items)
        if kinds <= {"set", "list"} or kinds == {"union"}:
            return _matching_exists(item_equal, g_coll.items, p_coll.items)
        return False

    def _symbolic_equal(self, g: str, p: str, deadline: float) -> bool:
        if _BIG_BINOMIAL.search(g) or _BIG_BINOMIAL.search(p):
            self.stats.add("oversize")
            return False
        key = (g, p)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is not None:
            self.stats.add("cache_hits")
            return cached
        if deadline <= time.monotonic():
            self.stats.add("timeouts")
            return False
        self.stats.add("symbolic")
        request = {"gold": g, "pred": p, "rel_tol": self.rel_tol, "abs_tol": self.abs_tol}
        try:
            # One deadline for the whole answer, shared by the parts of a tuple or set.
            result = self._pool.call(request, deadline - time.monotonic())
        except _WorkerDied:
            self.stats.add("errors")
            return False
        if result is None:
            self.stats.add("timeouts")
            equal = False
        elif result.get("error"):
            error = result["error"]
            self.stats.add(error if error in ("unparsed", "oversize") else "errors")
            equal = False
        else:
            equal = bool(result["equal"])
        with self._cache_lock:
            self._cache[key] = equal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return equal


def _assignments(collection: Collection) -> dict[str, str] | None:
    """{variable: value} of a list of assignments to distinct variables ("x=2, y=3"), else None."""
    if collection.kind != "list":
        return None
    values: dict[str, str] = {}
    for item in collection.items:
        parts = _split_top_level(item, "=")
        if len(parts) != 2 or not _SIMPLE_LHS.match(parts[0]) or parts[0] in values:
            return None
        values[parts[0]] = parts[1]
    return values


def _all_pairs(equal, golds: Sequence[str], preds: Sequence[str]) -> bool:
    return len(golds) == len(preds) and all(equal(g, p) for g, p in zip(golds, preds))


def _matching_exists(equal, golds: Sequence[str], preds: Sequence[str]) -> bool:
    """Whether the preds are a permutation of the golds under `equal` (a perfect bipartite matching)."""
    if len(golds) != len(preds):
        return False
    edges = [[j for j, p in enumerate(preds) if equal(g, p)] for g in golds]
    match_of_pred: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in match_of_pred or augment(match_of_pred[j], seen):
                match_of_pred[j] = i
                return True
        return False

    return all(augment(i, set()) for i in range(len(golds)))


# --------------------------------------------------------------------------------------------------------
# The worker's side: sympy
# --------------------------------------------------------------------------------------------------------

# Points at which two expressions in free symbols are compared (an identity test: two different
# expressions agree at all of them only by accident). Irregular values avoid the special points of trig and
# rational functions; one is negative so that |x| and x differ.
_SAMPLE_POINTS = ("0.7316512", "1.4187653", "2.2360131", "-1.1237359", "0.3819662")


def _sympy_equal(gold: str, pred: str, rel_tol: float, abs_tol: float) -> bool:
    """The worker's comparison of two normalized single-value answers (raises _Unparsed)."""
    import sympy
    from sympy import Float, MatrixBase
    from sympy.core.relational import Relational

    g, p = _parse_latex(gold), _parse_latex(pred)
    if isinstance(g, Relational) and isinstance(p, Relational):
        return _relations_equal(g, p, rel_tol, abs_tol)
    if isinstance(g, Relational) or isinstance(p, Relational):
        # An equation against a value: "x = 3" against "3" was settled on the strings; "2x = 3" against "3"
        # is a different answer (math-verify compares the right-hand sides and says equal).
        return False
    if isinstance(g, MatrixBase) or isinstance(p, MatrixBase) or not isinstance(g, sympy.Expr) or not isinstance(p, sympy.Expr):
        from math_verify import verify

        return verify(g, p, float_rounding=9, numeric_precision=40, timeout_seconds=None)
    if g == p:
        return True
    exact = not (g.has(Float) or p.has(Float))
    free = sorted(g.free_symbols | p.free_symbols, key=str)
    if not free:
        return _numbers_equal(g, p, exact, rel_tol, abs_tol)
    return _functions_equal(g, p, free, exact, rel_tol, abs_tol)


class _Unparsed(Exception):
    pass


class _Oversize(Exception):
    """Too big to evaluate (a tower of powers): equal only if written identically."""


_PARSE_CACHE: OrderedDict[str, Any] = OrderedDict()


def _parse_latex(s: str):
    if s in _PARSE_CACHE:
        return _PARSE_CACHE[s]
    from latex2sympy2_extended import NormalizationConfig, latex2sympy
    from math_verify.grader import should_treat_as_complex

    try:
        expr = latex2sympy(
            s,
            is_real=not should_treat_as_complex(s),
            convert_degrees=False,
            normalization_config=NormalizationConfig(
                basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False
            ),
        )
    except Exception as e:  # noqa: BLE001 - any parser failure means "not an expression"
        raise _Unparsed(str(e)) from e
    if should_treat_as_complex(s):
        # latex2sympy2 reads i as a plain symbol; in an answer it is the imaginary unit.
        import sympy

        expr = expr.subs({symbol: sympy.I for symbol in getattr(expr, "free_symbols", ()) if symbol.name == "i"})
    _PARSE_CACHE[s] = expr
    if len(_PARSE_CACHE) > 4096:
        _PARSE_CACHE.popitem(last=False)
    return expr


_EXACT_BITS = 2e5  # exact integers up to ~60,000 digits are cheap; beyond, compare to 60 significant digits
_EVALF_BITS = 1e15  # beyond this even the exponent of a float is unmanageable: compare the trees only


def _size_class(expr) -> int:
    """0: evaluate exactly; 1: too big to build exactly, evaluate to 60 digits; 2: too big to evaluate.

    The size of b^e is about e * log2|b| bits, of n! about n * log2(n) bits and of C(n, k) at most n bits,
    estimated with 15-digit floats (which mpmath keeps finite far beyond the machine's range). Long sums and
    products are left to the deadline."""
    import sympy

    size = 0
    for node in sympy.preorder_traversal(expr):
        bits = 0.0
        try:
            if isinstance(node, sympy.Pow) and node.base.is_number and node.exp.is_number:
                base = abs(sympy.N(node.base, 15))
                if base not in (0, 1):
                    bits = float(abs(sympy.N(node.exp, 15)) * abs(sympy.log(base, 2)).evalf(15))
            elif isinstance(node, (sympy.factorial, sympy.gamma)) and node.args[0].is_number:
                n = float(abs(sympy.N(node.args[0], 15)))
                bits = n * math.log2(max(n, 2.0))
            elif isinstance(node, sympy.binomial) and node.args[0].is_number:
                bits = float(abs(sympy.N(node.args[0], 15)))  # C(n, k) < 2^n
        except (TypeError, ValueError, OverflowError):
            return 2
        if not math.isfinite(bits) or bits > _EVALF_BITS:
            return 2
        if bits > _EXACT_BITS:
            size = 1
    return size


def _numbers_equal(g, p, exact: bool, rel_tol: float, abs_tol: float) -> bool:
    import sympy

    size = max(_size_class(g), _size_class(p))
    if size == 2:
        if g == p:
            return True
        raise _Oversize()
    if exact and size == 0:
        g_val, p_val = g.doit(), p.doit()
        if g_val.is_Rational and p_val.is_Rational:
            return g_val == p_val  # exact: 1/2004! != 1/2006!
    a, b = sympy.N(p, 60), sympy.N(g, 60)
    if not (a.is_number and b.is_number) or a.has(sympy.nan, sympy.zoo):
        return False
    if a.is_infinite or b.is_infinite:
        return a == b
    diff = sympy.Abs(a - b).evalf(60)
    scale = sympy.Abs(b).evalf(60)
    if exact:
        # Both sides are exact: only evaluation noise at 60 digits may separate them.
        return bool(diff <= sympy.Float("1e-45", 60) * max(scale, sympy.Abs(a).evalf(60)) or diff == 0)
    return bool(diff <= abs_tol + rel_tol * scale)


def _functions_equal(g, p, free, exact: bool, rel_tol: float, abs_tol: float) -> bool:
    import sympy

    agreed = 0
    for k in range(len(_SAMPLE_POINTS)):
        subs = {s: sympy.Float(_SAMPLE_POINTS[(i + k) % len(_SAMPLE_POINTS)], 30) for i, s in enumerate(free)}
        try:
            a, b = sympy.N(p.subs(subs), 30), sympy.N(g.subs(subs), 30)
        except Exception:  # noqa: BLE001 - undefined at this point: try the next one
            continue
        if not (a.is_number and b.is_number) or a.has(sympy.nan, sympy.zoo) or b.has(sympy.nan, sympy.zoo):
            continue
        diff = sympy.Abs(a - b).evalf(30)
        tol = (1e-20 if exact else rel_tol) * max(sympy.Abs(b).evalf(30), 1) + (0 if exact else abs_tol)
        if diff > tol:
            return False
        agreed += 1
    if agreed >= 3:
        return True
    return sympy.simplify(g - p) == 0


def _relations_equal(g, p, rel_tol: float, abs_tol: float) -> bool:
    """Two equations are equal when lhs - rhs of one is a nonzero constant multiple of the other's."""
    import sympy

    if type(g) is not type(p) or not isinstance(g, sympy.Eq):
        from math_verify import verify

        return verify(g, p, float_rounding=9, numeric_precision=40, timeout_seconds=None)
    d_g, d_p = g.lhs - g.rhs, p.lhs - p.rhs
    free = sorted(d_g.free_symbols | d_p.free_symbols, key=str)
    if not free:
        return False
    subs = {s: sympy.Float(_SAMPLE_POINTS[i % len(_SAMPLE_POINTS)], 30) for i, s in enumerate(free)}
    base = sympy.N(d_g.subs(subs), 30)
    if base == 0:
        return False
    ratio = sympy.nsimplify(sympy.N(d_p.subs(subs), 30) / base, rational=True, tolerance=1e-12)
    if ratio == 0:
        return False
    exact = not (g.has(sympy.Float) or p.has(sympy.Float))
    return _functions_equal(d_g * ratio, d_p, free, exact, rel_tol, abs_tol)


def worker_main() -> None:
    """The loop of a sympy worker process: one JSON request per line on stdin, one answer on stdout."""
    import logging
    import resource

    logging.disable(logging.CRITICAL)
    try:
        # A runaway exact integer raises MemoryError instead of taking the machine's memory.
        limit = 3 * 1024**3
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    import latex2sympy2_extended  # noqa: F401 - import before "ready" so startup is not billed to a request
    import sympy  # noqa: F401

    # The protocol owns the real stdout; anything a library prints goes to stderr (discarded by the parent).
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = _sympy_equal(request["gold"], request["pred"], request["rel_tol"], request["abs_tol"])
            answer = {"equal": bool(equal)}
        except _Unparsed:
            answer = {"equal": False, "error": "unparsed"}
        except _Oversize:
            answer = {"equal": False, "error": "oversize"}
        except BaseException as e:  # noqa: BLE001 - MemoryError, RecursionError, sympy bugs: report, keep serving
            answer = {"equal": False, "error": f"{type(e).__name__}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def check_verdict_reward(weight: float) -> float:
    """w of `grade_trajectory`: 0 or positive."""
    if not (math.isfinite(weight) and weight >= 0):
        raise UserError(f"--verdict-reward {weight}: must be 0 or positive")
    return weight


def parse_answer_modes(text: str) -> tuple[str, ...]:
    """--answer-modes: a comma list of ANSWER_MODES, tried in order."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in ANSWER_MODES for m in modes):
        raise UserError(f"--answer-modes {text!r}: choose from {', '.join(ANSWER_MODES)}")
    return modes


def outcome_reward(boxed: bool, correct: bool, kind: str = "r1") -> float:
    """The reward of an answer already graded: r1 (DeepSeek-R1's rule) is +1 boxed and correct, -0.5 boxed and
    wrong, -1 without a boxed answer (even when another answer form was read and graded); binary is
    1[correct]."""
    if kind == "binary":
        return 1.0 if correct else 0.0
    if not boxed:
        return -1.0
    return 1.0 if correct else -0.5


def grade_trajectory(
    trajectory: dict[str, Any],
    grader: Grader,
    *,
    answer_modes: Sequence[str] = ("boxed",),
    reward_kind: str = "r1",
    verdict_reward: float = 0.0,
) -> dict[str, Any]:
    """A copy of the trajectory with `pred`, `correct`, `reward` set from its messages (never from its stored
    fields): pred is the answer of the last action. Without a reference `answer`, `correct` and `reward` are
    None.

    A trajectory of self-rewarding correction (one that holds the model's own verdicts, or the `verdicts` a
    self-rewarding rollout asked for; `correction`) is graded on its final attempt's answer instead, and gets
    `attempts`: each attempt's answer, verdict and correctness. Its reward is that of the final answer, plus,
    with `verdict_reward` w > 0, w times the mean over its judged attempts of +1 for a faithful verdict
    ("correct" of a right answer, "wrong" of a wrong one) and -1 for a false one (`correction.verdict_term`)."""
    from mathagent import correction
    from mathagent.records import last_action

    content = last_action(trajectory["messages"])
    pred = extract_answer(content, answer_modes) if content is not None else None
    boxed = content is not None and extract_boxed(content) is not None
    graded = dict(trajectory)
    gold = trajectory.get("answer")
    verdicts = trajectory.get("verdicts")  # the verdict strings a self-rewarding rollout asked for
    markers = correction.DEFAULT_MARKERS
    if isinstance(verdicts, dict) and all(isinstance(verdicts.get(k), str) and verdicts[k].strip()
                                          for k in ("correct", "wrong")):
        markers = correction.Markers(correct=verdicts["correct"], wrong=verdicts["wrong"])
    attempts = correction.parse_attempts(trajectory["messages"], markers)
    if attempts and (verdicts is not None or any(a.verdict is not None for a in attempts)):
        pred = attempts[-1].answer
        boxed = pred is not None
        graded["attempts"] = correction.graded_attempts(attempts, None if gold is None else str(gold),
                                                        grader.is_equivalent)
    graded["pred"] = pred
    if gold is None:
        graded["correct"] = None
        graded["reward"] = None
    else:
        graded["correct"] = grader.is_equivalent(pred, str(gold))
        graded["reward"] = outcome_reward(boxed, graded["correct"], reward_kind)
        if verdict_reward and "attempts" in graded:
            graded["reward"] += verdict_reward * correction.verdict_term(graded["attempts"])
    return graded
