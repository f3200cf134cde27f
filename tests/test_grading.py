"""Tests of answer extraction, equivalence and rewards (mathagent/grading.py).

The data-set checks read ../shared/data (MATH-500 and GSM8K test); the regression corpus is
data/grading_cases.jsonl.
"""

from __future__ import annotations

import json
import random
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from mathagent import grading
from mathagent.grading import (
    Grader,
    extract_answer,
    extract_boxed,
    normalize_answer,
    parse_collection,
    parse_exact_number,
)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
CORPUS = [json.loads(line) for line in (ROOT / "data" / "grading_cases.jsonl").open()]


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


def read_jsonl(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data lives beside the checkout)")
    return [json.loads(line) for line in path.open()]


# ---- extraction ----------------------------------------------------------------------------------------


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


# ---- normalization and structure -----------------------------------------------------------------------


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


def test_parse_collection_tells_tuples_intervals_sets_and_matrices_apart():
    assert parse_collection("(1,2]").brackets == "(]"
    assert parse_collection(r"\{1,2\}").kind == "set"
    assert parse_collection("1,2").kind == "list"
    assert parse_collection(r"(-\infty,0)\cup(1,\infty)").kind == "union"
    matrix = parse_collection(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}")
    assert (matrix.kind, matrix.shape, matrix.items) == ("matrix", (2, 2), ("1", "2", "3", "4"))
    assert parse_collection("(1)+(2)") is None
    assert parse_collection(r"1\pm\sqrt{2}").items == (r"1+\sqrt{2}", r"1-\sqrt{2}")


# ---- equivalence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=[f"{c['category']}-{i}" for i, c in enumerate(CORPUS)])
def test_regression_corpus(grader, case):
    assert grader.is_equivalent(case["pred"], case["gold"]) is case["equal"], case.get("note")


def test_corpus_covers_every_category():
    categories = {c["category"] for c in CORPUS}
    assert len(CORPUS) >= 150
    assert categories >= {
        "integer", "fraction_decimal", "fraction_forms", "radical", "pi", "degrees", "percent", "units",
        "thousands", "interval", "set", "tuple", "matrix", "equation", "choice", "text", "false_positive",
    }


def test_every_math500_solution_grades_equal_to_its_answer(grader):
    rows = read_jsonl("math500.jsonl")
    wrong = [r["unique_id"] for r in rows if not grader.is_equivalent(extract_answer(r["solution"]), r["answer"])]
    assert wrong == []


def test_every_gsm8k_test_solution_grades_equal_to_its_final_line(grader):
    rows = read_jsonl("gsm8k_test.jsonl")
    wrong = []
    for i, row in enumerate(rows):
        gold = row["answer"].rsplit("####", 1)[1].strip()  # as written, thousands commas included
        if not grader.is_equivalent(extract_answer(row["answer"], ("gsm8k",)), gold):
            wrong.append(i)
    assert wrong == []


# The 2,000-pair false-positive screen: answers of two different MATH-500 problems. Every pair graded equal
# is listed here (file-order indices), and each is truly equal: the two problems have the same answer.
SCREEN_EQUAL_PAIRS = [
    (280, 468), (150, 367), (316, 236), (269, 455), (250, 130), (180, 311), (18, 254), (79, 487), (9, 374),
    (122, 415), (22, 211), (117, 335), (289, 258), (243, 72), (479, 45), (124, 388), (116, 463), (81, 311),
]


def test_false_positive_screen_on_pairs_of_different_math500_problems(grader):
    rows = read_jsonl("math500.jsonl")
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 2000:
        i, j = rng.randrange(len(rows)), rng.randrange(len(rows))
        if i != j:
            pairs.append((i, j))
    graded_equal = [(i, j) for i, j in pairs if grader.is_equivalent(rows[j]["answer"], rows[i]["answer"])]
    assert graded_equal == SCREEN_EQUAL_PAIRS
    for i, j in graded_equal:
        assert rows[i]["answer"] == rows[j]["answer"]


def test_percent_scaling_is_off_unless_asked(grader):
    assert not grader.is_equivalent("0.5", "50")
    with Grader(percent_scaling=True) as lenient:
        assert lenient.is_equivalent("0.5", "50")
        assert lenient.is_equivalent("5000", "50")
        assert not lenient.is_equivalent("0.6", "50")


