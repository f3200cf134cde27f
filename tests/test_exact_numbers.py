"""Tests of exact numbers, the grader's fast path (mathagent/exact_numbers.py)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from mathagent.exact_numbers import parse_exact_number


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-0.125", Fraction(-1, 8)),
        (r"\frac{3}{4}", Fraction(3, 4)),
        (r"\frac34", Fraction(3, 4)),
        (r"-\frac{3}{-4}", Fraction(3, 4)),
        ("7/2", Fraction(7, 2)),
        (r"2\frac{1}{2}", Fraction(5, 2)),
        (r"1.5\times10^{3}", Fraction(1500)),
        (r"\sqrt{2}", None),
        ("1/0", None),
    ],
)
def test_parse_exact_number(text, value):
    assert parse_exact_number(text) == value
