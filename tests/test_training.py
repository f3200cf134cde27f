"""M-DPO / M-KTO / SFT training on the tiny model: exact losses, masked observations, learning, resume, DDP and
FSDP, --report-to."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mathagent import batches, checkpoints, losses, metrics_log, objectives, training
from mathagent.chat import tokenize_conversation
from mathagent.errors import UserError
from mathagent.records import format_observation
from mathagent.train_config import TrainConfig

MATHAGENT = [sys.executable, "-m", "mathagent.cli"]
# One thread per process: results that must agree bit for bit (resume) come from the same kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def act(text):
    return {"role": "assistant", "content": text}


def obs(text):
    return {"role": "user", "content": format_observation(text)}


HAND_PAIRS = [
    {"id": "a", "problem_id": "p1", "prompt": [{"role": "user", "content": "What is 2+3?"}],
     "chosen": [act("```python\nprint(2 + 3)\n```"), obs("5"), act("So \\boxed{5}.")],
     "rejected": [act("```python\nprint(2 * 3)\n```"), obs("6"), act("So \\boxed{6}.")]},
    {"id": "b", "problem_id": "p2",
     "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 7-4."}],
     "chosen": [act("```python\nprint(7 - 4)\n```"), obs("3"), act("\\boxed{3}")],
     "rejected": [act("I guess \\boxed{2}")]},
]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference set: the chosen trajectory answers with the observed number, the rejected one
    gives up."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        code = act(f"```python\nprint({a}+{b})\n```")
        out.append({"id": str(i), "problem_id": str(i), "prompt": [{"role": "user", "content": f"{a}+{b}?"}],
                    "chosen": [code, obs(str(a + b)), act(f"\\boxed{{{a + b}}}")],
                    "rejected": [code, obs(str(a + b)), act("No idea.")]})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def encoded(objective, tokenizer, records):
    """The objective's examples of `records` and its encoding report, as the recipe makes them."""
    objective.setup(tokenizer)
    return objective.encode_records(records)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


_F64: dict[str, object] = {}


