"""Tests of answer extraction (mathagent/answers.py)."""

from __future__ import annotations

import pytest

from mathagent.answers import extract_answer, extract_boxed


def test_extract_boxed_takes_the_last_box_with_nested_braces():
    text = r"First \boxed{1}, then \boxed{\frac{1}{\sqrt{2}}} and that is it."
    assert extract_boxed(text) == r"\frac{1}{\sqrt{2}}"


def test_extract_boxed_reads_fbox_and_the_braceless_form():
    assert extract_boxed(r"so \fbox{42}.") == "42"
    assert extract_boxed(r"the answer is $\boxed 5$.") == "5"


def test_extract_boxed_keeps_escaped_set_braces():
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"


def test_extract_boxed_skips_a_box_cut_off_by_the_token_limit():
    assert extract_boxed(r"\boxed{3} ... finally \boxed{\frac{1}{") == "3"
    assert extract_boxed(r"\boxed{\frac{1}{") is None


def test_extract_boxed_finds_nothing_without_a_box_or_in_an_empty_one():
    assert extract_boxed("The answer is 5.") is None
    assert extract_boxed(r"\boxed{ }") is None
    assert extract_boxed(r"\boxedfoo{3}") is None


def test_extract_answer_modes_are_tried_in_order():
    text = "We get $x=2$. The answer is $\\frac{1}{2}$.\n\\boxed{3}"
    assert extract_answer(text) == "3"
    assert extract_answer(text, ("answer_is",)) == r"\frac{1}{2}"
    assert extract_answer("The final answer is: 12.", ("boxed", "answer_is")) == "12"
    assert extract_answer("The answer is 12.") is None  # only boxed answers by default


def test_extract_answer_reads_the_gsm8k_final_line():
    solution = "He pays 2 * 800 = <<2*800=1600>>1600 dollars.\n#### 1,600"
    assert extract_answer(solution, ("gsm8k",)) == "1600"
    assert extract_answer("#### $5.50", ("gsm8k",)) == "5.50"


def test_extract_answer_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown answer modes"):
        extract_answer("x", ("last_number",))
