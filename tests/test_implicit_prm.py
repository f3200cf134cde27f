"""score-prm --implicit: PRIME's implicit process reward of a policy against its reference, per action."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mathagent import implicit_prm
from mathagent.records import PROMPT_IDS, TOKEN_IDS, format_observation
from mathagent.tokens import complete_ids

MATHAGENT = [sys.executable, "-m", "mathagent.cli"]

TRAJECTORY = {"id": "t", "problem_id": "p", "messages": [
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": "```python\nprint(12 + 30)\n```"},
    {"role": "user", "content": format_observation("42")},
    {"role": "assistant", "content": "So the answer is \\boxed{42}."},
]}


def float64_action_sums(model_dir: str, ids: list[int], spans: list[tuple[int, int]]) -> list[float]:
    """Per action span [a, b) of the ids: the summed log-probs of its tokens, by a float64 forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return [sum(logp[t - 1, ids[t]].item() for t in range(a, b)) for a, b in spans]


def test_each_step_scores_beta_times_its_actions_log_ratio(tmp_path, tiny_model, tiny_tokenizer, ref_model):
    beta = 0.5
    source = tmp_path / "t.jsonl"
    source.write_text(json.dumps(TRAJECTORY) + "\n")  # no ids: they are computed as rollout would
    out = subprocess.run([*MATHAGENT, "score-prm", str(source), "--implicit", "--model", tiny_model, "--ref-model",
                          ref_model, "--beta", str(beta), "--aggregate", "sum", "--field", "implicit"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (scored,) = [json.loads(line) for line in out.stdout.splitlines()]

    t = json.loads(json.dumps(TRAJECTORY))
    complete_ids(tiny_tokenizer, t)
    ids, spans = list(t[PROMPT_IDS]), []
    for m in t["messages"][1:]:
        if m["role"] == "assistant":
            spans.append((len(ids), len(ids) + len(m[TOKEN_IDS])))
        ids += m[TOKEN_IDS]
    mine, theirs = float64_action_sums(tiny_model, ids, spans), float64_action_sums(ref_model, ids, spans)
    want = [beta * (a - b) for a, b in zip(mine, theirs)]
    assert len(scored["step_scores"]) == 2
    assert scored["step_scores"] == pytest.approx(want, abs=1e-4)
    assert scored["implicit"] == pytest.approx(sum(want), abs=1e-4)
    assert abs(want[0]) > 1e-3 and abs(want[1]) > 1e-3  # the two models differ: the check is not of zeros


def test_the_same_policy_as_reference_scores_zero_and_aggregates_are_named(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    t = json.loads(json.dumps(TRAJECTORY))
    implicit_prm.score_trajectories(model, model, tiny_tokenizer, [t], beta=0.1, how="min", field="s")
    assert t["step_scores"] == [0.0, 0.0] and t["s"] == 0.0
    assert implicit_prm.aggregate([1.0, -2.0, 0.5], "mean") == pytest.approx(-0.5 / 3)
    assert implicit_prm.aggregate([1.0, -2.0, 0.5], "last") == 0.5
    with pytest.raises(implicit_prm.UserError, match="choose from min, mean, last, sum"):
        implicit_prm.aggregate([1.0], "prod")


@pytest.mark.parametrize(("args", "message"), [
    (["--implicit"], "--implicit needs --ref-model"),
    (["--implicit", "--ref-model", "REF", "--aggregate", "prod"], "--aggregate 'prod': choose from min, mean, last, sum"),
    (["--implicit", "--ref-model", "REF", "--steps", "paragraphs"], "--implicit scores turns"),
])
def test_implicit_mistakes_are_one_line(tmp_path, tiny_model, args, message):
    source = tmp_path / "t.jsonl"
    source.write_text(json.dumps(TRAJECTORY) + "\n")
    args = [a.replace("REF", tiny_model) for a in args]
    out = subprocess.run([*MATHAGENT, "score-prm", str(source), "--model", tiny_model, *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""