def float64_logps(model_dir, tokenizer, messages, *, mask_observations=True) -> float:
    """Summed action log-probs, independently: a float64 forward and a plain loop over the mask."""
    from transformers import AutoModelForCausalLM

    if model_dir not in _F64:
        _F64[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    conv = tokenize_conversation(tokenizer, messages, mask_observations=mask_observations)
    with torch.no_grad():
        logits = _F64[model_dir](torch.tensor([conv.input_ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return sum(logp[t - 1, conv.input_ids[t]].item() for t in range(1, len(conv.input_ids)) if conv.action_mask[t])


def run_one_step(tmp_path, tiny_model, records, **options) -> dict:
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "run"), batch_size=len(records),
                                  max_steps=1, learning_rate=1e-3, **options)
    training.train(config, objectives.PairObjective(config), records, log=lambda _: None)
    return metrics(config.output_dir)[0]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("mask_observations,label_smoothing,nll_weight", [(True, 0.0, 0.0), (False, 0.0, 0.0),
                                                                          (True, 0.1, 0.5), (False, 0.0, 0.5)])
def test_the_loss_equals_a_float64_computation_from_per_token_log_probs(tmp_path, tiny_model, tiny_tokenizer,
                                                                         ref_model, mask_observations,
                                                                         label_smoothing, nll_weight):
    beta, eps = 0.1, label_smoothing
    row = run_one_step(tmp_path, tiny_model, HAND_PAIRS, ref_model=ref_model, beta=beta,
                       mask_observations=mask_observations, label_smoothing=eps, nll_weight=nll_weight)
    want_losses, chosen, rejected = [], [], []
    nll, nll_tokens = 0.0, 0
    for pair in HAND_PAIRS:
        lp = {side: float64_logps(tiny_model, tiny_tokenizer, pair["prompt"] + pair[side],
                                  mask_observations=mask_observations) for side in ("chosen", "rejected")}
        ref = {side: float64_logps(ref_model, tiny_tokenizer, pair["prompt"] + pair[side],
                                   mask_observations=mask_observations) for side in ("chosen", "rejected")}
        h = (lp["chosen"] - ref["chosen"]) - (lp["rejected"] - ref["rejected"])
        want_losses.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
        chosen.append(beta * (lp["chosen"] - ref["chosen"]))
        rejected.append(beta * (lp["rejected"] - ref["rejected"]))
        # the NLL term is on the chosen actions alone in both arms, observations masked or not
        nll -= float64_logps(tiny_model, tiny_tokenizer, pair["prompt"] + pair["chosen"])
        nll_tokens += sum(tokenize_conversation(tiny_tokenizer, pair["prompt"] + pair["chosen"]).action_mask[1:])
    assert row["loss"] == pytest.approx(sum(want_losses) / 2 + nll_weight * nll / nll_tokens, abs=1e-5)
    assert row["rewards/chosen"] == pytest.approx(sum(chosen) / 2, abs=1e-5)
    assert row["rewards/rejected"] == pytest.approx(sum(rejected) / 2, abs=1e-5)
    assert row["rewards/margins"] == pytest.approx((sum(chosen) - sum(rejected)) / 2, abs=1e-5)
    assert row["rewards/accuracies"] == sum(c > r for c, r in zip(chosen, rejected)) / 2
    assert abs(row["rewards/margins"]) > 1e-3  # the reference differs: the check is not of zeros


def test_observation_tokens_get_no_gradient(tiny_model, tiny_tokenizer):
    """d loss / d logits is exactly 0 at every position whose next token is not an action: the loss cannot
    depend on how the model predicts an observation (or the prompt, or the template's scaffolding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = TrainConfig(model=tiny_model, output_dir="unused")
    examples, _ = encoded(objectives.PairObjective(config), tiny_tokenizer, HAND_PAIRS)
    seqs = [e.sequences[0] for e in examples] + [e.sequences[1] for e in examples]
    batch = batches.collate(seqs, tiny_tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    logps, _ = losses.action_logps(logits, batch["input_ids"], batch["action_mask"])
    ref = logps.detach() + torch.randn(4)
    losses.pair_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1).mean().backward()
    observation_positions = 0
    for row, seq in enumerate(seqs):
        conv = tokenize_conversation(tiny_tokenizer, HAND_PAIRS[row % 2]["prompt"]
                                     + HAND_PAIRS[row % 2]["chosen" if row < 2 else "rejected"])
        assert conv.input_ids == seq.input_ids
        for span in conv.spans:
            if span.role == "user" and span.index >= len(HAND_PAIRS[row % 2]["prompt"]):
                for t in range(span.start, span.end):  # the logits at t - 1 predict observation token t
                    assert torch.equal(logits.grad[row, t - 1], torch.zeros_like(logits.grad[row, t - 1]))
                    observation_positions += 1
        for t in range(logits.shape[1] - 1):
            predicts_action = t + 1 < len(seq.input_ids) and seq.action_mask[t + 1]
            assert (logits.grad[row, t].abs().sum() > 0) == bool(predicts_action)
    assert observation_positions > 10


def test_without_observation_masking_the_loss_changes_by_exactly_the_observation_terms(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    if tiny_model not in _F64:
        _F64[tiny_model] = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    for pair in HAND_PAIRS:
        messages = pair["prompt"] + pair["chosen"]
        masked = tokenize_conversation(tiny_tokenizer, messages)
        unmasked = tokenize_conversation(tiny_tokenizer, messages, mask_observations=False)
        with torch.no_grad():
            logp = torch.log_softmax(_F64[tiny_model](torch.tensor([masked.input_ids])).logits[0], -1)
        extra = [t for t in range(1, len(masked.input_ids)) if unmasked.action_mask[t] and not masked.action_mask[t]]
        # the extra terms are the observations and the later turns' scaffolding, nothing of the prompt
        first_action = next(s.action_start for s in masked.spans if s.action_start is not None)
        assert min(extra) > first_action
        assert pair["chosen"][1]["content"] in tiny_tokenizer.decode([masked.input_ids[t] for t in extra])
        terms = sum(logp[t - 1, masked.input_ids[t]].item() for t in extra)
        assert float64_logps(tiny_model, tiny_tokenizer, messages, mask_observations=False) == pytest.approx(
            float64_logps(tiny_model, tiny_tokenizer, messages) + terms, abs=1e-9)


def test_fifty_steps_on_a_learnable_preference_set_reach_high_reward_accuracy(tmp_path, tiny_model):
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "run"), batch_size=2, max_steps=50,
                                  learning_rate=2e-3, beta=0.1, seed=0)
    summary = training.train(config, objectives.PairObjective(config), toy_pairs(12), log=lambda _: None)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 51))
    late = rows[-10:]
    assert sum(r["rewards/accuracies"] for r in late) / len(late) > 0.9
    assert abs(rows[0]["rewards/chosen"]) < 1e-3  # policy = reference at step 1
    assert sum(r["rewards/chosen"] for r in late) / len(late) > 0.05  # the chosen log-ratio went up
    assert late[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert summary["saved"] == "model" and (tmp_path / "run" / "model.safetensors").exists()


def test_kto_trains_on_labelled_completions_and_needs_two_per_micro_batch(tmp_path, tiny_model):
    records = []
    for pair in toy_pairs(4):
        records.append({"id": pair["id"] + "+", "prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        records.append({"id": pair["id"] + "-", "prompt": pair["prompt"], "completion": pair["rejected"],
                        "label": False})
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "kto"), loss="kto",
                                  batch_size=4, max_steps=3, learning_rate=1e-3)
    training.train(config, objectives.KTOObjective(config), records, log=lambda _: None)
    rows = metrics(tmp_path / "kto")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0) at policy = reference
    one = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "kto1"), loss="kto",
                               batch_size=4, grad_accum=4, max_steps=1)
    with pytest.raises(UserError, match="at least 2 examples per micro-batch"):
        training.train(one, objectives.KTOObjective(one), records, log=lambda _: None)


def test_sft_loss_is_the_mean_nll_of_the_action_tokens(tmp_path, tiny_model, tiny_tokenizer):
    trajectories = [{"id": p["id"], "messages": p["prompt"] + p["chosen"]} for p in HAND_PAIRS]
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "sft"),
                                  batch_size=2, max_steps=1, learning_rate=1e-3)
    training.train(config, objectives.SFTObjective(config), trajectories, log=lambda _: None)
    total, tokens = 0.0, 0
    for t in trajectories:
        total -= float64_logps(tiny_model, tiny_tokenizer, t["messages"])
        tokens += sum(tokenize_conversation(tiny_tokenizer, t["messages"]).action_mask[1:])
    assert metrics(tmp_path / "sft")[0]["loss"] == pytest.approx(total / tokens, abs=1e-5)


def test_train_sft_command_trains_on_trajectories_and_a_finished_run_resumes_to_nothing(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from mathagent.cli import app

    trajectories = [{"id": p["id"], "messages": p["prompt"] + p["chosen"], "status": "answered"} for p in toy_pairs(4)]
    path = write_jsonl(tmp_path / "sft.jsonl", trajectories)
    args = ["train-sft", str(path), "--model", tiny_model, "--output-dir", str(tmp_path / "sft"), "--batch-size", "2",
            "--max-steps", "3", "--learning-rate", "1e-3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = metrics(tmp_path / "sft")
    assert [r["step"] for r in rows] == [1, 2, 3] and "step 3  loss" in result.output
    again = CliRunner().invoke(app, args + ["--resume"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert metrics(tmp_path / "sft") == rows


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `log_dir`, read back as TensorBoard reads them: tag -> (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_writes_the_rows_of_metrics_jsonl_and_a_resume_writes_no_step_twice(tmp_path,
                                                                                                   tiny_model):
    from typer.testing import CliRunner

    from mathagent.cli import app

    out = tmp_path / "run"
    path = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8))
    args = ["train-mdpo", str(path), "--model", tiny_model, "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "4", "--save-every", "2", "--learning-rate", "1e-3", "--report-to", "tensorboard"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # As if killed after step 4's rows were written: --resume goes back to the checkpoint of step 2.
    (out / "training_summary.json").unlink()
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0 and "(step 2)" in result.output, result.output
    assert len(list((out / metrics_log.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars = tensorboard_scalars(out / metrics_log.TENSORBOARD_DIR)
    assert set(scalars) == {name for r in rows for name, v in r.items() if name != "step" and v is not None}
    assert {"loss", "rewards/chosen", "rewards/margins", "grad_norm", "learning_rate"} <= set(scalars)
    for name, events in scalars.items():
        assert [step for step, _ in events] == [1, 2, 3, 4], name
        for (step, value), row in zip(events, rows, strict=True):
            assert value == pytest.approx(row[name], rel=1e-6, abs=1e-12), (name, step)  # stored as float32


def test_lora_saves_an_adapter_or_the_merged_model(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for merge in (False, True):
        config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / f"lora{merge}"), batch_size=4,
                                      max_steps=2, learning_rate=1e-2, lora=True, lora_rank=4, lora_alpha=8,
                                      merge_lora=merge)
        assert training.train(config, objectives.PairObjective(config), toy_pairs(4), log=lambda _: None)["saved"] == ("merged" if merge else "adapter")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "loraFalse"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "loraTrue"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)


def test_an_adapter_policy_goes_on_training_as_the_same_adapter_of_the_same_base(tmp_path, tiny_model):
    """The loop's next iteration from an iteration trained with --lora: the adapter directory is the policy, it
    stays an adapter of the first base model, and its reference at step 1 is itself (log-ratios 0)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "iter1"), batch_size=4, max_steps=2,
                        learning_rate=1e-2, lora=True, lora_rank=4, lora_alpha=8)
    training.train(first, objectives.PairObjective(first), toy_pairs(4), log=lambda _: None)
    second = TrainConfig(model=str(tmp_path / "iter1"), output_dir=str(tmp_path / "iter2"), batch_size=4,
                         max_steps=2, learning_rate=1e-2, lora=True, lora_rank=4, lora_alpha=8)
    summary = training.train(second, objectives.PairObjective(second), toy_pairs(4), log=lambda _: None)
    assert summary["saved"] == "adapter"
    config = json.loads((tmp_path / "iter2" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model
    assert metrics(tmp_path / "iter2")[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    with torch.no_grad():
        one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "iter1"))(ids)
        two = PeftModel.from_pretrained(base, str(tmp_path / "iter2"))(ids)
    assert not torch.allclose(one.logits, two.logits, atol=1e-5)  # trained on from iter1's weights
    # without --lora the adapter policy is merged and trained in full
    full = TrainConfig(model=str(tmp_path / "iter1"), output_dir=str(tmp_path / "full"), batch_size=4, max_steps=1,
                       learning_rate=1e-2)
    assert training.train(full, objectives.PairObjective(full), toy_pairs(4), log=lambda _: None)["saved"] == "model"
    # and rollout samples the adapter policy on its base (`--model iterK/model`, as the loop passes it)
    from mathagent.stages import EngineOptions

    with EngineOptions(model=str(tmp_path / "iter2"), backend="hf").open() as engine:
        assert isinstance(engine.model, PeftModel)


def test_a_second_run_into_the_same_directory_needs_resume(tmp_path, tiny_model):
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "run"), batch_size=2, max_steps=1)
    training.train(config, objectives.PairObjective(config), HAND_PAIRS, log=lambda _: None)
    with pytest.raises(UserError, match="pass resume to continue"):
        training.train(config, objectives.PairObjective(config), HAND_PAIRS, log=lambda _: None)
    odd = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "odd"), batch_size=3, grad_accum=2)
    with pytest.raises(UserError, match="multiple of grad_accum"):
        training.train(odd, objectives.PairObjective(odd), HAND_PAIRS * 2, log=lambda _: None)


