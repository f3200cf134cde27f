"""Tests of the data sets as problem records (mathagent/tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathagent.errors import UserError
from mathagent.prompts import PROMPTS
from mathagent.tasks import arith, gsm8k, load_problems
from mathagent.tasks import math as math_task

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def shared(name: str) -> str:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return str(path)


def test_gsm8k_row_becomes_a_problem_with_the_final_number_as_answer():
    row = {"question": "How many?", "answer": "2 * 800 = <<2*800=1600>>1600\n#### 1,600"}
    problem = gsm8k.to_problem(row, 7, "train")
    assert problem == {"id": "gsm8k/train/7", "question": "How many?", "answer": "1600", "solution": row["answer"]}


def test_gsm8k_row_without_a_final_line_is_a_user_error():
    with pytest.raises(UserError, match="gsm8k/test/3"):
        gsm8k.to_problem({"question": "q", "answer": "no final line"}, 3)


def test_math500_row_keeps_subject_level_and_solution():
    row = {"problem": "p", "solution": r"so \boxed{5}", "answer": "5", "subject": "Algebra", "level": 2,
           "unique_id": "test/algebra/1.json"}
    assert math_task.to_problem(row, 0) == {"id": "test/algebra/1.json", "question": "p", "answer": "5",
                                            "solution": r"so \boxed{5}", "subject": "Algebra", "level": 2}


def test_original_math_row_takes_its_answer_from_the_last_box():
    row = {"problem": "p", "solution": r"\boxed{1} no, \boxed{\frac{1}{2}}", "type": "Prealgebra", "level": "Level 5"}
    problem = math_task.to_problem(row, 4, "train")
    assert problem["id"] == "math/train/4"
    assert problem["answer"] == r"\frac{1}{2}"
    assert (problem["subject"], problem["level"]) == ("Prealgebra", 5)


def test_load_local_math500_and_gsm8k():
    math500 = load_problems("math", shared("math500.jsonl"))
    assert len(math500) == 500
    assert math500[0]["id"] == "test/precalculus/807.json"
    assert math500[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert {"question", "answer", "solution", "subject", "level"} <= set(math500[0])
    test = load_problems("gsm8k", shared("gsm8k_test.jsonl"))
    assert len(test) == 1319
    assert (test[0]["id"], test[0]["answer"]) == ("gsm8k/test/0", "18")
    train = load_problems("gsm8k", shared("gsm8k_train.jsonl"), split="train", limit=5)
    assert [p["id"] for p in train] == [f"gsm8k/train/{i}" for i in range(5)]


def test_every_gsm8k_answer_is_a_plain_number():
    for split in ("test", "train"):
        for p in load_problems("gsm8k", shared(f"gsm8k_{split}.jsonl"), split=split):
            float(p["answer"])


def test_local_file_with_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:2"):
        load_problems("gsm8k", str(path))


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="unknown task"):
        load_problems("aime", "x.jsonl")


def test_arith_splits_are_disjoint_and_gold_solutions_carry_state_across_cells():
    train = arith.make_problems(300, seed=1, split="train")
    heldout = arith.make_problems(300, seed=1, split="heldout") + arith.make_problems(300, seed=2, split="heldout")
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}
    assert arith.make_problems(5, seed=1, split="train") == train[:5]  # a pure function of (n, seed, split)
    club = next(p for p in train if p["kind"] == "club")
    actions = [m["content"] for m in arith.gold_messages(club, PROMPTS["bare"]) if m["role"] == "assistant"]
    assert "left = income - cost" in actions[2]  # the third cell reads the first two cells' variables
    assert actions[-1] == f"The answer is \\boxed{{{club['answer']}}}."


def test_demonstrations_answer_small_looking_problems_in_the_head_and_the_rest_with_the_tool():
    demos = arith.demonstrations(600, seed=3, prompt=PROMPTS["bare"])
    assert [d["id"] for d in demos] == [p["id"] for p in arith.make_problems(600, seed=3, split="train")]
    in_head = [d for d in demos if d.get("in_head")]
    for d in in_head:  # right answers, no tool: the habit the policy copies without the skill
        assert d["messages"][1:] == [{"role": "assistant", "content": f"In my head: \\boxed{{{d['answer']}}}."}]
    small = [d for d in demos if arith.in_head_share(d) == 1.0]
    large = [d for d in demos if arith.in_head_share(d) == 0.1]
    assert small and all(d.get("in_head") for d in small)
    assert large and sum(bool(d.get("in_head")) for d in large) < len(large) / 3
    assert 0.3 < len(in_head) / len(demos) < 0.7
