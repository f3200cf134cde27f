"""Tests of the outcome reward of a trajectory (mathagent/rewards.py): r1, binary, and the verdict reward of a
self-rewarding trajectory."""

from __future__ import annotations

import pytest

from mathagent.answers import extract_answer
from mathagent.grading import Grader
from mathagent.rewards import answer_reward, grade_trajectory

Q = {"role": "user", "content": "What is 6 * 7?"}


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


def said(text: str) -> dict:
    return {"role": "assistant", "content": text}


def trajectory(pid, subject, text, answer="42"):
    return {"id": pid, "problem_id": pid, "subject": subject, "answer": answer, "messages": [Q, said(text)]}


def test_r1_reward_of_a_correct_a_wrong_and_a_missing_answer(grader):
    assert answer_reward(grader, "0.5", r"\frac12") == 1.0
    assert answer_reward(grader, "0.6", r"\frac12") == -0.5
    assert answer_reward(grader, None, r"\frac12") == -1.0


def test_binary_reward(grader):
    assert answer_reward(grader, "0.5", r"\frac12", "binary") == 1.0
    assert answer_reward(grader, "0.6", r"\frac12", "binary") == 0.0
    assert answer_reward(grader, None, r"\frac12", "binary") == 0.0
    with pytest.raises(ValueError, match="unknown reward kind"):
        answer_reward(grader, "1", "1", "dense")


def test_an_unboxed_matching_number_is_no_answer_under_r1(grader):
    pred = extract_answer("So the result is 12. The answer is 12.")
    assert pred is None
    assert answer_reward(grader, pred, "12") == -1.0


def test_a_cut_off_last_box_is_no_answer_under_r1_not_the_box_before_it(grader):
    for gold in ("5", "6"):
        graded = grade_trajectory(trajectory("p", "s", "\\boxed{5} then \\boxed{6", answer=gold), grader)
        assert (graded["pred"], graded["correct"], graded["reward"]) == (None, False, -1.0)
    graded = grade_trajectory(trajectory("p", "s", "\\boxed{5} then \\boxed{6", answer="5"), grader,
                              reward_kind="binary")
    assert (graded["pred"], graded["reward"]) == (None, 0.0)
    graded = grade_trajectory(trajectory("p", "s", "\\boxed{5 then \\boxed{6}", answer="6"), grader)
    assert (graded["pred"], graded["correct"], graded["reward"]) == ("6", True, 1.0)


def test_r1_gives_minus_one_to_an_unboxed_answer_even_when_another_answer_mode_reads_it(grader):
    trajectory = {"id": "t", "answer": "12", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "So the answer is 12."}]}
    graded = grade_trajectory(trajectory, grader, answer_modes=("boxed", "answer_is"))
    assert (graded["pred"], graded["correct"], graded["reward"]) == ("12", True, -1.0)
    boxed = {**trajectory, "messages": [trajectory["messages"][0], {"role": "assistant", "content": "\\boxed{12}"}]}
    assert grade_trajectory(boxed, grader, answer_modes=("boxed", "answer_is"))["reward"] == 1.0
    wrong = {**trajectory, "answer": "13"}
    assert grade_trajectory(wrong, grader, answer_modes=("boxed", "answer_is"))["reward"] == -1.0
    assert grade_trajectory(wrong, grader, answer_modes=("answer_is",), reward_kind="binary")["reward"] == 0.0


def test_grading_takes_the_final_attempts_answer_and_keeps_every_attempt_as_data():
    with Grader() as grader:
        t = grade_trajectory(trajectory("a", "x", "\\boxed{48} [VERIFY] wrong. \\boxed{42} [VERIFY] correct."), grader)
        plain = grade_trajectory(trajectory("b", "x", "\\boxed{42}"), grader)
    assert (t["pred"], t["correct"], t["reward"]) == ("42", True, 1.0)
    assert t["attempts"] == [{"index": 0, "answer": "48", "verdict": "wrong", "correct": False},
                             {"index": 1, "answer": "42", "verdict": "correct", "correct": True}]
    assert "attempts" not in plain and plain["pred"] == "42"



def test_the_verdict_reward_adds_the_mean_faithfulness_of_the_verdicts_to_the_final_answers_reward():
    cases = [("\\boxed{48} [VERIFY] correct.", -0.5, -1.0),  # wrong answer called correct
             ("\\boxed{48} [VERIFY] wrong. \\boxed{42} [VERIFY] correct.", 1.0, 1.0),  # both faithful
             ("\\boxed{42} [VERIFY] wrong. \\boxed{41} [VERIFY] wrong.", -0.5, 0.0),  # one false, one faithful
             ("\\boxed{42}", 1.0, None)]  # no verdict: not of this mode, no term
    with Grader() as grader:
        for text, r1, term in cases:
            plain = grade_trajectory(trajectory("p", "x", text), grader)
            weighted = grade_trajectory(trajectory("p", "x", text), grader, verdict_reward=0.5)
            assert plain["reward"] == r1
            assert weighted["reward"] == pytest.approx(r1 + 0.5 * (term or 0.0))
