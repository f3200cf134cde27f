"""The process reward model: PRM chats, the hard and soft objectives, training, and one-pass scoring."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from mathagent import checkpoints, objectives, prm, training
from mathagent.chat import prompt_ids
from mathagent.errors import UserError
from mathagent.records import format_observation
from mathagent.train_config import TrainConfig

ERRORS = ("Traceback (most recent call last):\nZeroDivisionError: division by zero",
          "NameError: name 'total' is not defined", "TypeError: unsupported operand type(s) for /: 'str' and 'int'")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n, seed):
    """Labeled trajectories where a step is '-' exactly when its observation shows a Python error (soft labels
    near 0 then, near 1 otherwise); the final answer step is '+'."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        messages = [{"role": "user", "content": f"What is {a} * {b}?"}]
        steps = []
        for _ in range(rng.randint(1, 2)):
            x, y = rng.randint(2, 99), rng.randint(0, 9)
            bad = rng.random() < 0.5
            messages.append({"role": "assistant", "content": f"Compute.\n```python\nprint({x} / {y})\n```"})
            messages.append({"role": "user", "content": format_observation(
                rng.choice(ERRORS) if bad else str(round(x / max(y, 1), 3)))})
            q = rng.choice([0.0, 0.125]) if bad else rng.choice([0.625, 0.75, 0.875, 1.0])
            steps.append({"q": q, "label": "-" if bad else "+", "m": 8})
        messages.append({"role": "assistant", "content": f"The answer is \\boxed{{{a * b}}}."})
        steps.append({"q": 1.0, "label": "+", "m": 0})
        out.append({"id": f"s{seed}-{i}", "problem_id": f"p{i}", "messages": messages, "steps": steps})
    return out


TRAJECTORY = {
    "id": "t", "problem_id": "p", "answer": "42", "correct": True,
    "messages": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "Compute.\n```python\nprint(6 * 7)\n```"},
        {"role": "user", "content": "```output\n42\n```"},
        {"role": "assistant", "content": "So \\boxed{42}."},
    ],
    "steps": [{"q": 0.75, "label": "+", "m": 4}, {"q": 1.0, "label": "+", "m": 0}],
}


def test_a_prm_example_is_a_chat_of_steps_and_labels_with_the_soft_labels_beside_it():
    example = prm.prm_example(TRAJECTORY)
    assert example["messages"] == [
        {"role": "user", "content": "What is 6 * 7?\n\nCompute.\n```python\nprint(6 * 7)\n```\n\n```output\n42\n```"},
        {"role": "assistant", "content": "+"},
        {"role": "user", "content": "So \\boxed{42}."},
        {"role": "assistant", "content": "+"},
    ]
    assert example["labels"] == ["+", "+"] and example["q"] == [0.75, 1.0]
    assert example["answer"] == "42" and "steps" not in example


def test_the_hard_loss_is_cross_entropy_on_the_label_token_over_the_vocabulary():
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0], [1.0, -0.5, 0.25, 3.0]], dtype=torch.float64)
    loss = prm.prm_loss(logits, torch.tensor([True, False]), torch.tensor([0.9, 0.1]), 1, 2, "hard")
    assert loss.shape == (2,)  # one loss per label: the recipe averages them over a step's labels
    loss = loss.mean()
    lse0 = math.log(math.exp(0.5) + math.exp(2.0) + math.exp(-1.0) + 1.0)
    lse1 = math.log(math.exp(1.0) + math.exp(-0.5) + math.exp(0.25) + math.exp(3.0))
    assert loss.item() == pytest.approx(((lse0 - 2.0) + (lse1 - 0.25)) / 2, abs=1e-6)


def test_the_soft_loss_is_binary_cross_entropy_of_p_plus_among_the_two_labels_against_q_hat():
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0], [1.0, -0.5, 0.25, 3.0]], dtype=torch.float64)
    loss = prm.prm_loss(logits, torch.tensor([True, False]), torch.tensor([0.9, 0.1]), 1, 2, "soft").mean()
    p0 = math.exp(2.0) / (math.exp(2.0) + math.exp(-1.0))  # the other logits play no part
    p1 = math.exp(-0.5) / (math.exp(-0.5) + math.exp(0.25))
    bce = lambda p, q: -(q * math.log(p) + (1 - q) * math.log(1 - p))  # noqa: E731
    assert loss.item() == pytest.approx((bce(p0, 0.9) + bce(p1, 0.1)) / 2, abs=1e-6)
    assert prm.plus_probability(logits, 1, 2).tolist() == pytest.approx([p0, p1], abs=1e-12)


