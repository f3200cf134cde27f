"""Self-rewarding correction: its reward and the paper's metrics against hand-computed values, and its
training data (mathagent/correction.py)."""

import pytest

from mathagent import correction
from mathagent.attempts import DEFAULT_MARKERS
from mathagent.grading import Grader
from mathagent.metrics import evaluate
from mathagent.rewards import grade_trajectory

Q = {"role": "user", "content": "What is 6 * 7?"}


def said(text: str) -> dict:
    return {"role": "assistant", "content": text}


def trajectory(pid, subject, text, answer="42"):
    return {"id": pid, "problem_id": pid, "subject": subject, "answer": answer, "messages": [Q, said(text)]}


def test_the_papers_metrics_match_hand_computed_values_overall_and_per_subject():
    # c_1 -> c_J per trajectory, with the verdicts given:
    #   p1 algebra: right, "correct"                      -> right        (no revision)
    #   p2 algebra: wrong, "wrong"; right, "correct"      -> wrong->correct
    #   p3 algebra: right, "wrong"; wrong, "wrong"        -> correct->wrong (two revisions allowed, one used)
    #   p4 geometry: wrong, "correct"                     -> wrong         (a false "correct")
    #   p5 geometry: wrong, "wrong"; wrong, (no verdict)  -> wrong
    texts = {
        ("p1", "algebra"): "\\boxed{42} [VERIFY] correct.",
        ("p2", "algebra"): "\\boxed{41} [VERIFY] wrong. \\boxed{42} [VERIFY] correct.",
        ("p3", "algebra"): "\\boxed{42} [VERIFY] wrong. \\boxed{43} [VERIFY] wrong.",
        ("p4", "geometry"): "\\boxed{40} [VERIFY] correct.",
        ("p5", "geometry"): "\\boxed{40} [VERIFY] wrong. \\boxed{39}",
    }
    with Grader() as grader:
        graded = [grade_trajectory(trajectory(p, s, text), grader) for (p, s), text in texts.items()]
        report = evaluate(graded, equal=grader.is_equivalent)
    c = report["correction"]
    assert c["trajectories"] == 5
    assert c["turn1_accuracy"] == pytest.approx(2 / 5)  # p1, p3
    assert c["final_accuracy"] == pytest.approx(2 / 5)  # p1, p2
    assert c["improvement"] == pytest.approx(0.0)
    assert c["wrong_to_correct"] == pytest.approx(1 / 5) and c["correct_to_wrong"] == pytest.approx(1 / 5)
    assert c["revisions_mean"] == pytest.approx(3 / 5)
    v = c["verification"]
    # judged attempts: p1 (R, c) p2 (W, w) (R, c) p3 (R, w) (W, w) p4 (W, c) p5 (W, w); p5's second is not judged
    assert v["attempts"] == 7
    assert v["accuracy"] == pytest.approx(5 / 7)
    assert v["correct_given_correct"] == pytest.approx(2 / 3)  # right answers: p1 c, p2b c, p3a w
    assert v["wrong_given_wrong"] == pytest.approx(3 / 4)  # wrong answers: p2a w, p3b w, p4 c, p5a w
    assert v["turn1_accuracy"] == pytest.approx(3 / 5)  # p1 yes, p2 yes, p3 no, p4 no, p5 yes
    algebra, geometry = (report["by_subject"][s]["correction"] for s in ("algebra", "geometry"))
    assert (algebra["turn1_accuracy"], algebra["final_accuracy"]) == pytest.approx((2 / 3, 2 / 3))
    assert (algebra["wrong_to_correct"], algebra["correct_to_wrong"]) == pytest.approx((1 / 3, 1 / 3))
    assert (geometry["turn1_accuracy"], geometry["final_accuracy"]) == (0.0, 0.0)
    assert geometry["verification"]["wrong_given_wrong"] == pytest.approx(1 / 2)
    assert report["accuracy"] == pytest.approx(2 / 5)  # the final answers


# The talk's Table 1 (gold 20.39): the first answer 7.58, a self-check that recomputes and boxes 20.39 before its
# (faithful) "wrong", then the revision to 20.39 -- inline, as a trained model writes it, and prompted.
TABLE1_ANSWER = "The total cost is 3.79 * 2 = 7.58 dollars, so the answer is \\boxed{7.58}."
TABLE1_CHECK = ("Let me check: the question asks for the price of 5 items, 3.79 * 5 + 1.44 = 20.39. "
                "So the final answer is: \\boxed{20.39}. The solution above computed something else. [VERIFY] wrong.")