def test_tolerance_is_absolute_plus_relative_for_decimals_against_irrationals():
    with Grader(rel_tol=1e-3, abs_tol=0.0) as loose:
        assert loose.is_equivalent("3.1416", r"\pi")
        assert not loose.is_equivalent("3.2", r"\pi")
        assert not loose.is_equivalent("1000001", "1000000")  # exact numbers never use a tolerance


def test_comparisons_never_raise_and_failures_are_counted():
    with Grader() as g:
        assert not g.is_equivalent(r"\frac{", "1")
        assert not g.is_equivalent("1", r"\sqrt{")
        assert not g.is_equivalent(None, "1")
        assert g.is_equivalent(18, "18")  # a number from a JSON field is an answer too
        assert not g.is_equivalent("9" * 5000, "1")
        assert g.stats.oversize == 1
        assert not g.is_equivalent("2^{2^{2^{100}}}", "2")  # a tower of powers: refused, not evaluated
        stats = g.stats.as_dict()
        assert stats["oversize"] == 2
        assert stats["failures"] == stats["timeouts"] + stats["errors"] + stats["oversize"]


def test_timeout_works_outside_the_main_thread_and_the_worker_is_replaced():
    results = {}
    with Grader(timeout=0.5) as g:

        def compare():
            # A million-term exact product: seconds of sympy, stopped at the deadline by killing the worker.
            results["slow"] = g.is_equivalent(r"\prod_{k=1}^{1000000} k", "1")
            results["next"] = g.is_equivalent(r"(y+2)^2", "y^2+4y+4", timeout=60.0)

        thread = threading.Thread(target=compare)
        start = time.monotonic()
        thread.start()
        thread.join(120)
        assert results == {"slow": False, "next": True}
        assert g.stats.timeouts == 1
        assert time.monotonic() - start < 30


def test_grading_from_many_threads_gives_the_serial_results(grader):
    cases = CORPUS[::3]
    serial = [grader.is_equivalent(c["pred"], c["gold"]) for c in cases]
    with Grader(workers=2) as fresh:
        results: list[list[bool]] = [[] for _ in range(6)]

        def run(k: int) -> None:
            results[k] = [fresh.is_equivalent(c["pred"], c["gold"]) for c in cases]

        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(r == serial for r in results)
        assert fresh.stats.timeouts == 0 and fresh.stats.errors == 0


# ---- rewards -------------------------------------------------------------------------------------------


def test_r1_reward_of_a_correct_a_wrong_and_a_missing_answer(grader):
    assert grader.reward("0.5", r"\frac12") == 1.0
    assert grader.reward("0.6", r"\frac12") == -0.5
    assert grader.reward(None, r"\frac12") == -1.0


def test_binary_reward(grader):
    assert grader.reward("0.5", r"\frac12", "binary") == 1.0
    assert grader.reward("0.6", r"\frac12", "binary") == 0.0
    assert grader.reward(None, r"\frac12", "binary") == 0.0
    with pytest.raises(ValueError, match="unknown reward kind"):
        grader.reward("1", "1", "dense")


def test_an_unboxed_matching_number_is_no_answer_under_r1(grader):
    pred = extract_answer("So the result is 12. The answer is 12.")
    assert pred is None
    assert grader.reward(pred, "12") == -1.0


def test_each_grader_counts_its_own_comparisons_and_there_is_no_grader_at_module_level():
    with Grader() as g:
        assert g.is_equivalent(r"\dfrac{3}{4}", "0.75")
        assert g.reward("7", "7") == 1.0
        assert g.stats.as_dict()["comparisons"] == 2
    assert not any(isinstance(value, Grader) for value in vars(grading).values())


def test_r1_gives_minus_one_to_an_unboxed_answer_even_when_another_answer_mode_reads_it(grader):
    trajectory = {"id": "t", "answer": "12", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "So the answer is 12."}]}
    graded = grading.grade_trajectory(trajectory, grader, answer_modes=("boxed", "answer_is"))
    assert (graded["pred"], graded["correct"], graded["reward"]) == ("12", True, -1.0)
    boxed = {**trajectory, "messages": [trajectory["messages"][0], {"role": "assistant", "content": "\\boxed{12}"}]}
    assert grading.grade_trajectory(boxed, grader, answer_modes=("boxed", "answer_is"))["reward"] == 1.0
    wrong = {**trajectory, "answer": "13"}
    assert grading.grade_trajectory(wrong, grader, answer_modes=("boxed", "answer_is"))["reward"] == -1.0
    assert grading.grade_trajectory(wrong, grader, answer_modes=("answer_is",), reward_kind="binary")["reward"] == 0.0
