"""Monte-Carlo step labels: the Q-hat arithmetic, step splitting, deduplication, and mc-label end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter

import pytest

from mathagent import labeling
from mathagent.agent import AgentConfig
from mathagent.labeling import LabelCache, hard_label, label_trajectories, outcome_step, q_hat, split_steps
from mathagent.prompts import PROMPTS
from mathagent.records import format_observation

from conftest import last_output

QUESTION = {"role": "user", "content": "What is 3 + 4?"}


def trajectory(id_, hints, final, correct, answer="7"):
    """A graded trajectory whose actions print 'hint K' (K = hints), then answer `final`."""
    messages = [dict(QUESTION)]
    for k in hints:
        messages.append({"role": "assistant", "content": f"Try.\n```python\nprint('hint {k}')\n```"})
        messages.append({"role": "user", "content": format_observation(f"hint {k}")})
    messages.append({"role": "assistant", "content": f"So \\boxed{{{final}}}."})
    return {"id": id_, "problem_id": "p", "answer": answer, "messages": messages, "status": "answered",
            "correct": correct, "extra": [1, 2]}


def hinted_policy():
    """The j-th completion drawn from a state answers right iff j < K, K read from the state's last
    'hint K' output: a prefix whose last hint is K gets Q-hat = K/M exactly (for K <= M)."""
    seen = Counter()

    def policy(state, turn):
        hint = int(re.findall(r"hint (\d+)", state)[-1])
        seen[state] += 1
        return "\\boxed{7}" if seen[state] <= hint else "\\boxed{0}"

    return policy


def test_q_hat_is_the_fraction_of_correct_completions_and_plus_means_any_correct():
    assert q_hat([True, False, False, True, False, False, False, False]) == 0.25
    assert q_hat([False] * 8) == 0.0 and q_hat([True]) == 1.0
    assert hard_label(0.0) == "-" and hard_label(1 / 8) == "+" and hard_label(1.0) == "+"
    assert labeling.sampled_step([True, False, False]) == {"q": 1 / 3, "label": "+", "m": 3, "correct": 1}
    assert outcome_step(True) == {"q": 1.0, "label": "+", "m": 0}
    assert outcome_step(False) == {"q": 0.0, "label": "-", "m": 0}
    with pytest.raises(ValueError):
        q_hat([])


def test_soft_optimal_q_tends_to_the_mean_for_large_eta_and_to_the_hard_label_for_small_eta():
    outcomes = [True, False, False, False]
    assert labeling.soft_optimal_q(outcomes, 1.0) == pytest.approx(math.log((math.e + 3) / 4), abs=1e-15)
    assert labeling.soft_optimal_q(outcomes, 1e6) == pytest.approx(q_hat(outcomes), abs=1e-6)
    assert labeling.soft_optimal_q(outcomes, 1e-3) == pytest.approx(1.0, abs=1e-2)  # 1 + eta log(1/4)
    assert labeling.soft_optimal_q(outcomes, 1e-9) == pytest.approx(1.0, abs=1e-7)
    assert labeling.soft_optimal_q([False] * 4, 1e-9) == 0.0 and labeling.soft_optimal_q([True] * 4, 0.5) == 1.0
    for eta in (0.01, 0.3, 1.0, 10.0):  # between the mean and the max, increasing as eta falls
        assert q_hat(outcomes) < labeling.soft_optimal_q(outcomes, eta) < 1.0
    step = labeling.sampled_step(outcomes, "soft-optimal", 1e-9)
    assert step["q"] == pytest.approx(1.0) and step["label"] == "+" and step["correct"] == 1
    with pytest.raises(ValueError):
        labeling.soft_optimal_q(outcomes, 0.0)


def test_soft_optimal_q_keeps_every_digit_from_tiny_to_huge_eta():
    one_in_four = [True, False, False, False]
    # Hand values: eta -> 0, 1 + eta log(1/4) (the 3 e^(-1/eta) term is below 1e-400); eta = 1, log((e + 3) / 4);
    # eta -> infinity, p + p (1 - p) / (2 eta) + O(eta^-2) with p = 1/4, which rounds to 0.25 from eta 1e16 on.
    assert labeling.soft_optimal_q(one_in_four, 1e-300) == 1.0
    assert labeling.soft_optimal_q(one_in_four, 1e-3) == pytest.approx(1 - math.log(4) / 1e3, rel=1e-15)
    for eta in (1 / 700, 1 / 700.001):  # either side of where the closed form switches to the max-shifted one
        assert labeling.soft_optimal_q(one_in_four, eta) == pytest.approx(1 - eta * math.log(4), rel=1e-15)
    assert labeling.soft_optimal_q(one_in_four, 1.0) == pytest.approx(0.35737401950878853731, rel=1e-15)
    assert labeling.soft_optimal_q(one_in_four, 1e9) == pytest.approx(0.25 + 0.09375e-9, rel=1e-15)
    assert labeling.soft_optimal_q(one_in_four, 1e16) == 0.25
    assert labeling.soft_optimal_q(one_in_four, 1e300) == 0.25
    three_in_eight = [True] * 3 + [False] * 5
    assert labeling.soft_optimal_q(three_in_eight, 1e9) == pytest.approx(0.375 + 0.375 * 0.625 / 2e9, rel=1e-15)
    assert labeling.soft_optimal_q(three_in_eight, 1e16) == 0.375
    assert labeling.soft_optimal_q([True] * 4, 1e300) == 1.0 and labeling.soft_optimal_q([False] * 4, 1e-300) == 0.0


def test_a_turn_step_is_an_action_with_its_observation_and_its_prefix_ends_there():
    t = trajectory("a", [3, 5], 7, True)
    steps = split_steps(t["messages"])
    assert len(steps) == 3
    assert [len(s.prefix) for s in steps] == [3, 5, 6]
    assert steps[0].text == "Try.\n```python\nprint('hint 3')\n```\n\n```output\nhint 3\n```"
    assert steps[2].text == "So \\boxed{7}."
    assert not any(s.partial for s in steps)
    assert split_steps([QUESTION]) == []


def test_paragraph_steps_split_at_blank_lines_but_never_inside_a_code_fence():
    action = "First idea.\n\nSecond idea,\nsame paragraph.\n\n```python\nx = 1\n\nprint(x)\n```"
    messages = [QUESTION, {"role": "assistant", "content": action}, {"role": "user", "content": format_observation("1")},
                {"role": "assistant", "content": "Done.\n\n\\boxed{1}"}]
    steps = split_steps(messages, "paragraphs")
    assert [s.text for s in steps] == [
        "First idea.", "Second idea,\nsame paragraph.", "```python\nx = 1\n\nprint(x)\n```\n\n```output\n1\n```",
        "Done.", "\\boxed{1}",
    ]
    assert [s.partial for s in steps] == [True, True, False, True, False]
    assert steps[1].prefix[-1] == {"role": "assistant", "content": "First idea.\n\nSecond idea,\nsame paragraph."}
    assert steps[2].prefix == messages[:3]
    assert steps[3].prefix[-1]["content"] == "Done."


def test_labels_are_exact_and_a_shared_prefix_is_sampled_once(scripted, sandbox, grader):
    engine = scripted(hinted_policy())
    a = trajectory("a", [3, 5], 7, True)  # steps: prefix(hint 3), prefix(hint 3, hint 5), own grade
    b = trajectory("b", [3, 0], 9, False)  # shares its first prefix with a
    report = label_trajectories([a, b], engine, sandbox, grader, AgentConfig(max_turns=6), m=8)
    assert a["steps"] == [
        {"q": 3 / 8, "label": "+", "m": 8, "correct": 3},
        {"q": 5 / 8, "label": "+", "m": 8, "correct": 5},
        {"q": 1.0, "label": "+", "m": 0},
    ]
    assert b["steps"] == [
        {"q": 3 / 8, "label": "+", "m": 8, "correct": 3},
        {"q": 0.0, "label": "-", "m": 8, "correct": 0},
        {"q": 0.0, "label": "-", "m": 0},
    ]
    assert (report.prefixes, report.reused, report.completions, report.steps) == (3, 1, 24, 6)
    assert engine.stats.calls == 1 and engine.stats.requests == 24
    assert a["extra"] == [1, 2] and a["messages"][-1]["content"] == "So \\boxed{7}."  # the input is kept


def test_a_cache_reuses_prefixes_sampled_in_an_earlier_chunk(scripted, sandbox, grader):
    engine = scripted(hinted_policy())
    cache = LabelCache()
    label_trajectories([trajectory("a", [2], 7, True)], engine, sandbox, grader, AgentConfig(), m=4, cache=cache)
    later = trajectory("b", [2], 5, False)
    report = label_trajectories([later], engine, sandbox, grader, AgentConfig(), m=4, cache=cache)
    assert later["steps"][0] == {"q": 0.5, "label": "+", "m": 4, "correct": 2}
    assert (report.prefixes, report.reused, report.completions, report.engine_calls) == (0, 1, 0, 0)


def test_a_single_action_trajectory_is_labeled_by_its_own_grade_without_sampling(scripted, sandbox, grader):
    engine = scripted(lambda state, turn: pytest.fail("nothing should be sampled"))
    right, wrong = trajectory("r", [], 7, True), trajectory("w", [], 1, False)
    label_trajectories([right, wrong], engine, sandbox, grader, AgentConfig(), m=8)
    assert right["steps"] == [{"q": 1.0, "label": "+", "m": 0}]
    assert wrong["steps"] == [{"q": 0.0, "label": "-", "m": 0}]
    assert engine.stats.calls == 0


def rambling_policy(ramblers):
    """From the prefix's state, the j-th completion (j = 1..M) either rambles without end (j in `ramblers`) or
    writes a long preamble (cut by a small --max-tokens) and, continued, the right answer."""
    seen = Counter()

    def policy(state, turn):
        if "Hmm" in state.rsplit("hint", 1)[-1]:
            return "Hmm " * 40
        if "Let me see" in state.rsplit("hint", 1)[-1]:
            return " \\boxed{7}."
        seen[state] += 1
        return "Hmm " * 40 if seen[state] in ramblers else "Let me see " * 10 + "\\boxed{7}."

    return policy


def test_a_completion_cut_by_the_token_limit_is_continued_and_left_out_of_q_hat_if_still_cut(scripted, sandbox, grader):
    t = trajectory("a", [3], 7, True)
    engine = scripted(rambling_policy({2, 4}))
    report = label_trajectories([t], engine, sandbox, grader, AgentConfig(max_turns=3, max_tokens=8), m=4)
    # Completions 1 and 3 are cut once, continued, and right; 2 and 4 are still cut after 3 rounds.
    assert t["steps"][0] == {"q": 1.0, "label": "+", "m": 4, "correct": 2, "cut": 2}
    assert (report.continued, report.left_out) == (4, 2)
    assert engine.stats.calls == 3  # the first round and two continuation rounds (H = 3 in all)
    everything_cut = trajectory("b", [4], 7, True)
    label_trajectories([everything_cut], scripted(rambling_policy({1, 2, 3, 4})), sandbox, grader,
                       AgentConfig(max_turns=2, max_tokens=8), m=4)
    assert everything_cut["steps"][0] == {"q": 0.0, "label": "-", "m": 4, "correct": 0, "cut": 4}


def test_a_single_action_trajectory_under_turns_steps_is_reported_with_a_pointer_to_paragraphs():
    single = trajectory("s", [], 7, True)
    proc = mathagent(["mc-label"], json.dumps(single) + "\n")
    assert "1 of 1 trajectories have a single action" in proc.stderr and "--steps paragraphs" in proc.stderr
    assert json.loads(proc.stdout)["steps"] == [{"q": 1.0, "label": "+", "m": 0}]
    quiet = mathagent(["mc-label", "--steps", "paragraphs"], json.dumps(single) + "\n")
    assert "single action" not in quiet.stderr


def code_then_answer(state, turn):
    """Continuations run code first, read its output, then answer with it: two turns each."""
    if "cont-out" not in state:
        return "Check.\n```python\nprint('cont-out', 3 + 4)\n```"
    return f"\\boxed{{{last_output(state).split()[-1]}}}"


def test_every_prefix_of_every_trajectory_costs_one_engine_call_per_turn_with_code_run_in_the_sandbox(scripted, sandbox, grader):
    engine = scripted(code_then_answer)
    trajectories = [trajectory(f"t{i}", [i, i + 1, i + 2], 7, i % 2 == 0) for i in range(5)]
    report = label_trajectories(trajectories, engine, sandbox, grader, AgentConfig(max_turns=6), m=3)
    assert engine.stats.calls == 2  # a code turn and an answer turn, for all 15 prefixes x 3 completions
    assert engine.stats.requests == 2 * 15 * 3
    assert report.completions == 45 and report.prefixes == 15
    for t in trajectories:
        assert [s["q"] for s in t["steps"]] == [1.0, 1.0, 1.0, 1.0 if t["correct"] else 0.0]


def test_a_paragraph_prefix_is_continued_inside_its_action(scripted, sandbox, grader):
    states = []

    def policy(state, turn):
        states.append(state)
        return " then 4 more, so \\boxed{7}." if state.endswith("We start at 3.") else "\\boxed{2}"

    messages = [QUESTION, {"role": "assistant", "content": "We start at 3.\n\nAdd 4: \\boxed{7}."}]
    t = {"id": "cot", "answer": "7", "messages": messages, "correct": True}
    label_trajectories([t], scripted(policy), sandbox, grader, AgentConfig(), m=2, mode="paragraphs")
    assert t["steps"][0] == {"q": 1.0, "label": "+", "m": 2, "correct": 2}
    assert all(s.endswith("<|im_start|>assistant\nWe start at 3.") for s in states)


def test_mc_label_with_vllm_on_the_tiny_model_samples_m_completions_per_distinct_prefix(vllm_engine, sandbox, grader):
    from mathagent.tasks.arith import gold_messages, make_problems

    trajectories = []
    for p in make_problems(3, seed=5):
        gold = gold_messages(p, PROMPTS["tool"])
        trajectories.append({**p, "problem_id": p["id"], "messages": gold, "correct": True})
        wrong = [dict(m) for m in gold]
        wrong[-1]["content"] = "The answer is \\boxed{0}."
        trajectories.append({**p, "id": p["id"] + "-w", "problem_id": p["id"], "messages": wrong, "correct": False})
    calls = vllm_engine.stats.calls
    config = AgentConfig(max_turns=4, max_tokens=8, temperature=1.0)
    report = label_trajectories(trajectories, vllm_engine, sandbox, grader, config, m=2)
    sampled = sum(len(split_steps(t["messages"])) - 1 for t in trajectories)
    assert report.prefixes == sampled // 2 and report.reused == sampled // 2  # gold and wrong share them
    assert report.completions == 2 * report.prefixes
    assert vllm_engine.stats.calls - calls == report.engine_calls <= 4
    for t in trajectories:
        assert len(t["steps"]) == len(split_steps(t["messages"]))
        assert all(s["m"] == 2 and s["q"] in (0.0, 0.5, 1.0) for s in t["steps"][:-1])
        assert t["steps"][-1] == outcome_step(t["correct"])


def gold_and_wrong_trajectories(n):
    """Gold tool-integrated solutions of the synthetic task, each with a wrong-answer twin sharing its prefixes."""
    from mathagent.tasks.arith import gold_messages, make_problems

    out = []
    for p in make_problems(n, seed=5):
        gold = gold_messages(p, PROMPTS["tool"])
        out.append({**p, "problem_id": p["id"], "messages": gold, "status": "answered", "correct": True})
        wrong = [dict(m) for m in gold]
        wrong[-1]["content"] = "The answer is \\boxed{0}."
        out.append({**p, "id": p["id"] + "-w", "problem_id": p["id"], "messages": wrong, "status": "answered",
                    "correct": False})
    return out


def mathagent(args, stdin, check=True):
    proc = subprocess.run([sys.executable, "-m", "mathagent.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_mc_label_command_keeps_every_record_in_order_and_resumes(tiny_model, tmp_path):
    trajectories = gold_and_wrong_trajectories(2)
    stdin = "".join(json.dumps(t) + "\n" for t in trajectories)
    out = tmp_path / "labeled.jsonl"
    # A killed run's finished records: the first trajectory only (its labels are not recomputed on resume).
    steps = len(split_steps(trajectories[0]["messages"]))
    first = {**trajectories[0], "steps": [{"q": 0.5, "label": "+", "m": 2}] * steps}
    tmp = tmp_path / ".labeled.jsonl.x.tmp"
    tmp.write_text(json.dumps(first) + "\n")
    args = ["mc-label", "--model", tiny_model, "--backend", "hf", "--m", "2", "--max-tokens", "8", "--max-turns", "4",
            "-o", str(out), "--resume"]
    proc = mathagent(args, stdin)
    labeled = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["id"] for t in labeled] == [t["id"] for t in trajectories]
    assert labeled[0]["steps"] == first["steps"]
    for t, original in zip(labeled[1:], trajectories[1:], strict=True):
        assert {k: v for k, v in t.items() if k != "steps"} == original
        assert len(t["steps"]) == len(split_steps(original["messages"]))
        assert all(s["m"] == 2 for s in t["steps"][:-1]) and t["steps"][-1] == outcome_step(original["correct"])
    assert re.search(r"\d+ completions \(\d+ cut by --max-tokens and continued, \d+ still cut and left out of Q-hat\), "
                     r"\d+ tokens, \d+ engine calls in [\d.]+ s", proc.stderr)
    assert not tmp.exists()

    prm = mathagent(["mc-label", "--model", tiny_model, "--backend", "hf", "--m", "1", "--max-tokens", "4",
                     "--format", "prm"], "".join(json.dumps(t) + "\n" for t in trajectories[:1]))
    (example,) = [json.loads(line) for line in prm.stdout.splitlines()]
    assert [m["role"] for m in example["messages"]] == ["user", "assistant"] * steps
    assert [m["content"] for m in example["messages"][1::2]] == example["labels"]
    assert example["messages"][0]["content"].startswith(trajectories[0]["messages"][0]["content"] + "\n\n")
    assert len(example["q"]) == steps and example["labels"][-1] == "+" and "steps" not in example


def test_mc_label_refuses_an_ungraded_trajectory_with_its_line():
    ungraded = {"id": "u", "messages": [QUESTION], "answer": "7"}
    proc = mathagent(["mc-label"], json.dumps(ungraded) + "\n", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: <stdin>:1: missing required field 'correct'")


def test_mc_label_names_its_q_eta_flag_in_a_bad_value_and_has_no_eta_flag():
    graded = {"id": "g", "messages": [QUESTION], "answer": "7", "correct": True}
    proc = mathagent(["mc-label", "--q", "soft-optimal", "--q-eta", "0"], json.dumps(graded) + "\n", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --q-eta 0.0: must be a positive finite number")
    proc = mathagent(["mc-label", "--eta", "1"], json.dumps(graded) + "\n", check=False)
    assert proc.returncode == 2 and "No such option: --eta" in proc.stderr


def test_self_rewarding_completions_are_judged_revised_and_graded_on_their_final_answer(scripted, sandbox, grader):
    """A prompted self-rewarding trajectory's steps: with --self-reward the completions of a step go on through
    verdicts and revisions as the rollout did, so Q-hat is the chance that the final answer is right."""
    from mathagent.attempts import DEFAULT_MARKERS

    verify, revise = DEFAULT_MARKERS.verify_prompt, DEFAULT_MARKERS.revise_prompt

    def judges_then_revises(state, outputs):
        asked = state.rsplit("<|im_start|>user\n", 1)[-1]
        if asked.startswith(verify[:20]):
            return "[VERIFY] correct." if state.count("\\boxed") >= 2 else "[VERIFY] wrong."
        if asked.startswith(revise[:20]):
            return "\\boxed{42}"
        return "\\boxed{48}"

    messages = [{"role": "user", "content": "6 * 7?"}, {"role": "assistant", "content": "\\boxed{48}"},
                {"role": "user", "content": verify}, {"role": "assistant", "content": "[VERIFY] wrong."},
                {"role": "user", "content": revise}, {"role": "assistant", "content": "\\boxed{42}"},
                {"role": "user", "content": verify}, {"role": "assistant", "content": "[VERIFY] correct."}]
    labels = {}
    for mode in (None, "prompted"):
        t = {"id": "t", "problem_id": "p", "question": "6 * 7?", "answer": "42", "messages": [dict(m) for m in messages],
             "correct": True}
        label_trajectories([t], scripted(judges_then_revises), sandbox, grader, AgentConfig(self_reward=mode), m=2)
        labels[mode] = [s["q"] for s in t["steps"]]
    # From the first step's prefix (48, then asked for a verdict): the completion says "wrong"; only in the
    # self-rewarding mode is it then asked to revise, and its final answer, 42, is right.
    assert labels["prompted"][:3] == [1.0, 1.0, 1.0]
    assert labels[None][:3] == [0.0, 1.0, 1.0]  # without it the first step's completions stop at "wrong"