TABLE1_REVISION = "The price of 5 items plus the fee is 3.79 * 5 + 1.44 = 20.39, so \\boxed{20.39}."
TABLE1 = {
    "inline": [Q, said(f"{TABLE1_ANSWER}\n\n{TABLE1_CHECK} Let's correct it step by step.\n{TABLE1_REVISION}\n\n"
                       "[VERIFY] correct.")],
    "prompted": [Q, said(TABLE1_ANSWER), {"role": "user", "content": DEFAULT_MARKERS.verify_prompt},
                 said(TABLE1_CHECK), {"role": "user", "content": DEFAULT_MARKERS.revise_prompt},
                 said(TABLE1_REVISION), {"role": "user", "content": DEFAULT_MARKERS.verify_prompt},
                 said("[VERIFY] correct.")],
}


# What a self-rewarding rollout records in every trajectory, answered or not.
ASKED = {"verdicts": {"correct": "[VERIFY] correct", "wrong": "[VERIFY] wrong"}}


@pytest.mark.parametrize("mode", ["inline", "prompted"])
def test_the_talks_table_1_judges_the_first_answer_not_the_one_its_self_check_recomputes(mode):
    t = {"id": "t1", "problem_id": "t1", "answer": "20.39", "messages": TABLE1[mode]}
    with Grader() as grader:
        g = grade_trajectory(t, grader, verdict_reward=0.5)
        report = evaluate([g], equal=grader.is_equivalent)
    assert g["attempts"] == [{"index": 0, "answer": "7.58", "verdict": "wrong", "correct": False},
                             {"index": 1, "answer": "20.39", "verdict": "correct", "correct": True}]
    assert (g["pred"], g["correct"]) == ("20.39", True)
    assert g["reward"] == 1.0 + 0.5 * 1.0  # r1 of the final answer, and both verdicts faithful
    c = report["correction"]
    assert (c["turn1_accuracy"], c["final_accuracy"], c["improvement"]) == (0.0, 1.0, 1.0)
    assert (c["wrong_to_correct"], c["correct_to_wrong"]) == (1.0, 0.0)
    v = c["verification"]
    assert (v["accuracy"], v["turn1_accuracy"]) == (1.0, 1.0)  # "wrong" of 7.58 is faithful, "correct" of 20.39 too
    assert (v["wrong_given_wrong"], v["correct_given_correct"]) == (1.0, 1.0)


def test_a_trajectory_that_gives_no_answer_counts_as_wrong_at_turn_1_and_at_the_end():
    # p1 right, judged correct; p2 gave no answer (a self-rewarding rollout's, so it carries `verdicts`).
    with Grader() as grader:
        graded = [grade_trajectory({**trajectory("p1", "algebra", "\\boxed{42} [VERIFY] correct."), **ASKED}, grader),
                  grade_trajectory({**trajectory("p2", "geometry", "I could not finish."), **ASKED}, grader)]
        report = evaluate(graded, equal=grader.is_equivalent)
    assert "attempts" not in graded[1] and graded[1]["correct"] is False
    c = report["correction"]
    assert c["trajectories"] == 2
    assert (c["turn1_accuracy"], c["final_accuracy"]) == (0.5, 0.5) and report["accuracy"] == 0.5
    assert (c["improvement"], c["wrong_to_correct"], c["correct_to_wrong"], c["revisions_mean"]) == (0.0, 0.0, 0.0, 0.0)
    assert (c["verification"]["attempts"], c["verification"]["accuracy"]) == (1, 1.0)  # the unanswered judged nothing
    # A subject whose every trajectory gave no answer still reports its correction metrics: all wrong.
    geometry = report["by_subject"]["geometry"]["correction"]
    assert (geometry["trajectories"], geometry["turn1_accuracy"], geometry["final_accuracy"]) == (1, 0.0, 0.0)
    assert geometry["verification"]["attempts"] == 0 and geometry["verification"]["accuracy"] is None