def test_aggregates_of_step_scores():
    scores = [0.9, 0.5, 0.8]
    assert prm.aggregate(scores, "min") == 0.5
    assert prm.aggregate(scores, "mean") == pytest.approx(2.2 / 3)
    assert prm.aggregate(scores, "last") == 0.8
    assert prm.aggregate(scores, "prod") == pytest.approx(0.36)
    assert prm.aggregate([], "min") is None


def random_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return LlamaForCausalLM(config).eval()


def per_prefix_scores(model, tokenizer, chat):
    """The reference scorer: each step's prompt rendered and encoded alone, one forward pass per prefix."""
    plus_id, minus_id = prm.label_token_ids(tokenizer)
    scores = []
    for i, m in enumerate(chat):
        if m["role"] == "assistant":
            with torch.no_grad():
                z = model(torch.tensor([prompt_ids(tokenizer, chat[:i])])).logits[0, -1].double()
            scores.append(torch.sigmoid(z[plus_id] - z[minus_id]).item())
    return scores


@pytest.mark.parametrize("template", ["chatml", "mistral"])
def test_one_pass_scores_equal_per_prefix_scores(template, request):
    tokenizer = request.getfixturevalue("tiny_tokenizer" if template == "chatml" else "mistral_tokenizer")
    model = random_llama(len(tokenizer))
    trajectories = synthetic(5, seed=3) + [{k: v for k, v in TRAJECTORY.items() if k != "steps"}]
    report = prm.score_trajectories(model, tokenizer, trajectories, how="min", batch_size=4)
    assert report.forward_passes == 2 and report.per_prefix == 0  # 6 trajectories in batches of 4
    for t in trajectories:
        reference = per_prefix_scores(model, tokenizer, prm.step_chat(t["messages"]))
        assert len(t["step_scores"]) == len(reference) == len(prm.step_chat(t["messages"])) // 2
        assert t["step_scores"] == pytest.approx(reference, abs=1e-5)
        assert t["score"] == min(t["step_scores"])
    assert len({round(s, 6) for t in trajectories for s in t["step_scores"]}) > 5  # not one constant


def prm_config(tiny_model, output_dir, **options) -> TrainConfig:
    """train-prm's defaults (a constant learning rate after the warm-up) for `training.train`."""
    options = {"learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup", **options}
    return TrainConfig(model=tiny_model, output_dir=str(output_dir), **options)


def train_prm(config: TrainConfig, records, **kwargs) -> dict:
    """`training.train` with the PRM's objective, as train-prm runs it."""
    return training.train(config, objectives.PRMObjective(config), records, **kwargs)


def metrics_rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_train_prm_learns_that_a_step_whose_observation_is_an_error_is_minus(labels, tiny_model, tmp_path):
    config = prm_config(tiny_model, tmp_path / "prm", labels=labels, learning_rate=2e-3, batch_size=16, max_steps=40)
    summary = train_prm(config, synthetic(160, seed=0), log=lambda _: None)
    assert summary["steps"] == 40 and summary["examples"] == 160
    model, tokenizer = prm.load_prm(str(tmp_path / "prm"))
    held_out = [prm.training_chat(t, "turns")[:2] for t in synthetic(60, seed=1)]
    assert prm.label_accuracy(model, tokenizer, held_out) > 0.95
    written = json.loads((tmp_path / "prm" / prm.PRM_FILE).read_text())
    assert written["labels"] == labels and written["trained_steps"] == 40
    assert prm.trained_steps_mode(str(tmp_path / "prm")) == "turns" == prm.trained_steps_mode(str(tmp_path))


