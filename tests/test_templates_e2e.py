"""Token-in-token-out through the whole pipeline, for every real chat template (tests/families.py).

rollout -> make-pairs -> train-mdpo on a tiny model of each family, with the family's original chat template,
and the records checked against the spec:

- a trajectory has `prompt_ids`: the ids of its prompt (the messages before the first action) as the engine
  sees them, generation prompt included, i.e. `chat.prompt_ids` of the prompt;
- every message after the prompt has `token_ids`, and `prompt_ids` + the concatenated `token_ids` is exactly
  the sequence the policy saw and produced: a sampled action has `logprobs`, one per id, and they are the
  model's own log-probs of its ids given everything before them in that sequence (checked here against a
  float64 forward pass of that very sequence: a context that differs from what the engine saw gives other
  numbers);
- a pair carries the `prompt_ids` and the messages' `token_ids` of its trajectories;
- train-mdpo trains on those ids, the action messages' ids being the mask-1 tokens: its first step's
  `logps/chosen`, `logps/rejected` and `nll` equal a float64 computation on prompt_ids + token_ids.

Two trajectories come in for the one problem, with a given first action each (their reasoning in <think>,
which several templates drop or move when they render history): A's runs code, so rollout executes it and
samples the next action; B's answers. The problem itself gets a fresh sample too. None of this re-renders
history, so templates that rewrite it (Qwen3, DeepSeek-R1, GLM-4, Phi-3.5, ...) must pass as well.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from families import FAMILIES, build_family_model

from mathagent.prompts import PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBLEM = {"id": "p1", "question": "What is 2+3?", "answer": "5"}
ACTION_A = "<think>\nI add them.\n</think>\n\nLet me compute.\n```python\nprint(2 + 3)\n```"
ACTION_B = "<think>\n2 plus 3.\n</think>\n\nThe answer is $\\boxed{5}$."


def given(trajectory_id: str, action: str) -> dict:
    prompt = [{"role": "user", "content": PROMPTS["tool"].format(question=PROBLEM["question"])}]
    return {"id": trajectory_id, "problem_id": "p1", "question": PROBLEM["question"], "answer": PROBLEM["answer"],
            "messages": prompt + [{"role": "assistant", "content": action}]}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mathagent(*args: str) -> None:
    from typer.testing import CliRunner

    from mathagent.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"mathagent {args[0]}: exit {result.exit_code}\n{result.output[-3000:]}"


_F64: dict[str, object] = {}


def float64_token_logps(model_dir: str, ids: list[int]) -> list[float]:
    """log pi(ids[t] | ids[<t]) for t = 1..len-1, from a float64 forward pass of the whole sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    if model_dir not in _F64:
        _F64[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = _F64[model_dir](torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def sequence(prompt_ids: list[int], messages: list[dict]) -> tuple[list[int], list[int]]:
    """prompt_ids + every message's token_ids, and the mask: 1 exactly on the assistant messages' ids."""
    ids, mask = list(prompt_ids), [0] * len(prompt_ids)
    for m in messages:
        ids += m["token_ids"]
        mask += [int(m["role"] == "assistant")] * len(m["token_ids"])
    return ids, mask


def assert_token_in_token_out(trajectory: dict, given_count: int, tokenizer, model_dir: str) -> None:
    """The record's ids against the spec; `given_count`: how many of its messages came in with the input (the
    rest were sampled or observed by this rollout)."""
    from mathagent.chat import prompt_ids
    from mathagent.records import first_action

    name = trajectory["id"]
    messages = trajectory["messages"]
    start = first_action(messages)
    assert "prompt_ids" in trajectory, f"{name}: no prompt_ids"
    assert trajectory["prompt_ids"] == prompt_ids(tokenizer, messages[:start]), f"{name}: prompt_ids"
    for i, m in enumerate(messages[start:], start):
        assert isinstance(m.get("token_ids"), list) and m["token_ids"], f"{name}: message {i} has no token_ids"
        assert all(isinstance(t, int) for t in m["token_ids"]), f"{name}: message {i}"
    sampled = [i for i in range(max(start, given_count), len(messages)) if messages[i]["role"] == "assistant"]
    for i in sampled:
        m = messages[i]
        assert len(m.get("logprobs") or []) == len(m["token_ids"]), f"{name}: message {i}: logprobs"
        # the engine's log-probs are those of its ids in exactly this context
        context, _ = sequence(trajectory["prompt_ids"], messages[start:i])
        want = float64_token_logps(model_dir, context + m["token_ids"])[len(context) - 1:]
        assert m["logprobs"] == pytest.approx(want, abs=1e-3), f"{name}: message {i}: logprobs in context"


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_pairs_and_training_carry_the_engine_token_ids(family, tmp_path):
    from transformers import AutoTokenizer

    model = str(build_family_model(tmp_path / "model", family))
    tokenizer = AutoTokenizer.from_pretrained(model)
    # the problem (sampled from scratch) and the two trajectories that continue it
    rollout_in = write_jsonl(tmp_path / "rollout-in.jsonl", [PROBLEM, given("p1-a", ACTION_A), given("p1-b", ACTION_B)])

    mathagent("rollout", rollout_in, "-o", tmp_path / "trajectories.jsonl", "--model", model, "--backend", "hf",
              "--max-tokens", 16, "--max-turns", 2, "--temperature", 1.0, "--n", 1, "--seed", 0)
    trajectories = {t["id"]: t for t in read_jsonl(tmp_path / "trajectories.jsonl")}
    assert set(trajectories) == {"p1-0", "p1-a", "p1-b"}
    assert trajectories["p1-b"]["status"] == "answered" and trajectories["p1-b"]["correct"] is True
    assert trajectories["p1-a"]["messages"][2]["content"] == "```output\n5\n```"  # A's code ran
    for trajectory_id, given_count in (("p1-0", 1), ("p1-a", 2), ("p1-b", 2)):
        assert_token_in_token_out(trajectories[trajectory_id], given_count, tokenizer, model)

    # B is the one winner; max-min with k 1 makes exactly one pair, against the worse of the two losers
    mathagent("make-pairs", tmp_path / "trajectories.jsonl", "-o", tmp_path / "pairs.jsonl", "--keep-unfinished",
              "--strategy", "max-min", "--k", 1)
    [pair] = read_jsonl(tmp_path / "pairs.jsonl")
    assert pair["chosen_id"] == "p1-b"
    assert "prompt_ids" in pair, "the pair has no prompt_ids"
    for side in ("chosen", "rejected"):
        source = trajectories[pair[f"{side}_id"]]
        assert pair["prompt_ids"] == source["prompt_ids"]
        assert pair[side] == source["messages"][len(pair["prompt"]):], side  # token_ids and logprobs kept
        assert all("token_ids" in m for m in pair[side]), side

    mathagent("train-mdpo", tmp_path / "pairs.jsonl", "--model", model, "--output-dir", tmp_path / "mdpo",
              "--max-steps", 1, "--nll-weight", 1.0, "--batch-size", 1)
    row = read_jsonl(tmp_path / "mdpo" / "metrics.jsonl")[0]
    summed, actions = {}, {}
    for side in ("chosen", "rejected"):
        ids, mask = sequence(pair["prompt_ids"], pair[side])
        summed[side] = sum(lp for lp, m in zip(float64_token_logps(model, ids), mask[1:]) if m)
        actions[side] = sum(mask[1:])  # the action tokens that have a token before them (losses.nll_loss)
    assert row["logps/chosen"] == pytest.approx(summed["chosen"], rel=1e-4)
    assert row["logps/rejected"] == pytest.approx(summed["rejected"], rel=1e-4)
    assert row["nll"] == pytest.approx(-summed["chosen"] / actions["chosen"], rel=1e-4)
    # the step's M-DPO loss: -log sigmoid(beta * (log-ratio of chosen - of rejected)) + the NLL term, the
    # policy being its own reference before the first update (log-ratios 0)
    assert row["loss"] == pytest.approx(math.log(2) - summed["chosen"] / actions["chosen"], rel=1e-4)
