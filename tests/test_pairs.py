"""Preference pairs: selection, filters and deduplication on hand-built trajectories, then the command."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from mathagent.errors import UserError
from mathagent.grading import Grader
from mathagent.pairs import (
    PairConfig,
    all_pairs,
    apply_filters,
    conversation_length,
    deduplicate,
    drop_prompt_mismatches,
    error_observation,
    make_pairs,
    max_min_pairs,
    needs_grading,
    no_action,
    no_answer,
    random_pairs,
    select_winners,
    trajectory_filters,
    unfinished,
)
from mathagent.records import problem_rng

PROMPT = "What is 2+3?\n\nSolve this step by step."


def trajectory(tid, problem_id="p1", correct=True, *, response=None, status="answered", prompt=PROMPT,
               system=None, **fields):
    """A trajectory with one tool call and a boxed answer (5 when correct, else 6); its text names its id, so
    no two are identical unless `response` says so."""
    answer = "5" if correct else "6"
    if response is None:
        response = [
            {"role": "assistant", "content": f"Attempt {tid}.\n```python\nprint(2 + {answer[0]} - 2)\n```"},
            {"role": "user", "content": f"```output\n{answer}\n```"},
            {"role": "assistant", "content": f"So $\\boxed{{{answer}}}$."},
        ]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    record = {"id": tid, "problem_id": problem_id, "question": "What is 2+3?", "answer": "5",
              "messages": messages + response, "status": status, "pred": answer, "correct": correct,
              "reward": 1.0 if correct else -0.5}
    record.update(fields)
    return record


# ---- selection ----------------------------------------------------------------------------------------


def test_all_pairs_is_every_winner_with_every_loser_winner_major():
    assert all_pairs(["w1", "w2"], ["l1", "l2", "l3"]) == [
        ("w1", "l1"), ("w1", "l2"), ("w1", "l3"), ("w2", "l1"), ("w2", "l2"), ("w2", "l3")]


def test_random_pairs_are_k_distinct_combinations_fixed_by_the_seed():
    winners, losers = ["w1", "w2", "w3"], ["l1", "l2", "l3", "l4"]
    pairs = random_pairs(winners, losers, 5, random.Random("0:p1"))
    assert len(pairs) == len(set(pairs)) == 5
    assert set(pairs) <= set(all_pairs(winners, losers))
    assert pairs == sorted(pairs, key=all_pairs(winners, losers).index)  # listed in the order of `all`
    assert pairs == random_pairs(winners, losers, 5, random.Random("0:p1"))
    # the draw is exactly rng.sample over the 12 combinations, indexed winner-major
    drawn = sorted(random.Random("0:p1").sample(range(12), 5))
    assert pairs == [(winners[i // 4], losers[i % 4]) for i in drawn]


def test_random_pairs_with_k_above_the_combinations_are_all_of_them():
    assert random_pairs(["w1", "w2"], ["l1"], 8, random.Random(1)) == [("w1", "l1"), ("w2", "l1")]


def test_max_min_pairs_the_best_winner_with_the_worst_loser_then_the_next():
    score = {"w1": 0.7, "w2": 0.9, "w3": 0.8, "l1": 0.4, "l2": 0.1, "l3": 0.3}.__getitem__
    winners, losers = ["w1", "w2", "w3"], ["l1", "l2", "l3"]
    rng = random.Random(0)
    assert max_min_pairs(winners, losers, 1, score, rng) == [("w2", "l2")]
    assert max_min_pairs(winners, losers, 2, score, rng) == [("w2", "l2"), ("w3", "l3")]
    assert max_min_pairs(winners, losers, 8, score, rng) == [("w2", "l2"), ("w3", "l3"), ("w1", "l1")]
    # no trajectory is in two pairs: the shorter side ends the list
    assert max_min_pairs(["w1"], losers, 3, score, rng) == [("w1", "l2")]


def test_max_min_breaks_ties_at_random_with_the_problems_generator():
    """With outcome rewards every winner ties and every loser ties: the pair must not always be the first
    winner against the first loser."""
    winners, losers = [f"w{i}" for i in range(6)], [f"l{i}" for i in range(6)]
    score = {**dict.fromkeys(winners, 1.0), **dict.fromkeys(losers, -0.5)}.__getitem__
    picks = {seed: max_min_pairs(winners, losers, 1, score, problem_rng(seed, "p1")) for seed in range(4)}
    assert len(set(map(tuple, picks.values()))) > 1  # two seeds pick different pairs
    assert picks[0] == max_min_pairs(winners, losers, 1, score, problem_rng(0, "p1"))  # and a seed repeats
    assert any(pick != [("w0", "l0")] for pick in picks.values())
    ts = [trajectory(w) for w in winners] + [trajectory(loser, correct=False) for loser in losers]
    chosen = {seed: [(p["chosen_id"], p["rejected_id"]) for p in
                     make_pairs(ts, PairConfig(strategy="max-min", seed=seed))[0]] for seed in range(4)}
    assert len(set(map(tuple, chosen.values()))) > 1


def test_sft_selection_takes_all_a_seeded_sample_or_the_best_winners():
    winners = ["w1", "w2", "w3", "w4"]
    score = {"w1": 0.2, "w2": 0.9, "w3": 0.5, "w4": 0.9}.__getitem__
    assert select_winners(winners, "all", None, random.Random(0), score) == winners
    sample = select_winners(winners, "random", 2, random.Random(0), score)
    assert sample == [winners[i] for i in sorted(random.Random(0).sample(range(4), 2))]
    assert sorted(select_winners(winners, "max-min", 2, random.Random(0), score)) == ["w2", "w4"]


# ---- filters ------------------------------------------------------------------------------------------


def test_each_filter_hits_exactly_its_case():
    good = trajectory("good")
    assert not any(rule(good) for rule in (no_action, unfinished, no_answer, error_observation))

    assert no_action(trajectory("a", response=[]))
    for status in ("stopped", "max_turns", "length", "tool_call"):
        assert unfinished(trajectory("a", status=status))
    assert no_answer(trajectory("a", pred=None))
    without_pred_field = trajectory("a")
    del without_pred_field["pred"]
    assert not no_answer(without_pred_field)  # extracted from the last action: \boxed{5}
    without_pred_field["messages"][-1]["content"] = "So it is five."
    assert no_answer(without_pred_field)


@pytest.mark.parametrize("output, hit", [
    ("Traceback (most recent call last):\n  File ...\nZeroDivisionError: division by zero", True),
    ("sympy.polys.polyerrors.PolynomialError: not a polynomial", True),
    ("Timed out after 10 s", True),
    ("5", False),
    ("partial output\nTimeoutError: the cell ran longer than 10 s", True),
    ("the error bars are small", False),
])
def test_an_error_in_the_last_observation_is_a_python_error_line_or_a_timeout(output, hit):
    t = trajectory("a")
    t["messages"][-2]["content"] = f"```output\n{output}\n```"
    assert error_observation(t) is hit


def test_the_error_filter_reads_the_recorded_outcome_before_the_text():
    printed = trajectory("a")
    printed["messages"][-2] = {"role": "user", "content": "```output\nerror: 0.001\n```",
                               "outcome": {"status": "ok", "cut": False}}
    assert not error_observation(printed)
    quiet_timeout = trajectory("b")
    quiet_timeout["messages"][-2] = {"role": "user", "content": "```output\n5\n```",
                                     "outcome": {"status": "timeout", "cut": False}}
    assert error_observation(quiet_timeout)
    out, stats = make_pairs([printed, quiet_timeout, trajectory("c", correct=False)], PairConfig(strategy="all"))
    assert [(p["chosen_id"], p["rejected_id"]) for p in out] == [("a", "c")]
    assert stats.filtered["error_observation"] == 1


def test_an_error_before_the_last_observation_is_not_a_hit():
    t = trajectory("a")
    t["messages"][-1:] = [
        {"role": "assistant", "content": "```python\nprint(5)\n```"},
        {"role": "user", "content": "```output\n5\n```"},
        {"role": "assistant", "content": "$\\boxed{5}$"},
    ]
    t["messages"][-4]["content"] = "```output\nNameError: name 'x' is not defined\n```"
    assert not error_observation(t)
    assert not error_observation(trajectory("b", response=[{"role": "assistant", "content": "$\\boxed{5}$"}]))


def test_a_trajectory_is_counted_under_the_first_filter_it_hits():
    config = PairConfig()
    ts = [
        trajectory("ok"),
        trajectory("cut", status="length", pred=None),  # unfinished and no answer: counted as unfinished
        trajectory("noans", pred=None),
        trajectory("ungraded", correct=None, reward=None),
    ]
    ts[-1].pop("answer")
    hits = Counter()
    kept = apply_filters(ts, trajectory_filters(config), hits)
    assert [t["id"] for t in kept] == ["ok"]
    assert hits == {"unfinished": 1, "no_answer": 1, "ungraded": 1}


def test_keep_unfinished_and_keep_errors_turn_their_filters_off():
    names = [f.name for f in trajectory_filters(PairConfig())]
    assert names == ["no_action", "unfinished", "no_answer", "error_observation", "ungraded"]
    names = [f.name for f in trajectory_filters(PairConfig(keep_unfinished=True, keep_errors=True))]
    assert names == ["no_action", "ungraded"]
    names = [f.name for f in trajectory_filters(PairConfig(strategy="max-min"))]
    assert names[-1] == "no_score"


def test_prompt_mismatches_are_dropped_against_the_most_common_prompt():
    group = [trajectory("a", prompt="other"), trajectory("b"), trajectory("c"), trajectory("d", system="S")]
    kept, dropped = drop_prompt_mismatches(group)
    assert [t["id"] for t in kept] == ["b", "c"] and dropped == 2
    # a tie goes to the prompt seen first
    kept, dropped = drop_prompt_mismatches([trajectory("a", prompt="other"), trajectory("b")])
    assert [t["id"] for t in kept] == ["a"] and dropped == 1


def test_identical_responses_are_deduplicated_keeping_the_first():
    same = [{"role": "assistant", "content": "$\\boxed{5}$"}]
    group = [trajectory("a", response=same), trajectory("b"), trajectory("c", response=[dict(same[0])]),
             trajectory("d", correct=False, response=same)]
    kept, dropped, conflicts = deduplicate(group)
    assert [t["id"] for t in kept] == ["a", "b"]
    assert dropped == 2 and conflicts == 1  # d says wrong where a says right


# ---- the stage ----------------------------------------------------------------------------------------


def test_pairs_have_deterministic_ids_one_prompt_and_the_fields_the_two_share():
    w = trajectory("p1-0", level=3, model="x")
    l = trajectory("p1-1", correct=False, level=3, model="y")
    out, stats = make_pairs([w, l], PairConfig(strategy="all"))
    assert out == [{
        "problem_id": "p1", "question": "What is 2+3?", "answer": "5", "level": 3,
        "id": "p1:p1-0>p1-1",
        "prompt": [{"role": "user", "content": PROMPT}],
        "chosen": w["messages"][1:], "rejected": l["messages"][1:],
        "chosen_id": "p1-0", "rejected_id": "p1-1", "chosen_reward": 1.0, "rejected_reward": -0.5,
    }]
    assert stats.winners == 1 and stats.losers == 1 and stats.written == 1 and stats.problems_with_both == 1


def test_the_whole_stage_counts_every_step():
    ts = [trajectory(f"p1-{i}", correct=i < 3) for i in range(6)]  # 3 winners, 3 losers
    ts.append(trajectory("p1-dup", response=ts[0]["messages"][1:]))
    ts.append(trajectory("p1-err"))
    ts[-1]["messages"][-2]["content"] = "```output\nValueError: bad\n```"
    ts.append(trajectory("p1-cut", status="max_turns", correct=False, pred=None))
    ts.append(trajectory("p1-tmpl", prompt="another template"))
    ts += [trajectory("p2-0", problem_id="p2"), trajectory("p2-1", problem_id="p2")]  # p2: winners only
    ts.append(trajectory("p3-0", problem_id="p3", correct=False))  # p3: one loser only
    out, stats = make_pairs(ts, PairConfig(strategy="random", k=4, seed=7))
    assert stats.as_dict() == {
        "trajectories": 13, "problems": 3, "graded": 0,
        "filtered": {"no_action": 0, "unfinished": 1, "no_answer": 0, "error_observation": 1, "ungraded": 0,
                     "prompt_mismatch": 1},
        "duplicates": 1, "duplicate_label_conflicts": 0,
        "winners": 5, "losers": 4, "problems_with_both": 1, "problems_without_winner": 1,
        "problems_without_loser": 1, "written": 4,
    }
    assert {p["problem_id"] for p in out} == {"p1"}
    assert len({p["id"] for p in out}) == 4
    assert all(p["chosen_id"] in ("p1-0", "p1-1", "p1-2") and p["rejected_id"] in ("p1-3", "p1-4", "p1-5")
               for p in out)


def test_a_problems_random_pairs_do_not_depend_on_the_rest_of_the_file():
    p1 = [trajectory(f"a{i}", correct=i % 2 == 0) for i in range(8)]
    p2 = [trajectory(f"b{i}", problem_id="p2", correct=i % 2 == 0) for i in range(8)]
    alone, _ = make_pairs(p1, PairConfig(k=3, seed=1))
    together, _ = make_pairs(p2 + p1, PairConfig(k=3, seed=1))
    assert [p["id"] for p in together if p["problem_id"] == "p1"] == [p["id"] for p in alone]
    other_seed, _ = make_pairs(p1, PairConfig(k=3, seed=2))
    assert len(alone) == 3 and [p["id"] for p in other_seed] != [p["id"] for p in alone]


def test_max_min_ranks_by_a_score_field_and_drops_the_unscored():
    ts = [trajectory("w1", score=0.2), trajectory("w2", score=0.8), trajectory("w3"),
          trajectory("l1", correct=False, score=0.6), trajectory("l2", correct=False, score=0.3)]
    out, stats = make_pairs(ts, PairConfig(strategy="max-min", score_field="score"))
    assert [(p["chosen_id"], p["rejected_id"]) for p in out] == [("w2", "l2")]
    assert (out[0]["chosen_score"], out[0]["rejected_score"]) == (0.8, 0.3)
    assert stats.filtered["no_score"] == 1
    out, _ = make_pairs(ts, PairConfig(strategy="max-min", score_field="score", k=5))
    assert [(p["chosen_id"], p["rejected_id"]) for p in out] == [("w2", "l2"), ("w1", "l1")]


def test_max_min_by_reward_puts_the_worst_loser_first():
    ts = [trajectory("w1"), trajectory("l1", correct=False),
          trajectory("l2", correct=False, status="max_turns", pred=None, reward=-1.0)]
    out, _ = make_pairs(ts, PairConfig(strategy="max-min", keep_unfinished=True))
    assert [(p["chosen_id"], p["rejected_id"]) for p in out] == [("w1", "l2")]


def test_a_reward_threshold_splits_winners_and_losers_by_reward():
    ts = [trajectory("a", reward=0.9), trajectory("b", reward=0.5), trajectory("c", reward=0.2, correct=None)]
    out, stats = make_pairs(ts, PairConfig(strategy="all", reward_threshold=0.5))
    assert [(p["chosen_id"], p["rejected_id"]) for p in out] == [("a", "b"), ("a", "c")]
    assert stats.winners == 1 and stats.losers == 2 and stats.graded == 0


def test_kto_writes_each_trajectory_of_the_pairs_once_with_its_label():
    ts = [trajectory("w1"), trajectory("w2"), trajectory("l1", correct=False)]
    out, _ = make_pairs(ts, PairConfig(strategy="all", format="kto"))
    assert [(r["id"], r["label"]) for r in out] == [("w1", True), ("l1", False), ("w2", True)]
    assert out[1]["prompt"] == [{"role": "user", "content": PROMPT}]
    assert out[1]["completion"] == ts[2]["messages"][1:] and "messages" not in out[1]
    assert out[1]["reward"] == -0.5 and out[1]["problem_id"] == "p1"


def test_sft_writes_the_selected_winners_unchanged_even_without_losers():
    ts = [trajectory("w1"), trajectory("l1", correct=False), trajectory("w2"),
          trajectory("q1", problem_id="p2")]
    out, _ = make_pairs(ts, PairConfig(strategy="all", format="sft"))
    assert out == [ts[0], ts[2], ts[3]]


def test_stored_grades_are_trusted_and_missing_ones_graded_from_the_messages():
    trusted = trajectory("t", correct=False)
    trusted["correct"] = True  # wrong by its \boxed{6}, but a stored grade is trusted as it is
    missing = trajectory("m", correct=False)
    for name in ("pred", "correct", "reward"):
        del missing[name]
    no_answer_field = trajectory("n", correct=None)
    del no_answer_field["answer"]
    config = PairConfig(strategy="all")
    assert [needs_grading(t, config) for t in (trusted, missing, no_answer_field)] == [False, True, False]
    assert needs_grading(trusted, PairConfig(regrade=True))
    assert needs_grading(trajectory("r", reward=None), PairConfig(strategy="max-min"))
    with Grader() as grader:
        out, stats = make_pairs([trusted, missing, no_answer_field], config, grader=grader)
        regraded, restats = make_pairs([trusted, missing], PairConfig(strategy="all", regrade=True), grader=grader)
    assert [(p["chosen_id"], p["rejected_id"], p["rejected_reward"]) for p in out] == [("t", "m", -0.5)]
    assert stats.graded == 1 and stats.filtered["ungraded"] == 1
    assert regraded == [] and restats.graded == 2 and restats.losers == 2  # both answer 6


def test_grading_without_a_grader_is_a_bug_not_a_silent_skip():
    t = trajectory("m")
    del t["correct"]
    with pytest.raises(ValueError, match="need grading"):
        make_pairs([t], PairConfig())


def test_repeated_trajectory_ids_are_a_user_error():
    with pytest.raises(UserError, match="'a' appears 2 times"):
        make_pairs([trajectory("a"), trajectory("a", correct=False)], PairConfig())


def test_too_long_counts_the_whole_conversation_under_the_chat_template(tiny_tokenizer):
    t = trajectory("a")
    n = conversation_length(tiny_tokenizer, t["messages"])
    text = tiny_tokenizer.apply_chat_template(t["messages"], tokenize=False)
    assert text.count("<|im_start|>") == 4 and n == len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    loser = trajectory("b", correct=False)
    _, fits = make_pairs([t, loser], PairConfig(max_length=n + 5), tokenizer=tiny_tokenizer)
    _, cut = make_pairs([t, loser], PairConfig(max_length=n - 1), tokenizer=tiny_tokenizer)
    assert fits.filtered["too_long"] == 0 and cut.filtered["too_long"] == 2 and cut.written == 0


# ---- the command --------------------------------------------------------------------------------------

MATHAGENT = [sys.executable, "-m", "mathagent.cli"]


def run(args, stdin=""):
    return subprocess.run(MATHAGENT + args, input=stdin, capture_output=True, text=True, timeout=300)


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_make_pairs_reads_stdin_writes_pairs_to_stdout_and_counts_to_stderr():
    ts = [trajectory("p1-0"), trajectory("p1-1", correct=False), trajectory("p1-2", status="stopped", pred=None),
          trajectory("p2-0", problem_id="p2")]
    proc = run(["make-pairs", "--strategy", "all"], stdin=jsonl(ts))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [p["id"] for p in out] == ["p1:p1-0>p1-1"]
    assert out[0]["chosen"] == ts[0]["messages"][1:]
    assert "unfinished 1" in proc.stderr and "wrote 1 pairs" in proc.stderr
    assert "1 without a loser" in proc.stderr


def test_make_pairs_writes_kto_to_a_file_and_the_counts_as_json(tmp_path):
    source = tmp_path / "t.jsonl"
    source.write_text(jsonl([trajectory("a"), trajectory("b", correct=False), trajectory("c", correct=False)]))
    out, stats = tmp_path / "kto.jsonl", tmp_path / "stats.json"
    proc = run(["make-pairs", str(source), "-o", str(out), "--format", "kto", "--strategy", "max-min",
                "--k", "2", "--stats", str(stats)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    records = [(r["id"], r["label"]) for r in map(json.loads, out.read_text().splitlines())]
    assert records[0] == ("a", True) and records[1] in (("b", False), ("c", False)) and len(records) == 2
    counts = json.loads(stats.read_text())
    assert counts["written"] == 2 and counts["filtered"]["no_score"] == 0 and counts["grading"] is None


def test_make_pairs_grades_what_has_no_grade_and_applies_max_length_with_a_tokenizer(tiny_model):
    loser = trajectory("b", correct=False)
    del loser["correct"]
    proc = run(["make-pairs", "--tokenizer", tiny_model, "--max-length", "1000", "--strategy", "all"],
               stdin=jsonl([trajectory("a"), loser]))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == ["p1:a>b"]
    assert "1 graded here" in proc.stderr and "too_long 0" in proc.stderr
    # With a tokenizer and no --max-length, the limit is training's own (training drops longer examples).
    default = run(["make-pairs", "--tokenizer", tiny_model, "--strategy", "all"],
                  stdin=jsonl([trajectory("a"), trajectory("b", correct=False)]))
    assert "too_long 0" in default.stderr


@pytest.mark.parametrize("args, stdin, message", [
    ([], '{"id": "a", "problem_id": "p1"\n', "<stdin>:1: malformed JSON"),
    ([], jsonl([trajectory("a", correct="yes")]), "<stdin>:1: field 'correct' must be true, false or null"),
    ([], '{"id": "a", "problem_id": "p1", "status": "answered"}\n', "missing required field 'messages'"),
    (["--strategy", "best"], "", "--strategy 'best'"),
    (["--strategy", "all", "--k", "2"], "", "--k does not apply"),
    (["--max-length", "10"], "", "--max-length needs"),
    (["--score-field", "score"], "", "--score-field applies to --strategy max-min only"),
    ([], jsonl([trajectory("a"), trajectory("a")]), "'a' appears 2 times"),
    (["/no/such/file.jsonl"], "", "cannot read"),
])
def test_make_pairs_bad_input_exits_2_with_one_line(args, stdin, message):
    proc = run(["make-pairs", *args], stdin=stdin)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
