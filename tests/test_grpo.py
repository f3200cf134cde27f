"""train-grpo on the tiny model: the first step's loss against TRL's GRPOTrainer loss and against a float64
computation, observations masked; advantages, flat groups, the command line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mathagent import losses, objectives, training
from mathagent.records import LOGPROBS, PROMPT_IDS, TOKEN_IDS, format_observation
from mathagent.tokens import complete_ids
from mathagent.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTION = {"role": "user", "content": "What is 12+30?"}


def act(text):
    return {"role": "assistant", "content": text}


def obs(text):
    return {"role": "user", "content": format_observation(text)}


# (problem, reward, actions and observations): p1 and p2 have rewards that differ, p3's are equal (dropped)
SHAPES = [
    ("p1", 1.0, [act("```python\nprint(12 + 30)\n```"), obs("42"), act("So \\boxed{42}.")]),
    ("p1", -0.5, [act("```python\nprint(12 * 30)\n```"), obs("360"), act("So \\boxed{360}.")]),
    ("p1", -1.0, [act("I do not know.")]),
    ("p2", 1.0, [act("```python\nx = 12 + 30\n```"), obs(""), act("```python\nprint(x)\n```"), obs("42"),
                 act("\\boxed{42}")]),
    ("p2", -0.5, [act("\\boxed{41}")]),
    ("p2", -0.5, [act("```python\nprint(12 - 30)\n```"), obs("-18"), act("\\boxed{-18}")]),
    ("p3", 1.0, [act("\\boxed{42}")]),
    ("p3", 1.0, [act("So \\boxed{42}")]),
]


@pytest.fixture(scope="module")
def trajectories(tiny_model, tiny_tokenizer) -> list[dict]:
    """Rollout-shaped trajectories with ids and the recorded log-probs of a sampling policy near the one trained
    (its log-probs plus noise, so that ratios pass both clip edges); one action token has none."""
    rng = random.Random(0)
    out = []
    for k, (problem, reward, response) in enumerate(SHAPES):
        t = {"id": f"{problem}-{k}", "problem_id": problem, "reward": reward,
             "messages": [dict(QUESTION), *(dict(m) for m in response)]}
        complete_ids(tiny_tokenizer, t)
        ids = list(t[PROMPT_IDS])
        for m in t["messages"][1:]:
            if m["role"] == "assistant":
                true = per_token_logps(tiny_model, ids + m[TOKEN_IDS])[len(ids) - 1:]
                m[LOGPROBS] = [round(lp + rng.uniform(-0.6, 0.6), 6) for lp in true]
            ids += m[TOKEN_IDS]
        out.append(t)
    out[1]["messages"][1][LOGPROBS][2] = None
    return out


def layout(t: dict) -> tuple[list[int], list[int], list[float | None]]:
    """The trajectory's ids, action mask and recorded log-prob per position, straight from its fields."""
    ids, mask, recorded = list(t[PROMPT_IDS]), [0] * len(t[PROMPT_IDS]), [None] * len(t[PROMPT_IDS])
    for m in t["messages"][1:]:
        ids += m[TOKEN_IDS]
        action = m["role"] == "assistant"
        mask += [int(action)] * len(m[TOKEN_IDS])
        recorded += m[LOGPROBS] if action else [None] * len(m[TOKEN_IDS])
    return ids, mask, recorded


_MODELS: dict[tuple[str, torch.dtype], object] = {}


def per_token_logps(model_dir: str, ids: list[int], dtype=torch.float64) -> list[float]:
    """log pi(ids[t] | ids[<t]) for t >= 1 (index t - 1), by a forward pass in `dtype`."""
    from transformers import AutoModelForCausalLM

    if (model_dir, dtype) not in _MODELS:
        _MODELS[model_dir, dtype] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        logits = _MODELS[model_dir, dtype](torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def advantages(kept: list[dict], scale: bool) -> list[float]:
    out = []
    for t in kept:
        group = [u["reward"] for u in kept if u["problem_id"] == t["problem_id"]]
        mean = sum(group) / len(group)
        std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5
        out.append((t["reward"] - mean) / (std + 1e-4) if scale else t["reward"] - mean)
    return out


def first_step(tmp_path, model, records, **options) -> dict:
    config = TrainConfig(model=model, output_dir=str(tmp_path / "run"), max_steps=1, learning_rate=1e-3,
                         **options)
    training.train(config, objectives.GRPOObjective(config), records, log=lambda _: None)
    return json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])


