"""Tests of pass@k, maj@k, best-of-n, turn statistics and the evaluate report (mathagent/metrics.py),
against hand-computed numbers."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from mathagent.errors import UserError
from mathagent.grading import Grader
from mathagent.metrics import (
    best_of_n,
    evaluate,
    maj_at_k,
    majority_answer,
    parse_pass_at,
    pass_at_k,
    turn_statistics,
)
from mathagent.rewards import grade_trajectories


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


# ---- pass@k --------------------------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    # k=1 is the fraction correct
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-15)
    # n - c < k: some correct sample is always among the k
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(3, 0, 3) == 0.0


def test_pass_at_k_matches_the_binomial_formula_exactly_enough():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(999, 500) / C(1000, 500) = 500/1000 although both binomials overflow a float.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert 0.0 <= pass_at_k(10_000, 3, 64) <= 1.0


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


# ---- maj@k ---------------------------------------------------------------------------------------------


def test_majority_groups_equivalent_answers_written_differently(grader):
    preds = [r"\frac12", "0.5", "1/3", r"\frac{1}{3}", "2/4"]
    answer, votes = majority_answer(preds, grader.is_equivalent)
    assert (answer, votes) == (r"\frac12", 3)
    assert maj_at_k(preds, "0.5", 5, grader.is_equivalent)


def test_majority_tie_goes_to_the_answer_seen_first(grader):
    preds = ["1", "2", "2.0", "1.00"]
    assert majority_answer(preds, grader.is_equivalent) == ("1", 2)
    assert maj_at_k(preds, "1", 4, grader.is_equivalent)
    assert not maj_at_k(preds, "2", 4, grader.is_equivalent)
    # the first three: "2" has two votes
    assert maj_at_k(preds, "2", 3, grader.is_equivalent)


def test_missing_answers_cast_no_vote(grader):
    assert majority_answer([None, None, "3"], grader.is_equivalent) == ("3", 1)
    assert majority_answer([None, None], grader.is_equivalent) == (None, 0)
    assert not maj_at_k([None, None], "3", 2, grader.is_equivalent)


def test_best_of_n_picks_the_highest_score_first_on_ties():
    samples = [{"score": 0.3, "correct": True}, {"score": 0.9, "correct": False}, {"score": 0.9, "correct": True}]
    assert best_of_n(samples, "score") is False
    assert best_of_n([{"correct": True}], "score") is None


# ---- turns ---------------------------------------------------------------------------------------------


def test_turn_statistics_count_tool_calls_and_error_observations():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "```python\n1/0\n```"},
        {"role": "user", "content": "```output\nZeroDivisionError: division by zero\n```"},
        {"role": "assistant", "content": "```python\nprint(2)\n```"},
        {"role": "user", "content": "```output\n2\n```"},
        {"role": "assistant", "content": r"\boxed{2}"},
    ]
    assert turn_statistics(messages) == {"actions": 3, "tool_calls": 2, "observations": 2, "error_observations": 1,
                                         "cut_observations": 0}


def test_the_recorded_cell_outcome_decides_an_error_not_the_printed_text():
    def observed(output, status=None, cut=False):
        message = {"role": "user", "content": f"```output\n{output}\n```"}
        if status is not None:
            message["outcome"] = {"status": status, "cut": cut}
        return [{"role": "user", "content": "q"}, {"role": "assistant", "content": "```python\n...\n```"}, message,
                {"role": "assistant", "content": "\\boxed{1}"}]

    # Ordinary printed results that a regex on "error" used to flag.
    for printed in ("error: 0.001", "abs_error = 0.1", "Error: 3", "the error is small: 0.01"):
        assert turn_statistics(observed(printed, "ok"))["error_observations"] == 0
        assert turn_statistics(observed(printed))["error_observations"] == 0  # no outcome: the heuristic
    assert turn_statistics(observed("42", "timeout"))["error_observations"] == 1
    assert turn_statistics(observed("42", "memory", cut=True))["cut_observations"] == 1
    assert turn_statistics(observed("ValueError: printed on purpose", "ok"))["error_observations"] == 0


@pytest.mark.parametrize("output, error", [
    ("Traceback (most recent call last):\n  File \"<cell 1>\", line 1\nNameError: name 'x' is not defined", True),
    ("sympy.polys.polyerrors.PolynomialError: bad", True),
    ("ZeroDivisionError: division by zero", True),
    ("partial\nTimeoutError: the cell ran longer than 10 s", True),
    ("Timed out after 10 s", True),
    ("KeyboardInterrupt", True),
    ("42", False),
    ("error: 0.001", False),
    ("abs_error = 0.1", False),
    ("the error is small: 0.01", False),
    ("ValueError: x\nbut then it went on", False),
])
def test_without_an_outcome_the_heuristic_is_anchored_on_real_tracebacks(output, error):
    from mathagent.records import looks_like_error, observation_failed

    assert looks_like_error(f"```output\n{output}\n```") is error
    assert observation_failed({"role": "user", "content": f"```output\n{output}\n```"}) is error


def test_the_records_cell_statuses_are_the_sandboxs():
    from mathagent import records, sandbox

    assert records.CELL_STATUSES == sandbox.STATUSES


# ---- the report ----------------------------------------------------------------------------------------


def trajectory(pid, i, final, answer="12", status="answered", observations=(), **extra):
    messages = [{"role": "user", "content": "q"}]
    for o in observations:
        messages += [{"role": "assistant", "content": "```python\nx\n```"}, {"role": "user", "content": f"```output\n{o}\n```"}]
    messages.append({"role": "assistant", "content": final})
    return {"id": f"{pid}-{i}", "problem_id": pid, "question": "q", "answer": answer, "messages": messages,
            "status": status, "pred": "stale", "correct": True, **extra}


def test_evaluate_report_hand_computed(grader):
    records = [
        # p1: 3 samples, 2 correct (12 written two ways), one wrong
        trajectory("p1", 0, r"\boxed{12}", observations=["5"], subject="Algebra", level=1, score=0.1),
        trajectory("p1", 1, r"\boxed{12.0}", subject="Algebra", level=1, score=0.2),
        trajectory("p1", 2, r"\boxed{13}", observations=["ValueError: no"], subject="Algebra", level=1, score=0.9),
        # p2: 3 samples, 0 correct: two say 8, one has no answer
        trajectory("p2", 0, r"\boxed{8}", answer=r"\frac{1}{2}", subject="Geometry", level=5, score=0.5),
        trajectory("p2", 1, "I give up", answer=r"\frac{1}{2}", status="max_turns", subject="Geometry", level=5),
        trajectory("p2", 2, r"\boxed{8}", answer=r"\frac{1}{2}", subject="Geometry", level=5, score=0.4),
    ]
    graded = grade_trajectories(records, grader)
    assert [g["pred"] for g in graded] == ["12", "12.0", "13", "8", None, "8"]
    assert [g["correct"] for g in graded] == [True, True, False, False, False, False]
    assert [g["reward"] for g in graded] == [1.0, 1.0, -0.5, -0.5, -1.0, -0.5]

    report = evaluate(graded, ks=[1, 2, 3], score_field="score", equal=grader.is_equivalent)
    assert report["accuracy"] == pytest.approx(2 / 6)
    # p1: pass@1 = 2/3, pass@2 = 1 - C(1,2)/C(3,2) = 1, pass@3 = 1; p2: 0
    assert report["pass@k"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(0.5), "3": pytest.approx(0.5)}
    # maj@1: p1's first answer 12 is right; maj@2: {12, 12.0} wins; maj@3: 2 vs 1. p2 always 8: wrong.
    assert report["maj@k"] == {"1": 0.5, "2": 0.5, "3": 0.5}
    # best-of-n: p1 picks the 0.9 sample (13, wrong); p2 picks 0.5 (8, wrong)
    assert report["best_of_n"] == {"score_field": "score", "problems": 2, "accuracy": 0.0}
    assert report["by_subject"]["Algebra"]["accuracy"] == pytest.approx(2 / 3)
    assert report["by_level"]["5"]["pass@k"]["1"] == 0.0
    turns = report["turns"]
    assert turns["tool_calls_mean"] == pytest.approx(2 / 6)
    assert turns["error_observations"] == 1 and turns["observations"] == 2
    assert turns["max_turns_rate"] == pytest.approx(1 / 6)
    assert turns["no_answer_rate"] == pytest.approx(1 / 6)


def test_evaluate_leaves_problems_with_fewer_than_k_samples_out_of_that_k(grader):
    graded = grade_trajectories([trajectory("p1", 0, r"\boxed{12}"), trajectory("p2", 0, r"\boxed{1}"),
                                 trajectory("p2", 1, r"\boxed{12}")], grader)
    report = evaluate(graded, ks=[1, 2], equal=grader.is_equivalent)
    assert report["pass@k"] == {"1": pytest.approx(0.75), "2": 1.0}
    assert report["maj@k"]["2"] == 0.0  # p2's tie goes to its first answer, 1


def test_trajectories_without_a_reference_answer_count_only_in_turns(grader):
    record = trajectory("p1", 0, r"\boxed{3}")
    del record["answer"]
    graded = grade_trajectories([record], grader)
    assert graded[0]["pred"] == "3" and graded[0]["correct"] is None
    report = evaluate(graded, equal=grader.is_equivalent)
    assert report["ungraded"] == 1 and report["trajectories"] == 0 and report["accuracy"] is None
    assert report["turns"]["trajectories"] == 1


def test_evaluate_sweeps_k_up_to_the_samples_each_problem_has(grader):
    # p1: n=4, c=1, the correct answer first; p2: n=2, both correct.
    records = [trajectory("p1", i, rf"\boxed{{{x}}}") for i, x in enumerate(["12", "8", "8", "9"])]
    records += [trajectory("p2", i, r"\boxed{12}") for i in range(2)]
    graded = grade_trajectories(records, grader)
    report = evaluate(graded, ks=parse_pass_at("1,2,4,...,n", samples=4) + [8], equal=grader.is_equivalent)
    # p1 alone: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1; p2: 1 for every k it has.
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 2) == 0.5 and pass_at_k(4, 1, 4) == 1.0
    assert report["pass@k"] == {"1": pytest.approx((0.25 + 1) / 2), "2": pytest.approx((0.5 + 1) / 2), "4": 1.0,
                                "8": None}
    # maj@k votes among the first k answers: 12 | 12, 8 (tie: the first) | 12, 8, 8, 9 (8 wins).
    assert report["maj@k"] == {"1": 1.0, "2": 1.0, "4": 0.0, "8": None}
    # k > n: a problem with fewer than k samples is left out of that k, and the count says so.
    assert report["problems@k"] == {"1": 2, "2": 2, "4": 1, "8": 0}


@pytest.mark.parametrize("text, samples, ks", [
    ("1,4,8", 8, [1, 4, 8]),
    ("8, 1,4,4", 8, [1, 4, 8]),
    ("1,2,4,...,n", 8, [1, 2, 4, 8]),
    ("1,2,4,...,n", 6, [1, 2, 4, 6]),  # the last term is always in
    ("1,2,4,...,n", 1, [1]),  # a greedy file: pass@1 only
    ("1,2,4,...,64", 1, [1, 2, 4, 8, 16, 32, 64]),
    ("1,2,...,5", 1, [1, 2, 3, 4, 5]),  # two terms set a step
    ("2,4,...,8", 1, [2, 4, 6, 8]),
    ("1,3,9,...,n", 30, [1, 3, 9, 27, 30]),
    ("1,n", 16, [1, 16]),
    ("16,1,2,4,...,8", 1, [1, 2, 4, 8, 16]),  # terms listed before a progression stay
])
def test_pass_at_lists_numbers_n_and_progressions(text, samples, ks):
    assert parse_pass_at(text, samples) == ks


@pytest.mark.parametrize("text", ["", "0", "1,x", "-1", "1,...,8", "1,2,...", "4,2,...,8", "1,2,...,...,8",
                                  "1,2,...,100000"])
def test_pass_at_refuses_what_is_not_a_list_of_k(text):
    with pytest.raises(UserError, match="pass_at"):
        parse_pass_at(text, samples=4)