def float64_step_loss(model_dir, tokenizer, records, kind) -> float:
    """The PRM loss of one step over `records`, independently: one float64 forward per chat, the logits read
    at the position before each label token, averaged over all the labels."""
    from transformers import AutoModelForCausalLM

    from mathagent.chat import tokenize_conversation

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    plus_id, minus_id = prm.label_token_ids(tokenizer)
    terms = []
    for record in records:
        chat, labels, q = prm.training_chat(record, "turns")
        ids = tokenize_conversation(tokenizer, chat).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        at = [t - 1 for t in range(1, len(ids)) if ids[t] in (plus_id, minus_id)]
        assert len(at) == len(labels)
        for t, label, target in zip(at, labels, q, strict=True):
            if kind == "hard":
                terms.append(-logp[t, plus_id if label == "+" else minus_id].item())
            else:
                d = (logp[t, plus_id] - logp[t, minus_id]).item()
                terms.append(-(target * math.log(1 / (1 + math.exp(-d))) + (1 - target) * math.log(1 / (1 + math.exp(d)))))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_a_prm_step_loss_is_the_mean_over_its_labels_however_it_is_split(labels, tiny_model, tiny_tokenizer, tmp_path):
    """Chats with different numbers of labels in 4 micro-batches: the step's loss is still the mean over all
    its labels (float64 reference), not a mean of micro-batch means."""
    records = synthetic(8, seed=6)
    assert len({len(r["steps"]) for r in records}) > 1
    config = prm_config(tiny_model, tmp_path / "prm", labels=labels, batch_size=8, grad_accum=4, max_steps=1)
    train_prm(config, records, log=lambda _: None)
    assert metrics_rows(tmp_path / "prm")[0]["loss"] == pytest.approx(
        float64_step_loss(tiny_model, tiny_tokenizer, records, labels), abs=1e-5)


# The loss curves of train-prm before it ran through training.train (its own loop in prm.py, at commit 9e97ac9):
# synthetic(16, seed=0), batch size 16, lr 1e-3, constant, 5 steps, the tiny model. A full batch makes them
# independent of the data order, which the one recipe changed (its seeded order, whole batches per epoch).
BEFORE_ONE_RECIPE = {
    "hard": [6.7254958152771, 5.476770401000977, 4.855476379394531, 4.577149868011475, 4.369461536407471],
    "soft": [0.7249978184700012, 0.8050041198730469, 0.6036884784698486, 0.7202739715576172, 0.5871648192405701],
}


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_a_prm_trained_by_the_one_recipe_follows_the_loss_curve_of_the_former_prm_loop(labels, tiny_model, tmp_path):
    config = prm_config(tiny_model, tmp_path / "prm", labels=labels, batch_size=16, max_steps=5)
    train_prm(config, synthetic(16, seed=0), log=lambda _: None)
    assert [r["loss"] for r in metrics_rows(tmp_path / "prm")] == pytest.approx(BEFORE_ONE_RECIPE[labels], abs=1e-4)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_model, tmp_path):
    data = synthetic(24, seed=2)
    options = {"batch_size": 8, "max_steps": 4, "save_every": 1, "lora": True, "lora_rank": 4, "seed": 1}
    train_prm(prm_config(tiny_model, tmp_path / "whole", **options), data, log=lambda _: None)

    class Killed(Exception):
        pass

    def kill_at_step_3(row):
        if row["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train_prm(prm_config(tiny_model, tmp_path / "cut", **options), data, on_step=kill_at_step_3,
                       log=lambda _: None)
    assert [p.name for p in checkpoints.checkpoints(tmp_path / "cut")] == ["step-00000001", "step-00000002"]
    summary = train_prm(prm_config(tiny_model, tmp_path / "cut", resume=True, **options), data,
                             log=lambda _: None)
    assert summary["resumed_from_step"] == 2 and summary["saved"] == "adapter"
    # The killed run's row of step 3 was written again, not twice.
    assert [r["step"] for r in metrics_rows(tmp_path / "cut")] == [1, 2, 3, 4]
    for a, b in zip(metrics_rows(tmp_path / "whole"), metrics_rows(tmp_path / "cut"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    messages = []
    again = train_prm(prm_config(tiny_model, tmp_path / "cut", resume=True, **options), data, log=messages.append)
    assert again == summary and any("nothing to do" in m for m in messages)  # a finished PRM is not trained again
    with pytest.raises(UserError, match="labels='hard', this run has 'soft'"):  # a checkpoint of other labels
        train_prm(prm_config(tiny_model, tmp_path / "whole", resume=True, labels="soft", **options), data,
                       log=lambda _: None)
    whole, _ = prm.load_prm(str(tmp_path / "whole"))
    cut, _ = prm.load_prm(str(tmp_path / "cut"))
    for (name, a), (_, b) in zip(whole.named_parameters(), cut.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_prm_writes_a_metrics_row_per_step_and_reports_the_same_to_tensorboard(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mathagent.metrics_log import TENSORBOARD_DIR

    config = prm_config(tiny_model, tmp_path / "prm", batch_size=4, max_steps=3, warmup_steps=2,
                        report_to="tensorboard")
    summary = train_prm(config, synthetic(8, seed=3), log=lambda _: None)
    rows = metrics_rows(tmp_path / "prm")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1] == summary["final"]
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.0, 5e-4, 1e-3])  # transformers' warm-up
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "tokens", "tokens_per_second"} == set(rows[0]) - {"step"}
    events = EventAccumulator(str(tmp_path / "prm" / TENSORBOARD_DIR))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for tag in events.Tags()["scalars"]:
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([r[tag] for r in rows], rel=1e-6)


