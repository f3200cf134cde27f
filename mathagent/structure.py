r"""Structured answers: tuples, intervals, sets, solution lists, unions and matrices, split into their parts.

`parse_collection` tells them apart on a normalized string: an interval keeps its brackets ("(1,2]"), a set
(\{1, 2\}), a list of solutions ("1, 2", "x = \pm 1", "2 or 5" after normalization) and a union are compared
as multisets (`equal_as_multisets`, a perfect matching), tuples and matrices in order (`equal_in_order`).
`grading.Grader` compares each part by its own full procedure; this module only splits and matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# A lone variable on the left of "=": x, x_1, f(x), \theta ("x = 3" is the answer 3).
SIMPLE_LHS = re.compile(r"^(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z,]*\))?|\\[A-Za-z]+)$")

_OPEN = "([{"
_CLOSE = ")]}"


def split_top_level(s: str, separator: str) -> list[str]:
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
    union = split_top_level(s, "\\cup")
    if len(union) > 1:
        return Collection("union", tuple(union))
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 2, 2):
        inner = s[2:-2]
        return Collection("set", _expand_pm(split_top_level(inner, ",")) if inner else ())
    if s in ("\\emptyset", "\\varnothing", "\\O"):
        return Collection("set", ())
    if s.startswith("\\langle") and s.endswith("\\rangle"):
        return Collection("tuple", tuple(split_top_level(s[7:-7], ",")), brackets="()")
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s, 1, 1):
        items = split_top_level(s[1:-1], ",")
        if len(items) > 1:
            return Collection("tuple", tuple(items), brackets=s[0] + s[-1])
        return None
    items = split_top_level(s, ",")
    if len(items) > 1:
        return Collection("list", _expand_pm(items))
    if s.count("\\pm") == 1:
        # a \pm b is the two answers a + b and a - b.
        return Collection("list", (s.replace("\\pm", "+"), s.replace("\\pm", "-")))
    return None


def assignments(collection: Collection) -> dict[str, str] | None:
    """{variable: value} of a list of assignments to distinct variables ("x=2, y=3"), else None."""
    if collection.kind != "list":
        return None
    values: dict[str, str] = {}
    for item in collection.items:
        parts = split_top_level(item, "=")
        if len(parts) != 2 or not SIMPLE_LHS.match(parts[0]) or parts[0] in values:
            return None
        values[parts[0]] = parts[1]
    return values


def equal_in_order(equal, golds: Sequence[str], preds: Sequence[str]) -> bool:
    """Whether the items are equal pairwise, in order (a tuple, an interval, a matrix)."""
    return len(golds) == len(preds) and all(equal(g, p) for g, p in zip(golds, preds))


def equal_as_multisets(equal, golds: Sequence[str], preds: Sequence[str]) -> bool:
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

