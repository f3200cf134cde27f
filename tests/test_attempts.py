"""The self-rewarding format (mathagent/attempts.py): attempts and verdicts read from hand-written model
outputs, and the loop's decisions."""

import pytest

from mathagent.attempts import DEFAULT_MARKERS, END, REVISE, VERIFY, Attempt, Markers, next_move, parse_attempts

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
])
def test_the_loop_verifies_an_answer_revises_a_wrong_one_while_rounds_last_and_stops_at_correct(
        messages, max_revisions, move):
    assert next_move(messages, max_revisions) == move