def mathagent(args, stdin=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    proc = subprocess.run([sys.executable, "-m", "mathagent.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_prm_then_score_prm_then_best_of_n(tiny_model, tmp_path):
    """A merged LoRA PRM loads with transformers alone; score-prm writes step_scores and score, in order."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(prm.prm_example(t)) + "\n" for t in synthetic(8, seed=4)))
    out = tmp_path / "prm"
    summary = json.loads(mathagent(["train-prm", str(train), "--model", tiny_model, "--output-dir", str(out),
                                    "--labels", "soft", "--lora", "--lora-rank", "4", "--merge-lora", "--max-steps", "2", "--batch-size", "4",
                                    "--eval", str(train)]).stdout)
    assert summary["steps"] == 2 and summary["saved"] == "merged" and 0 <= summary["eval_accuracy"] <= 1
    assert summary["eval_labels"] == sum(len(t["steps"]) for t in synthetic(8, seed=4))
    assert not (out / "adapter_config.json").exists() and (out / "prm.json").exists()

    trajectories = [{**t, "problem_id": "p", "answer": "1"} for t in synthetic(4, seed=5)]
    for t in trajectories:
        t.pop("steps")
    stdin = "".join(json.dumps(t) + "\n" for t in trajectories)
    scored = [json.loads(line) for line in mathagent(["score-prm", "--model", str(out), "--aggregate", "mean"], stdin).stdout.splitlines()]
    assert [t["id"] for t in scored] == [t["id"] for t in trajectories]
    for t in scored:
        assert len(t["step_scores"]) == len(prm.step_chat(t["messages"])) // 2
        assert t["score"] == pytest.approx(sum(t["step_scores"]) / len(t["step_scores"]))
    report = json.loads(mathagent(["evaluate", "--score-field", "score"], "".join(json.dumps(t) + "\n" for t in scored)).stdout)
    assert report["best_of_n"]["problems"] == 1


@pytest.mark.slow
def test_two_ddp_processes_under_torchrun_train_a_prm_to_identical_weights_with_the_one_process_losses(tiny_model,
                                                                                                      tmp_path):
    """train-prm under torchrun: 2 processes x 1 micro-batch of 2 chats per step (their label counts differ) take
    the steps of one process with 2 micro-batches. The chats of a micro-batch group into 1 or 2 forward passes,
    differently on the two processes (`batches.forward_groups` makes the counts agree, or the run hangs)."""
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in synthetic(16, seed=7)))
    options = {"labels": "soft", "batch_size": 4, "max_steps": 4, "seed": 3, "save_every": 2}
    one = tmp_path / "one"
    train_prm(prm_config(tiny_model, one, grad_accum=2, **options), synthetic(16, seed=7), log=lambda _: None)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mathagent.cli",
         "train-prm", str(data), "--model", tiny_model, "--output-dir", str(out), "--labels", "soft", "--lr", "1e-3",
         "--batch-size", "4", "--max-steps", "4", "--seed", "3", "--save-every", "2"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    assert len(summary["weights_sha256"]) == 2 and summary["processes_agree"]
    assert [p.name for p in checkpoints.checkpoints(out)] == ["step-00000002"]  # the layout of every training command
    assert json.loads((out / prm.PRM_FILE).read_text())["labels"] == "soft"
    for a, b in zip(metrics_rows(one), metrics_rows(out), strict=True):
        assert b["step"] == a["step"] and b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_every_aggregate_is_documented_with_the_prm_that_uses_it_and_the_default_is_the_commands():
    import inspect
    import re
    from pathlib import Path

    from mathagent import cli

    doc = (Path(__file__).resolve().parent.parent / "docs" / "prm.md").read_text()
    table = doc[doc.index("### Aggregation") :]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)`[^|]*\|[^|]*\| (.+) \|$", table, re.MULTILINE)}
    assert set(rows) == set(prm.AGGREGATES)
    assert "Math-Shepherd" in rows["min"] and "RLHFlow" in rows["mean"] and "PRM800K" in rows["prod"]
    assert f"`{prm.DEFAULT_AGGREGATE}` (default)" in table
    assert inspect.signature(cli.score_prm).parameters["aggregate"].default == prm.DEFAULT_AGGREGATE
    assert prm.aggregate([0.9, 0.2, 0.8]) == 0.2
