r"""Answer equivalence: `Grader.is_equivalent(pred, gold)` decides a_hat == a*, the test inside every reward.

Equivalence builds on math-verify's LaTeX parser (latex2sympy2_extended) and replaces the parts of its
comparison that are wrong or unsafe for training. A comparison goes, in order:

1. normalization of both strings (`normalization.py`): math delimiters, spacing, \left/\right, \dfrac,
   units and \text{} wrappers, '$', thousands separators (1,\!000 and 1,000), degrees, '%' (a unit: "50%"
   is 50, never 0.5; `percent_scaling=True` asks for the lenient x100 rule of some published graders);
2. "x = 3" against "3" (a lone variable on the left), then structure (`structure.py`): tuples and intervals
   in order with their brackets, sets and solution lists ("1, 2", "x = \pm 1", "2 or 5") as multisets,
   unions, matrices by shape, each part compared by this same procedure;
3. choice letters ("(C)", "\text{(C)}": "C", "(C)", "c" all match), otherwise case-sensitive single letters
   (math-verify grades the symbol "c" equal to "C"), exact numbers as rationals without sympy
   (`exact_numbers.py`: 0.0000001 != 0.0000002 and 1000001 != 1000000, where math-verify rounds floats to 6
   decimals), word answers as text;
4. everything else in a sympy worker (`sympy_worker.py`): exact numbers exactly or to 60 significant digits,
   never with an absolute tolerance; a decimal against an irrational within |a - b| <= abs_tol + rel_tol * |b|
   (b the reference); expressions in variables by evaluation at fixed points; '^' is always a power.

Step 4 runs in child processes with a deadline (`sympy_pool.py`), so the grader is safe to call from any
thread, behind size guards and a memory limit. A comparison that fails, times out or is refused by a guard
grades not-equal and is counted in `GradingStats` (`Grader.stats`). A command creates one `Grader`, hands it
to the functions that grade, reports its counters and closes it: there is no grader at module level. Where
the answers come from is `answers.py`; what a trajectory earns for its answer is `rewards.py`.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields

from mathagent.exact_numbers import is_decimal, parse_exact_number, terminates
from mathagent.normalization import Normalized, normalize_answer
from mathagent.structure import (
    SIMPLE_LHS,
    Collection,
    assignments,
    equal_as_multisets,
    equal_in_order,
    parse_collection,
    split_top_level,
)
from mathagent.sympy_pool import WorkerDied, WorkerPool

# Tolerances for a decimal against an irrational reference. Exact numbers never use them.
DEFAULT_REL_TOL = 1e-9
DEFAULT_ABS_TOL = 1e-12
# Answers longer than this (after normalization) are compared as strings only: a real final answer is short,
# and sympy's parse time grows fast with length.
MAX_ANSWER_CHARS = 1000
# Collections (tuples, sets, matrices) with more elements than this are compared as strings only.
MAX_ELEMENTS = 64


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

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The counts added after `before` (an earlier `as_dict()`): one input's share of a grader it shares."""
        return {key: count - before[key] for key, count in self.as_dict().items()}

    def summary(self, counts: dict[str, int] | None = None) -> str:
        """One line for a command's report: the comparisons, and the answers that could not be graded (of
        `counts`, as `as_dict` or `since` gives them; default: all so far)."""
        d = counts if counts is not None else self.as_dict()
        line = f"grading: {d['comparisons']} comparisons"
        if d["failures"]:
            line += (f", {d['failures']} answers could not be graded and count as wrong ({d['timeouts']} timeouts, "
                     f"{d['errors']} errors, {d['oversize']} refused as oversize)")
        else:
            line += ", none failed"
        return line


# --------------------------------------------------------------------------------------------------------
# The grader
# --------------------------------------------------------------------------------------------------------

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
            raise ValueError(f"grading timeout {timeout}: must be a positive number of seconds")
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.percent_scaling = percent_scaling
        self.timeout = timeout
        self.stats = GradingStats()
        self._pool = WorkerPool(workers or min(4, os.cpu_count() or 1))
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
            if is_decimal(p) != is_decimal(g) and not (terminates(g_num) and terminates(p_num)):
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
        g_parts, p_parts = split_top_level(g, "="), split_top_level(p, "=")
        g_lhs = g_parts[0] if len(g_parts) == 2 and SIMPLE_LHS.match(g_parts[0]) else None
        p_lhs = p_parts[0] if len(p_parts) == 2 and SIMPLE_LHS.match(p_parts[0]) else None
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
        g_vars, p_vars = assignments(g_coll), assignments(p_coll)
        if g_vars is not None and p_vars is not None and len(g_vars) > 1 and len(p_vars) > 1:
            return g_vars.keys() == p_vars.keys() and all(item_equal(g_vars[v], p_vars[v]) for v in g_vars)
        if g_vars is not None and len(g_vars) > 1 and p_coll.kind == "tuple":
            return equal_in_order(item_equal, tuple(g_vars.values()), p_coll.items)
        if p_vars is not None and len(p_vars) > 1 and g_coll.kind == "tuple":
            return equal_in_order(item_equal, g_coll.items, tuple(p_vars.values()))

        kinds = {g_coll.kind, p_coll.kind}
        if kinds == {"matrix"}:
            return g_coll.shape == p_coll.shape and g_coll.shape[0] >= 0 and equal_in_order(item_equal, g_coll.items, p_coll.items)
        if "matrix" in kinds:
            # A one-row or one-column matrix against a tuple: a vector either way.
            matrix, other = (g_coll, p_coll) if g_coll.kind == "matrix" else (p_coll, g_coll)
            if other.kind != "tuple" or min(matrix.shape) != 1:
                return False
            return equal_in_order(item_equal, g_coll.items, p_coll.items)
        if kinds == {"tuple"}:
            return g_coll.brackets == p_coll.brackets and equal_in_order(item_equal, g_coll.items, p_coll.items)
        if kinds <= {"set", "list"} or kinds == {"union"}:
            return equal_as_multisets(item_equal, g_coll.items, p_coll.items)
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
        except WorkerDied:
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

