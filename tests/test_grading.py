"""Tests of answer equivalence (mathagent/grading.py).

The data-set checks read ../shared/data (MATH-500 and GSM8K test); the regression corpus is
data/grading_cases.jsonl.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from mathagent import grading
from mathagent.answers import extract_answer
from mathagent.grading import Grader
from mathagent.rewards import answer_reward

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


def test_each_grader_counts_its_own_comparisons_and_there_is_no_grader_at_module_level():
    with Grader() as g:
        assert g.is_equivalent(r"\dfrac{3}{4}", "0.75")
        assert answer_reward(g, "7", "7") == 1.0
        assert g.stats.as_dict()["comparisons"] == 2
    assert not any(isinstance(value, Grader) for value in vars(grading).values())