def test_with_unanswered_trajectories_the_papers_metrics_match_hand_computed_values():
    # p1 right "correct"; p2 wrong "wrong" -> right "correct"; p3 right "wrong" -> wrong "wrong"; p4 and p5 no
    # answer. Over 5: turn 1 = (p1, p3) 2/5, final = (p1, p2) 2/5, wrong->correct = correct->wrong = 1/5.
    texts = ["\\boxed{42} [VERIFY] correct.", "\\boxed{41} [VERIFY] wrong. \\boxed{42} [VERIFY] correct.",
             "\\boxed{42} [VERIFY] wrong. \\boxed{43} [VERIFY] wrong.", "Hmm.", "```python\nprint(6 * 7)\n```"]
    with Grader() as grader:
        graded = [grade_trajectory({**trajectory(f"p{k}", "x", text), **ASKED}, grader)
                  for k, text in enumerate(texts, 1)]
        report = evaluate(graded, equal=grader.is_equivalent)
    c = report["correction"]
    assert c["trajectories"] == 5
    assert (c["turn1_accuracy"], c["final_accuracy"]) == pytest.approx((2 / 5, 2 / 5))
    assert c["final_accuracy"] == pytest.approx(report["accuracy"])
    assert (c["wrong_to_correct"], c["correct_to_wrong"]) == pytest.approx((1 / 5, 1 / 5))
    assert c["revisions_mean"] == pytest.approx(2 / 5)
    assert c["verification"]["attempts"] == 5 and c["verification"]["accuracy"] == pytest.approx(4 / 5)


def test_a_report_without_verdicts_has_no_correction_section():
    with Grader() as grader:
        graded = [grade_trajectory(trajectory("p", "x", "\\boxed{42}"), grader)]
        assert "correction" not in evaluate(graded, equal=grader.is_equivalent)


def graded(pid, k, answer, gold="42"):
    """A graded tool trajectory: code, its output, then the boxed answer."""
    return {"id": f"{pid}-{k}", "problem_id": pid, "question": "6 * 7?", "answer": gold, "pred": answer,
            "correct": answer == gold, "status": "answered", "messages": [
                Q, said("```python\nprint(6 * 7)\n```"), {"role": "user", "content": "```output\n42\n```"},
                said(f"So \\boxed{{{answer}}}.")]}


def test_demonstrations_have_the_papers_shapes_in_the_set_proportions_and_parse_back():
    rollout = [graded("p", 0, "42"), graded("p", 1, "42"), *(graded("p", k, str(40 + k)) for k in range(3, 8)),
               graded("q", 0, "41"), graded("r", 0, "42"), {**graded("s", 0, "42"), "pred": None, "correct": False}]
    demos, stats = correction.build_demonstrations(rollout, failed_share=0.4, seed=1)
    shapes = [d["shape"] for d in demos if d["problem_id"] == "p"]
    # p: 2 right -> 2 correct; 5 wrong -> round(0.4 * 5) = 2 failed, 3 corrected
    assert sorted(shapes) == ["correct"] * 2 + ["corrected"] * 3 + ["failed"] * 2
    # q has one wrong attempt and nothing to revise it with; r one right one; s no answer at all
    assert [d["shape"] for d in demos if d["problem_id"] in ("q", "r", "s")] == ["correct"]
    assert (stats.problems, stats.skipped, stats.shapes) == (4, 2, {"correct": 3, "corrected": 3, "failed": 2})
    again, _ = correction.build_demonstrations(rollout, failed_share=0.4, seed=1)
    assert again == demos  # seeded per problem
    with Grader() as grader:
        for d in demos:
            t = grade_trajectory(d, grader)
            verdicts = [(a["verdict"], a["correct"]) for a in t["attempts"]]
            want = {"correct": [("correct", True)], "corrected": [("wrong", False), ("correct", True)],
                    "failed": [("wrong", False), ("wrong", False)]}[d["shape"]]
            assert verdicts == want  # the grader's verdicts: every one faithful
            assert t["correct"] is (d["shape"] != "failed")
    corrected = next(d for d in demos if d["shape"] == "corrected")
    assert [m["role"] for m in corrected["messages"]] == ["user", "assistant", "user", "assistant", "user",
                                                          "assistant"]
    assert "\n\n[VERIFY] wrong. Let's correct it step by step.\n```python" in corrected["messages"][3]["content"]


