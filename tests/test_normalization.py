"""Tests of answer normalization (mathagent/normalization.py)."""

from __future__ import annotations

import pytest

from mathagent.normalization import normalize_answer


@pytest.mark.parametrize(
    ("raw", "text", "percent"),
    [
        (r"$\dfrac{1}{2}$", r"\frac{1}{2}", False),
        (r"50\%", "50", True),
        (r"1,\!000", "1000", False),
        (r"5\text{ cm}^2", "5", False),
        (r"\text{Monday}", "Monday", False),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", False),
        (r"30^\circ", "30", False),
        (r"\$18.", "18", False),
        (r"x \in [1, 2]", "[1,2]", False),
    ],
)
def test_normalize_answer(raw, text, percent):
    normalized = normalize_answer(raw)
    assert normalized.text == text
    assert normalized.percent is percent