def test_a_bad_pair_record_is_a_file_line_error_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from mathagent.cli import app

    bad = {"id": "x", "prompt": [], "chosen": [], "rejected": []}
    path = write_jsonl(tmp_path / "pairs.jsonl", [HAND_PAIRS[0], bad])
    result = CliRunner().invoke(app, ["train-mdpo", str(path), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"error: {path}:2: field 'prompt' must be a non-empty list of messages" in result.output


# ---- subprocesses: kill and resume, torchrun ----------------------------------------------------------------

RUN = {"batch_size": 2, "max_steps": 16, "save_every": 4, "learning_rate": 1e-3, "seed": 3}
RUN_ARGS = ["--batch-size", "2", "--max-steps", "16", "--save-every", "4", "--learning-rate", "1e-3", "--seed", "3"]


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", toy_pairs(16, seed=1))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory) -> Path:
    """One process, 2 micro-batches of 1 pair per step (the decomposition of the DDP run too), in-process."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    config = TrainConfig(model=tiny_model, output_dir=str(out), grad_accum=2, **RUN)
    assert training.train(config, objectives.PairObjective(config), toy_pairs(16, seed=1), log=lambda _: None)["steps"] == 16
    return out


def test_a_killed_training_resumes_from_its_last_checkpoint_with_the_same_losses(tiny_model, toy_file, tmp_path,
                                                                                 uninterrupted):
    out = tmp_path / "killed"
    args = MATHAGENT + ["train-mdpo", str(toy_file), "--model", tiny_model, "--output-dir", str(out),
                        "--grad-accum", "2", *RUN_ARGS]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while not checkpoints.checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert still_running, "the run ended before it could be killed after a checkpoint"
    killed_at = int(checkpoints.checkpoints(out)[-1].name.split("-")[1])
    assert 4 <= killed_at < 16
    messages = []
    config = TrainConfig(model=tiny_model, output_dir=str(out), grad_accum=2, resume=True, **RUN)
    summary = training.train(config, objectives.PairObjective(config), toy_pairs(16, seed=1), log=messages.append)
    assert summary["resumed_from_step"] == killed_at and any(f"(step {killed_at})" in m for m in messages)
    want, got = metrics(uninterrupted), metrics(out)
    assert [r["step"] for r in got] == list(range(1, 17))
    assert got[-1]["loss"] == pytest.approx(want[-1]["loss"], abs=1e-4)
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)


@pytest.mark.slow
def test_two_ddp_processes_under_torchrun_end_with_identical_weights(tiny_model, toy_file, tmp_path, uninterrupted):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mathagent.cli",
         "train-mdpo", str(toy_file), "--model", tiny_model, "--output-dir", str(out), *RUN_ARGS],
        capture_output=True, text=True, env=ENV, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["weights_sha256"]) == 2 and summary["processes_agree"]
    # Two processes with one micro-batch each take the same gradient steps as one process with two.
    for a, b in zip(metrics(uninterrupted), metrics(out), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["rewards/accuracies"] == a["rewards/accuracies"]


# configs/accelerate/fsdp.yaml as shipped (FSDP2, sharded checkpoints), on 2 CPU processes instead of 8 GPUs in
# bf16. Not `--cpu`: that sends accelerate launch to its one-process launcher.
FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "fsdp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", "-m", "mathagent.cli"]


@pytest.fixture(scope="module")
def fsdp_run(tiny_model, toy_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fsdp"
    proc = subprocess.run([*FSDP_LAUNCH, "train-mdpo", str(toy_file), "--model", tiny_model, "--output-dir", str(out),
                           *RUN_ARGS], capture_output=True, text=True, env=ENV, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_fsdp_processes_under_accelerate_follow_the_single_process_loss_curve(fsdp_run, uninterrupted):
    from transformers import AutoModelForCausalLM

    summary = json.loads((fsdp_run / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "FSDP"
    # Sharded for real: each process wrote its own part of the weights and of the AdamW state.
    checkpoint = checkpoints.checkpoints(fsdp_run)[-1]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Each process hashed the whole weights gathered from the shards; they agree, and are the saved model.
    assert len(summary["weights_sha256"]) == 2 and summary["processes_agree"]
    saved = AutoModelForCausalLM.from_pretrained(fsdp_run)
    assert summary["weights_sha256"][0] == training.weights_digest(saved)
    for a, b in zip(metrics(uninterrupted), metrics(fsdp_run), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["rewards/accuracies"] == a["rewards/accuracies"]


@pytest.mark.slow
def test_an_fsdp_run_resumed_from_its_sharded_checkpoint_ends_with_the_same_weights(fsdp_run, tmp_path, tiny_model,
                                                                                    toy_file):
    out = tmp_path / "resumed"
    shutil.copytree(fsdp_run, out)
    finished = json.loads((out / "training_summary.json").read_text())
    # As if killed after the last step: the latest checkpoint is step 12, and the model is not saved yet.
    for name in ("training_summary.json", "model.safetensors"):
        (out / name).unlink()
    proc = subprocess.run([*FSDP_LAUNCH, "train-mdpo", str(toy_file), "--model", tiny_model, "--output-dir", str(out),
                           *RUN_ARGS, "--resume"], capture_output=True, text=True, env=ENV, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["resumed_from_step"] == 12 and summary["distributed_type"] == "FSDP"
    for a, b in zip(metrics(fsdp_run), metrics(out), strict=True):
        assert b["step"] == a["step"] and b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert summary["weights_sha256"] == finished["weights_sha256"]  # same processes, same kernels: equal


@pytest.mark.slow
def test_vllm_generates_with_the_saved_lora_adapter_as_transformers_does(tmp_path, tiny_model):
    """The adapter train-mdpo saves is what `rollout --adapter` loads: vLLM and transformers, greedy, agree.

    vLLM keeps process-wide state, so it runs in its own process: the CLI's `rollout`, continuing the prompt."""
    import subprocess
    import sys

    from mathagent.agent import cut_after_code
    from mathagent.chat import prompt_ids
    from mathagent.engines import Request, Sampling, open_engine

    out = tmp_path / "lora"
    config = TrainConfig(model=tiny_model, output_dir=str(out), batch_size=4, max_steps=3,
                                  learning_rate=5e-2, lora=True, lora_rank=8, lora_alpha=16)
    assert training.train(config, objectives.PairObjective(config), toy_pairs(4), log=lambda _: None)["saved"] == "adapter"
    prompt = toy_pairs(1)[0]["prompt"]
    completions = {}
    for adapter in (None, str(out)):
        engine = open_engine("hf", tiny_model, adapter=adapter, seed=0)
        request = Request(prompt_ids(engine.tokenizer, prompt))
        text = engine.generate([request], Sampling(temperature=0.0, max_tokens=8))[0].text
        completions["hf", adapter] = cut_after_code(text)
        engine.close()
    record = {"id": "t", "problem_id": "t", "question": "q", "messages": prompt}
    proc = subprocess.run(
        [sys.executable, "-m", "mathagent.cli", "rollout", "--model", tiny_model, "--backend", "vllm", "--adapter",
         str(out), "--temperature", "0", "--max-tokens", "8", "--max-turns", "1"],
        input=json.dumps(record) + "\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    completions["vllm", str(out)] = json.loads(proc.stdout)["messages"][-1]["content"]
    assert completions["vllm", str(out)]
    assert completions["vllm", str(out)] == completions["hf", str(out)]
    assert completions["hf", str(out)] != completions["hf", None]  # the adapter is applied


@pytest.mark.parametrize("engine", ["hf_engine", "vllm_engine"])
def test_sampled_trajectories_train_on_their_recorded_ids_and_the_mismatch_is_reported(tmp_path, tiny_model, engine,
                                                                                       request, sandbox, grader):
    """SFT on trajectories the tiny model sampled (hf, and vLLM in float32): the trainer reads exactly the
    recorded ids (its first-step loss is the float64 NLL of their action tokens) and its log-probs of the
    sampled tokens agree with the recorded ones to float32 precision; the same records without ids are
    rendered instead."""
    engine = request.getfixturevalue(engine)
    from mathagent.agent import AgentConfig, new_trajectories, run_agent
    from mathagent.prompts import PROMPTS
    from mathagent.tokens import conversation_from_ids, drop_ids

    problems = [{"id": f"p{i}", "question": f"What is {i} + {i + 2}?", "answer": str(2 * i + 2)} for i in range(2)]
    trajectories = [t for p in problems for t in new_trajectories(p, 2, PROMPTS["tool"])]
    run_agent(trajectories, engine, sandbox, grader, AgentConfig(max_turns=2, max_tokens=24, temperature=1.0))
    assert all("prompt_ids" in t and any("logprobs" in m for m in t["messages"]) for t in trajectories)
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "sft"), batch_size=4, max_steps=1,
                         learning_rate=1e-3)
    summary = training.train(config, objectives.SFTObjective(config), trajectories, log=lambda _: None)
    assert summary["encoding"]["from_ids"] == 4
    mismatch = summary["sampling_logprob_mismatch"]
    assert mismatch["tokens"] >= 4 * 2 and mismatch["max_abs"] < 1e-4, mismatch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for t in trajectories:
        conv = conversation_from_ids(t["prompt_ids"], t["messages"][1:])
        with torch.no_grad():
            logits = model(torch.tensor([conv.input_ids])).logits
        per_token = losses.token_logps(logits, torch.tensor([conv.input_ids]))[0]
        mask = torch.tensor(conv.action_mask[1:], dtype=torch.bool)
        total -= float(per_token[mask].sum())
        count += int(mask.sum())
    assert metrics(tmp_path / "sft")[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    for t in trajectories:
        drop_ids(t)
    config = TrainConfig(model=tiny_model, output_dir=str(tmp_path / "rendered"), batch_size=4, max_steps=1,
                         learning_rate=1e-3)
    summary = training.train(config, objectives.SFTObjective(config), trajectories, log=lambda _: None)
    assert summary["encoding"]["from_ids"] == 0 and "sampling_logprob_mismatch" not in summary
