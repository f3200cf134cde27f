r"""Exact numbers, the grader's fast path: an answer that is a plain number becomes an exact rational.

Integers, decimals, fractions (\frac{a}{b}, \frac12, a/b, (a)/(b)), mixed numbers (MATH's 2\frac{1}{2} = 5/2),
repeating decimals (0.1\overline{6} = 1/6) and scientific notation are read as `fractions.Fraction`, without
sympy, so that 0.0000001 != 0.0000002 and 1000001 != 1000000 (math-verify rounds floats to 6 decimals).
`grading.Grader` compares two such numbers exactly; only a decimal against a non-terminating rational
(0.3333333333 against 1/3) is compared within a tolerance.
"""

from __future__ import annotations

import re
from fractions import Fraction

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


def is_decimal(s: str) -> bool:
    return "." in s and _DECIMAL.match(s) is not None


def terminates(value: Fraction) -> bool:
    """Whether the rational has a finite decimal expansion (its denominator is 2^a 5^b)."""
    den = value.denominator
    for prime in (2, 5):
        while den % prime == 0:
            den //= prime
    return den == 1
