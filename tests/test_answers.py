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


def test_a_last_box_that_never_closes_is_no_answer_not_the_box_before_it():
    assert extract_boxed(r"\boxed{5} then \boxed{6") is None
    assert extract_boxed(r"\boxed{5} then \fbox{6") is None
    assert extract_boxed(r"\fbox{5} then \boxed{6") is None
    assert extract_boxed(r"\boxed{3} ... finally \boxed{\frac{1}{") is None  # \\frac's braces close, the box does not
    assert extract_boxed(r"\boxed{\frac{1}{2}} or \boxed{\frac{3}{4}") is None
    assert extract_boxed(r"\boxed{5} then \boxed{\{1, 2\}") is None  # an escaped brace closes nothing
    assert extract_boxed(r"\boxed{\frac{1}{") is None


def test_a_bare_box_command_at_the_end_is_a_cut_off_answer():
    assert extract_boxed(r"\boxed{5} so the answer is \boxed") is None
    assert extract_boxed("\\boxed{5} so the answer is \\boxed \t") is None


def test_an_unclosed_box_before_the_last_one_does_not_matter():
    assert extract_boxed(r"\boxed{5 then \boxed{6}") == "6"
    assert extract_boxed(r"\fbox{5 then \boxed{\sqrt{\frac{1}{2}}}.") == r"\sqrt{\frac{1}{2}}"


def test_a_box_inside_a_code_block_is_read_like_any_other():
    # The extractor knows no code: a box in a block counts, so an unclosed one last in the text is no answer.
    printed = "```python\nprint('\\\\boxed{' + str(6) + '}')\n```\n```output\n\\boxed{6}\n```\nSo \\boxed{6}."
    assert extract_boxed(printed) == "6"
    assert extract_boxed("\\boxed{5}\n```python\ns = '\\\\boxed{'\n```") is None


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


def test_a_text_cut_off_in_its_last_box_has_no_answer_in_any_later_mode():
    cut = "The answer is 5.\nChecking: \\boxed{6"
    assert extract_answer(cut) is None
    assert extract_answer(cut, ("boxed", "answer_is")) is None
    assert extract_answer("The answer is \\boxed{6", ("answer_is",)) is None
    assert extract_answer("The answer is \\boxed{6}.", ("answer_is",)) == "6"
    # An empty box is no answer either, but not a cut-off one: the later modes are still tried.
    assert extract_answer("Put it in \\boxed{}.\nThe answer is 12.", ("boxed", "answer_is")) == "12"


def test_extract_answer_reads_the_gsm8k_final_line():
    solution = "He pays 2 * 800 = <<2*800=1600>>1600 dollars.\n#### 1,600"
    assert extract_answer(solution, ("gsm8k",)) == "1600"
    assert extract_answer("#### $5.50", ("gsm8k",)) == "5.50"


def test_extract_answer_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown answer modes"):
        extract_answer("x", ("last_number",))