def test_pairs_prefer_the_faithful_verdict_and_the_successful_correction():
    rollout = [graded("p", 0, "42"), graded("p", 1, "40"), graded("p", 2, "41"), graded("p", 3, "43"),
               graded("p", 4, "44")]
    demos, _ = correction.build_demonstrations(rollout, failed_share=0.5, seed=0)  # 1 correct, 2 corrected, 2 failed
    pairs = correction.build_pairs(demos)
    verdict = [p for p in pairs if p["kind"] == "verdict"]
    assert len(verdict) == 5 and len([p for p in pairs if p["kind"] == "correction"]) == 2 * 2
    for p in verdict:
        assert p["chosen"][:-1] == p["rejected"][:-1]  # the same attempt ...
        right = p["chosen_id"].endswith("-correct")
        assert p["chosen"][-1]["content"].endswith("[VERIFY] correct." if right else "[VERIFY] wrong.")
        assert p["rejected"][-1]["content"].endswith("[VERIFY] wrong." if right else "[VERIFY] correct.")
    for p in (p for p in pairs if p["kind"] == "correction"):
        assert p["chosen_id"].endswith("-corrected") and p["rejected_id"].endswith("-failed")
        assert p["prompt"] == [Q]


def test_make_corrections_chains_with_evaluate_and_refuses_a_bad_share(tmp_path):
    import json
    import subprocess
    import sys

    rollout = tmp_path / "rollout.jsonl"
    rollout.write_text("".join(json.dumps(graded("p", k, a)) + "\n" for k, a in enumerate(["42", "40", "41"])))
    cli = [sys.executable, "-m", "mathagent.cli"]
    made = subprocess.run([*cli, "make-corrections", str(rollout), "--failed-share", "0.5"], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "1 correct, 1 corrected, 1 failed" in made.stderr
    report = subprocess.run([*cli, "evaluate"], input=made.stdout, capture_output=True, text=True, timeout=120)
    summary = json.loads(report.stdout)["correction"]
    assert (summary["turn1_accuracy"], summary["final_accuracy"]) == pytest.approx((1 / 3, 2 / 3))
    bad = subprocess.run([*cli, "make-corrections", str(rollout), "--failed-share", "2"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--failed-share 2.0: must be between 0 and 1" in bad.stderr



@pytest.mark.slow
def test_a_tiny_model_warm_started_on_self_rewarding_demonstrations_judges_and_revises_in_rollout(tmp_path):
    """The embedded task's demonstrations (in-head slips judged wrong and corrected with the tool) teach the
    tiny model the format; a sampled inline rollout then writes verdicts, runs revisions with the tool, and
    every stage parses them: attempts, grading, evaluate's correction table, make-pairs."""
    import json
    import subprocess
    import sys

    from mathagent.tasks.arith import make_problems
    from mathagent.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", seed=0, warmup_steps=300, warmup="self-rewarding")
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in make_problems(16, seed=7, split="heldout")))

    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([sys.executable, "-m", "mathagent.cli", *args], input=stdin, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    rollout = run("rollout", str(problems), "--model", str(model), "--backend", "hf", "--prompt", "bare",
                  "--self-reward", "inline", "--max-revisions", "2", "--temperature", "1", "--n", "2", "--seed", "0",
                  "--max-tokens", "96")
    records = [json.loads(line) for line in rollout.splitlines()]
    judged_records = [r for r in records if r.get("attempts") and r["attempts"][0]["verdict"] is not None]
    revised = [r for r in records if len(r.get("attempts", [])) > 1]
    assert len(judged_records) >= len(records) // 2  # the format is learned: most trajectories hold a verdict
    assert revised, "no trajectory revised an answer it judged wrong"
    for r in revised:
        assert r["attempts"][0]["verdict"] == "wrong"
        assert any("```output" in m["content"] for m in r["messages"])  # the revision used the tool
        assert r["pred"] == r["attempts"][-1]["answer"]
    summary = json.loads(run("evaluate", stdin=rollout))
    # Every trajectory counts, one that gave no answer as wrong: the final accuracy is evaluate's own.
    assert summary["correction"]["trajectories"] == len(records)
    assert summary["correction"]["final_accuracy"] == pytest.approx(summary["accuracy"])
    assert summary["correction"]["revisions_mean"] > 0
    pairs = run("make-pairs", "--reward-threshold", "-0.75", "--keep-unfinished", stdin=rollout)
    assert all(json.loads(line)["prompt"][0]["role"] == "user" for line in pairs.splitlines())
