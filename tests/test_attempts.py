"""The self-rewarding format (mathagent/attempts.py): attempts and verdicts read from hand-written model
outputs, and the loop's decisions."""

import pytest

from mathagent.attempts import (
    DEFAULT_MARKERS,
    END,
    REVISE,
    VERIFY,
    Attempt,
    Markers,
    first_boxed,
    next_move,
    parse_attempts,
)

Q = {"role": "user", "content": "What is 6 * 7?"}
VERIFY_TURN = {"role": "user", "content": DEFAULT_MARKERS.verify_prompt}
REVISE_TURN = {"role": "user", "content": DEFAULT_MARKERS.revise_prompt}


def said(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_attempts_are_read_across_turns_as_a_prompted_model_writes_them():
    messages = [Q, said("6 * 7 = 48, so \\boxed{48}."), VERIFY_TURN, said("7 * 6 is 42, not 48. [VERIFY] wrong."),
                REVISE_TURN, said("Let's correct it step by step. 6 * 7 = 42. \\boxed{42}"), VERIFY_TURN,
                said("[VERIFY] correct.")]
    assert parse_attempts(messages) == [Attempt(0, "48", "wrong", 3), Attempt(1, "42", "correct", 7)]


def test_attempts_are_read_out_of_one_long_message_as_a_trained_model_writes_them():
    text = ("6 * 7 = 48. The answer is \\boxed{48}. [VERIFY] wrong. Let's correct it step by step. "
            "6 * 7 = 42, so \\boxed{42}.\n[VERIFY]   correct.")
    assert parse_attempts([Q, said(text)]) == [Attempt(0, "48", "wrong", 1), Attempt(1, "42", "correct", 1)]
    # With the tool: the revision's code and its output sit between the verdict and the new answer.
    messages = [Q, said("\\boxed{48} [VERIFY] wrong. Let's correct it step by step.\n```python\nprint(6*7)\n```"),
                {"role": "user", "content": "```output\n[VERIFY] correct \\boxed{1}\n```"},  # not the model's
                said("So \\boxed{42}.")]
    assert parse_attempts(messages) == [Attempt(0, "48", "wrong", 1), Attempt(1, "42", None, 3)]


# The talk's Table 1: the first answer, a self-check that recomputes and boxes another number, its verdict, then
# the revision. The verdict judges the first answer, not the self-check's.
TABLE1_ANSWER = "The total cost is 3.79 * 2 = 7.58 dollars, so the answer is \\boxed{7.58}."
TABLE1_CHECK = ("Let me check: the question asks for the price of 5 items, 3.79 * 5 + 1.44 = 20.39. "
                "So the final answer is: \\boxed{20.39}. The solution above computed something else. [VERIFY] wrong.")
TABLE1_REVISION = "The price of 5 items plus the fee is 3.79 * 5 + 1.44 = 20.39, so \\boxed{20.39}."


def test_an_inline_attempts_answer_is_its_first_box_not_the_one_its_self_check_writes():
    text = f"{TABLE1_ANSWER}\n\n{TABLE1_CHECK} Let's correct it step by step.\n{TABLE1_REVISION}\n\n[VERIFY] correct."
    assert parse_attempts([Q, said(text)]) == [Attempt(0, "7.58", "wrong", 1), Attempt(1, "20.39", "correct", 1)]
    # Not yet judged, the revision is an attempt of its own, its answer its first box.
    unjudged = f"{TABLE1_ANSWER}\n\n{TABLE1_CHECK} Let's correct it step by step.\n{TABLE1_REVISION} Or \\boxed{{9}}"
    assert parse_attempts([Q, said(unjudged)]) == [Attempt(0, "7.58", "wrong", 1), Attempt(1, "20.39", None, 1)]


def test_a_prompted_attempts_answer_is_its_answer_turns_not_the_verify_turns():
    messages = [Q, said(TABLE1_ANSWER), VERIFY_TURN, said(TABLE1_CHECK), REVISE_TURN,
                said("Let's correct it step by step. " + TABLE1_REVISION), VERIFY_TURN, said("[VERIFY] correct.")]
    assert parse_attempts(messages) == [Attempt(0, "7.58", "wrong", 3), Attempt(1, "20.39", "correct", 7)]
    # The verify turn may call the tool before its verdict: still the self-evaluation's.
    with_tool = [Q, said(TABLE1_ANSWER), VERIFY_TURN, said("```python\nprint(3.79 * 5 + 1.44)\n```"),
                 {"role": "user", "content": "```output\n20.39\n```"}, said(TABLE1_CHECK)]
    assert parse_attempts(with_tool) == [Attempt(0, "7.58", "wrong", 5)]
    # A verify turn that answers instead of judging leaves the answer it was asked about unjudged.
    assert parse_attempts([Q, said(TABLE1_ANSWER), VERIFY_TURN, said("So \\boxed{20.39}.")]) == [
        Attempt(0, "7.58", None, 3)]


def test_a_prompted_answer_turn_with_two_boxes_is_judged_on_its_last_the_most_recent_answer():
    messages = [Q, said("6 * 7 = \\boxed{48}? No: 6 * 7 = \\boxed{42}."), VERIFY_TURN, said("[VERIFY] correct.")]
    assert parse_attempts(messages) == [Attempt(0, "42", "correct", 3)]
    # Inline, the self-evaluation follows the first box.
    inline = said("\\boxed{48}. Check: \\boxed{42}. [VERIFY] wrong.")
    assert parse_attempts([Q, inline]) == [Attempt(0, "48", "wrong", 1)]


def test_a_revision_starts_at_the_cue_and_a_box_between_the_verdict_and_the_cue_is_no_attempts():
    text = ("\\boxed{48} [VERIFY] wrong, it is \\boxed{41}. Let's correct   it step by step. "
            "\\boxed{42} [VERIFY] correct.")
    assert parse_attempts([Q, said(text)]) == [Attempt(0, "48", "wrong", 1), Attempt(1, "42", "correct", 1)]
    # Without a cue, the revision starts right after the verdict.
    assert parse_attempts([Q, said("\\boxed{48} [VERIFY] wrong. \\boxed{41} [VERIFY] wrong.")]) == [
        Attempt(0, "48", "wrong", 1), Attempt(1, "41", "wrong", 1)]
    # The cue is the markers': another one is not read as a cue.
    markers = Markers(cue="Again:")
    assert parse_attempts([Q, said(text)], markers) == [Attempt(0, "48", "wrong", 1), Attempt(1, "41", "correct", 1)]
    assert parse_attempts([Q, said("\\boxed{48} [VERIFY] wrong, \\boxed{41}. Again: \\boxed{42}")], markers) == [
        Attempt(0, "48", "wrong", 1), Attempt(1, "42", None, 1)]
    # Prompted, a cue in the verify turn is the self-evaluation's: the revision had started at the revise turn.
    messages = [Q, said("\\boxed{48} [VERIFY] wrong."), REVISE_TURN, said("\\boxed{41}"), VERIFY_TURN,
                said("Let's correct it step by step: \\boxed{42}. [VERIFY] wrong.")]
    assert parse_attempts(messages) == [Attempt(0, "48", "wrong", 1), Attempt(1, "41", "wrong", 5)]
    # A first attempt has no cue to start at: one written in it is part of it.
    first = said("Let's correct it step by step. \\boxed{7} \\boxed{8}")
    assert parse_attempts([Q, first]) == [Attempt(0, "7", None, 1)]


def test_the_first_box_is_read_as_extract_boxed_reads_the_last():
    assert first_boxed("\\boxed{\\frac{1}{2}} then \\boxed{3}") == "\\frac{1}{2}"
    assert first_boxed("\\boxed{} then \\boxed{3} \\boxed{4}") == "3"  # an empty box is no answer
    assert first_boxed("\\boxed{5 cut off, then \\boxed{6} \\boxed{7}") == "6"  # nor one that never closes
    assert first_boxed("so \\boxed 5. and \\boxed{6}") == "5"
    assert first_boxed("\\boxedfoo{1} \\fbox{2}") == "2"
    assert first_boxed("no answer") is None


def test_a_verdict_without_an_answer_is_an_attempt_without_one_and_custom_markers_are_read():
    assert parse_attempts([Q, said("I am not sure. [VERIFY] wrong.")]) == [Attempt(0, None, "wrong", 1)]
    markers = Markers(correct="VERDICT: yes", wrong="VERDICT: no")
    messages = [Q, said("\\boxed{42} VERDICT: yes")]
    assert parse_attempts(messages, markers) == [Attempt(0, "42", "correct", 1)]
    assert parse_attempts(messages) == [Attempt(0, "42", None, 1)]


@pytest.mark.parametrize("messages, max_revisions, move", [
    ([Q, said("```python\nprint(6*7)\n```")], 2, None),  # code to run: the agent's rules
    ([Q, said("Hmm.")], 2, None),  # neither an answer nor a verdict
    ([Q, said("\\boxed{48}")], 2, VERIFY),
    ([Q, said("\\boxed{48}"), VERIFY_TURN, said("[VERIFY] wrong.")], 2, REVISE),
    ([Q, said("\\boxed{48}"), VERIFY_TURN, said("[VERIFY] wrong.")], 0, END),  # no revision allowed
    ([Q, said("\\boxed{48} [VERIFY] wrong. \\boxed{41} [VERIFY] wrong. \\boxed{40} [VERIFY] wrong.")], 2, END),
    ([Q, said("\\boxed{48} [VERIFY] wrong. \\boxed{41} [VERIFY] wrong.")], 2, REVISE),
    ([Q, said("\\boxed{42} [VERIFY] correct.")], 2, END),
    ([Q, said("\\boxed{48} [VERIFY] wrong. Let's correct it step by step.\n```python\nprint(6*7)\n```")], 2, None),
    ([Q, said("\\boxed{48} [VERIFY] wrong."), REVISE_TURN, said("```python\nprint(6*7)\n```")], 2, None),
    ([Q, said("\\boxed{48} [VERIFY] wrong."), REVISE_TURN, said("\\boxed{42}")], 2, VERIFY),
    ([Q, said("\\boxed{48} [VERIFY] wrong. Let's correct it step by step.\n\\boxed{42}")], 2, VERIFY),
    ([Q, said("\\boxed{48}"), VERIFY_TURN, said("So \\boxed{20}.")], 2, VERIFY),  # the agent asks only once
    ([Q, said("\\boxed{48}"), VERIFY_TURN, said("```python\nprint(6*8)\n```")], 2, None),  # checking with the tool
])
def test_the_loop_verifies_an_answer_revises_a_wrong_one_while_rounds_last_and_stops_at_correct(
        messages, max_revisions, move):
    assert next_move(messages, max_revisions) == move