KEPT = 6  # the trajectories of p1 and p2


@pytest.mark.parametrize(("loss_type", "scale", "kl_beta"), [("grpo", True, 0.0), ("dapo", True, 0.0),
                                                              ("dr-grpo", False, 0.0), ("dapo", True, 0.05)])
def test_the_first_step_loss_equals_a_float64_computation_with_observations_masked(
        tmp_path, tiny_model, trajectories, loss_type, scale, kl_beta, request):
    ref = request.getfixturevalue("ref_model") if kl_beta else None
    eps, eps_high, length = 0.2, 0.28, 40
    row = first_step(tmp_path, tiny_model, trajectories, batch_size=KEPT, loss=loss_type,
                     scale_rewards="group" if scale else "none", epsilon=eps, epsilon_high=eps_high,
                     kl_beta=kl_beta, ref_model=ref, max_completion_length=length)
    kept = trajectories[:KEPT]
    total, tokens, low, high = 0.0, 0, 0, 0
    per_sequence, diffs = [], []
    for t, a in zip(kept, advantages(kept, scale)):
        ids, mask, recorded = layout(t)
        logp = per_token_logps(tiny_model, ids)
        ref_logp = per_token_logps(ref, ids) if kl_beta else None
        terms = []
        for pos in range(1, len(ids)):
            if not mask[pos]:  # an observation's token, the prompt's: no term at all
                continue
            lp = logp[pos - 1]
            old = recorded[pos] if recorded[pos] is not None else lp
            if recorded[pos] is not None:
                diffs.append(abs(lp - old))
            ratio = torch.tensor(lp - old, dtype=torch.float64).exp().item()
            term = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps_high) * a)
            if kl_beta:
                d = ref_logp[pos - 1] - lp
                term += kl_beta * (torch.tensor(d, dtype=torch.float64).exp().item() - d - 1)
            low += ratio < 1 - eps and a < 0
            high += ratio > 1 + eps_high and a > 0
            terms.append(term)
        per_sequence.append(terms)
        tokens += len(terms)
    if loss_type == "grpo":
        total = sum(sum(terms) / len(terms) for terms in per_sequence) / KEPT
    elif loss_type == "dapo":
        total = sum(sum(terms) for terms in per_sequence) / tokens
    else:
        total = sum(sum(terms) for terms in per_sequence) / (KEPT * length)
    assert row["loss"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert row["clip_ratio/low"] == pytest.approx(low / tokens) and row["clip_ratio/high"] == pytest.approx(high / tokens)
    assert low > 0 and high > 0  # both clip edges are exercised
    assert row["advantage"] == pytest.approx(sum(advantages(kept, scale)) / KEPT, abs=1e-9)
    assert ("kl" in row) == bool(kl_beta)
    assert row["logprob_diff"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4)
    assert len(diffs) == tokens - 1  # the token without a recorded log-prob has ratio 1 and no difference


def trl_loss(loss_type: str, logps, old, advantages_, completion_mask, tool_mask, *, epsilon: float,
             epsilon_high: float, max_completion_length: int) -> float:
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs: the trainer's own loss code, run with the
    attributes it reads and its log-prob pass replaced by the values given (one process, no accumulation)."""
    from trl import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x.reshape(-1),
                                  reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
        loss_type=loss_type.replace("-", "_"), epsilon_low=epsilon, epsilon_high=epsilon_high,
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    b = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
              "tool_mask": tool_mask, "advantages": advantages_, "old_per_token_logps": old,
              "num_items_in_batch": (completion_mask * tool_mask).sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs).item()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr-grpo"])
def test_the_first_step_loss_equals_trls_grpo_loss(tmp_path, tiny_model, trajectories, loss_type):
    from trl.trainer.utils import nanstd

    eps, eps_high, length = 0.2, 0.28, 40
    row = first_step(tmp_path, tiny_model, trajectories, batch_size=KEPT, loss=loss_type, epsilon=eps,
                     epsilon_high=eps_high, max_completion_length=length)
    kept = trajectories[:KEPT]
    # TRL's completion: everything after the prompt; its tool_mask 0 on the observations' tokens
    rows = [layout(t) for t in kept]
    starts = [len(t[PROMPT_IDS]) for t in kept]
    width = max(len(ids) - s for (ids, _, _), s in zip(rows, starts))
    logps = torch.zeros(KEPT, width)
    old = torch.zeros(KEPT, width)
    completion_mask = torch.zeros(KEPT, width, dtype=torch.long)
    tool_mask = torch.zeros(KEPT, width, dtype=torch.long)
    for i, ((ids, mask, recorded), start) in enumerate(zip(rows, starts)):
        lp = per_token_logps(tiny_model, ids, torch.float32)
        for j, pos in enumerate(range(start, len(ids))):
            logps[i, j] = lp[pos - 1]
            old[i, j] = recorded[pos] if recorded[pos] is not None else lp[pos - 1]
            completion_mask[i, j] = 1
            tool_mask[i, j] = mask[pos]
    # TRL's advantages: (reward - group mean) / (group nanstd + 1e-4), groups in order
    rewards = {p: torch.tensor([t["reward"] for t in kept if t["problem_id"] == p]) for p in ("p1", "p2")}
    adv = torch.tensor([(t["reward"] - rewards[t["problem_id"]].mean().item())
                        / (nanstd(rewards[t["problem_id"]]).item() + 1e-4) for t in kept])
    want = trl_loss(loss_type, logps, old, adv, completion_mask, tool_mask, epsilon=eps, epsilon_high=eps_high,
                    max_completion_length=length)
    assert row["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_flat_groups_are_dropped_and_counted(tiny_model, tiny_tokenizer, trajectories):
    config = TrainConfig(model=tiny_model, output_dir="unused", loss="dapo")
    objective = objectives.GRPOObjective(config)
    objective.setup(tiny_tokenizer)
    examples, report = objective.encode_records(trajectories)
    assert [e.id for e in examples] == [t["id"] for t in trajectories[:KEPT]]
    assert report.flat_groups == 1 and report.from_ids == KEPT
    assert [e.advantage for e in examples] == pytest.approx(advantages(trajectories[:KEPT], True))
    with pytest.raises(objectives.UserError, match="no group has rewards that differ"):
        objective.encode_records(trajectories[KEPT:])


def test_group_advantages_by_hand():
    assert losses.group_advantages([1.0, -0.5, -1.0], scale=False) == pytest.approx([7 / 6, -1 / 3, -5 / 6])
    std = (((7 / 6) ** 2 + (1 / 3) ** 2 + (5 / 6) ** 2) / 2) ** 0.5
    assert losses.group_advantages([1.0, -0.5, -1.0], scale=True) == pytest.approx(
        [7 / 6 / (std + 1e-4), -1 / 3 / (std + 1e-4), -5 / 6 / (std + 1e-4)])


def test_train_grpo_command_trains_and_names_its_mistakes(tmp_path, tiny_model, trajectories):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in trajectories))
    cli = [sys.executable, "-m", "mathagent.cli", "train-grpo", str(data), "--model", tiny_model]
    ok = subprocess.run([*cli, "--output-dir", str(tmp_path / "out"), "--batch-size", "3", "--num-iterations", "2",
                         "--epsilon-high", "0.28"], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout)
    assert summary["steps"] == 4 and summary["encoding"]["flat_groups"] == 1  # 6 kept trajectories x 2 passes / 3
    assert "1 group(s) whose rewards are all equal" in ok.stderr
    bad = subprocess.run([*cli, "--output-dir", str(tmp_path / "bad"), "--loss-type", "ppo"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "--loss-type 'ppo': choose from grpo, dapo, dr-grpo" in bad.stderr
    no_reward = tmp_path / "n.jsonl"
    no_reward.write_text(json.dumps({k: v for k, v in trajectories[0].items() if k != "reward"}) + "\n")
    bad = subprocess.run([sys.executable, "-m", "mathagent.cli", "train-grpo", str(no_reward), "--model", tiny_model,
                          "--output-dir", str(tmp_path / "bad2")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and f"{no_reward}:1: field 'reward' must be a number" in bad.stderr
    assert not Path(tmp_path / "bad2").exists() or not any(Path(tmp_path / "bad2").iterdir())
