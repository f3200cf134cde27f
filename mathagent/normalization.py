r"""Normalization of an answer string before it is compared (strings only, no sympy).

`normalize_answer` removes what does not change an answer's value: a surrounding \boxed{}, math delimiters,
spacing, \left/\right, \dfrac, units and \text{} wrappers, '$', thousands separators (1,\!000 and 1,000) and
"x \in" prefixes; it turns "3 and 5" into a list, and keeps what the comparison still needs as markers: a
'%' (a unit: "50%" is 50, never 0.5), a whole answer written in \text{} (a word, or a choice like \text{(C)}),
and a whole answer in degrees ("30^\circ" is 30; inside an expression a degree becomes pi/180).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mathagent.answers import extract_boxed
from mathagent.exact_numbers import parse_exact_number


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
