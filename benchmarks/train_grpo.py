"""Benchmark: training tokens/s and peak memory of `train-grpo` against TRL's GRPOTrainer, same tiny model, same
multi-turn batch.

The batch is --problems problems x --samples trajectories in the record format rollout writes: a question
under the "tool" prompt, then 1 to 4 actions (reasoning and a python block, the last one a \\boxed{} answer)
with an ```output observation after each python block, their ids from `tokens.complete_ids`, each action's
`logprobs` the tiny model's own per-token log-probs plus uniform noise in [-0.6, 0.6] (a sampling policy near
the trained one, so ratios pass both clip edges), and a 0/1 reward per trajectory, every group (`problem_id`)
holding both, so no group is flat.

Both sides run GRPO's DAPO loss (token-level sum over the step's action tokens), epsilon 0.2, epsilon_high 0.28
(clip-higher), no KL term, the ratio against the recorded log-probs, observations masked; the same learning
rate, --batch-size trajectories per step, --steps steps (the same trajectories in each step, in train-grpo's
order: `batches.make_plan`), AdamW without weight decay, gradient clipping at 1.0, a linear schedule, fp32 on
the CPU, and save the final model.

- train-grpo: `training.train` with `objectives.GRPOObjective`, as the command runs it. "tok/s" is over the
  whole call (loading, encoding the records, the sampling-mismatch pass, the steps, saving), "steps tok/s"
  over its step loop (`train_seconds`).
- TRL: a real `trl.GRPOTrainer` (GRPOConfig use_cpu, loss_type "dapo", beta 0, num_generations --samples, a
  dummy reward function, a one-row-per-problem prompt data set). It generates in `train()`, so its training
  step is run here by hand on the recorded batch, as `Trainer.training_step` and the inner loop do it:
  `trainer.compute_loss` under `compute_loss_context_manager`, `accelerator.backward`, `accelerator.
  clip_grad_norm_`, the trainer's own optimizer and schedule (`create_optimizer_and_scheduler`, optim
  adamw_torch, prepared by its accelerator), `zero_grad`. So TRL's `_compute_loss` and its log-prob pass
  (`_get_per_token_logps_and_entropies`: the model called with `labels` and `fused_lm_head=True`, the
  chunked LM head TRL adds at construction) run unchanged. The inputs are the tensors that
  `_generate_and_score_completions` hands it: prompt_ids/prompt_mask left-padded, completion_ids/
  completion_mask right-padded (everything after the prompt), tool_mask 0 on the observations' tokens,
  advantages as TRL computes them (group mean, `trl.trainer.utils.nanstd` + 1e-4), old_per_token_logps the
  recorded log-probs, num_items_in_batch the step's action tokens. They are built before its step loop, as
  generation would have, so its "steps tok/s" excludes them (and the Trainer's per-step callbacks and
  logging); its "tok/s" covers building them, loading, the trainer's construction, the steps and saving.

Before anything is timed, one step of each is run here and their first-step losses must agree within 1e-4
(relative): the two compute the same loss on the same batch. Tokens are the non-padding tokens of every
step's forward passes (train-grpo's `train_tokens`; for TRL its prompt and completion masks), the same for
both (checked). Each trainer runs --repeats times in a fresh subprocess per run (this script with --child),
alternating which goes first; the best run of each (tokens/s of its step loop) is reported. "cpu steps
tok/s" is the best, over the runs, of the tokens of steps 2 to --steps over the process's CPU time from the
end of step 1 to the end of the last: steadier than wall time on a shared machine, where a run gets only
part of a core. Peak memory is the increase of the run's peak RSS (VmHWM, reset at the start through
/proc/self/clear_refs; else `ru_maxrss`) over its RSS at the start, after its side's imports. Both run on
--threads torch threads (default 1).

    python benchmarks/train_grpo.py [--problems 16] [--samples 4] [--batch-size 16] [--steps 8] [--repeats 2]

Prints a table on stderr and the JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("we have so the total is then each number of apples and books costs more than twice half let x be "
         "compute the sum product remainder first check again").split()
EPSILON, EPSILON_HIGH = 0.2, 0.28


# ---- the batch ---------------------------------------------------------------------------------------------


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))).capitalize() + "."


def trajectory_messages(rng: random.Random, question: str, answer: int, correct: bool) -> list[dict]:
    """A question under the tool prompt, then 1 to 4 actions; each but the last writes a python block and is
    followed by an observation (a number in an ```output fence); the last gives a \\boxed{} answer (the right
    one when `correct`)."""
    from mathagent.prompts import PROMPTS
    from mathagent.records import format_observation

    messages = [{"role": "user", "content": PROMPTS["tool"].format(question=question)}]
    for _ in range(rng.randint(0, 3)):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        lines = [f"v{k} = {rng.randint(1, 99)} * {a} + {b}" for k in range(rng.randint(1, 4))]
        code = "\n".join([*lines, f"print({' + '.join(f'v{k}' for k in range(len(lines)))})"])
        messages.append({"role": "assistant", "content": f"{sentence(rng)}\n```python\n{code}\n```"})
        messages.append({"role": "user", "content": format_observation(str(rng.randint(1, 10**6)))})
    given = answer if correct else answer + rng.randint(1, 9)
    text = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
    messages.append({"role": "assistant", "content": f"{text} The answer is $\\boxed{{{given}}}$."})
    return messages


def make_trajectories(model_dir: str, problems: int, samples: int, seed: int = 0) -> list[dict]:
    """problems x samples trajectories, grouped by problem in order, with ids and recorded log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathagent.records import LOGPROBS, PROMPT_IDS, TOKEN_IDS, first_action
    from mathagent.tokens import complete_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(seed)
    out = []
    for p in range(problems):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        # the first sample right, the second wrong, the rest either: every group has reward variance
        correct = [True, False, *(rng.random() < 0.5 for _ in range(samples - 2))]
        for s in range(samples):
            t = {"id": f"p{p}-{s}", "problem_id": f"p{p}", "reward": float(correct[s]),
                 "messages": trajectory_messages(rng, f"What is {a} + {b}?", a + b, correct[s])}
            complete_ids(tokenizer, t)
            ids = list(t[PROMPT_IDS])
            response = t["messages"][first_action(t["messages"]):]
            for m in response:
                ids += m[TOKEN_IDS]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            position = len(t[PROMPT_IDS])
            for m in response:
                if m["role"] == "assistant":
                    true = [logp[i - 1, ids[i]].item() for i in range(position, position + len(m[TOKEN_IDS]))]
                    m[LOGPROBS] = [round(lp + rng.uniform(-0.6, 0.6), 6) for lp in true]
                position += len(m[TOKEN_IDS])
            out.append(t)
    return out


def our_config(model: str, out: str, args, steps: int):
    from mathagent.train_config import TrainConfig

    return TrainConfig(model=model, output_dir=out, loss="dapo", batch_size=args.batch_size, max_steps=steps,
                       learning_rate=args.lr, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, precision="fp32", seed=0)


# ---- the two trainers --------------------------------------------------------------------------------------


def run_ours(model: str, records: list[dict], args, out: str, steps: int) -> dict:
    from mathagent import objectives, training

    config = our_config(model, out, args, steps)
    rows: list[dict] = []  # each step's metrics row, with the CPU time at its end
    start = time.perf_counter()
    summary = training.train(config, objectives.GRPOObjective(config), records,
                             on_step=lambda row: rows.append({**row, "cpu": time.process_time()}), log=lambda _: None)
    seconds = time.perf_counter() - start
    encoding = summary["encoding"]
    if encoding["flat_groups"] or encoding["from_ids"] != len(records):
        raise RuntimeError(f"train-grpo did not train on every trajectory from its ids: {encoding}")
    return {"tokens": summary["train_tokens"], "seconds": seconds, "step_seconds": summary["train_seconds"],
            "cpu_tokens": sum(r["tokens"] for r in rows[1:]), "cpu_seconds": rows[-1]["cpu"] - rows[0]["cpu"],
            "first_loss": rows[0]["loss"], "final_loss": summary["final"]["loss"]}


def trl_advantages(records: list[dict], samples: int):
    """Advantages as GRPOTrainer._generate_and_score_completions computes them, groups of `samples` in order."""
    import torch
    from trl.trainer.utils import nanstd

    if any(records[i]["problem_id"] != records[i - i % samples]["problem_id"] for i in range(len(records))):
        raise ValueError(f"the trajectories must come in groups of {samples} by problem")
    rewards = torch.tensor([float(r["reward"]) for r in records])
    mean = torch.nanmean(rewards.view(-1, samples), dim=1).repeat_interleave(samples, dim=0)
    std = nanstd(rewards.view(-1, samples), dim=1).repeat_interleave(samples, dim=0)
    return (rewards - mean) / (std + 1e-4)


def trl_inputs(records: list[dict], advantages, pad_id: int) -> dict:
    """The tensors GRPOTrainer._compute_loss reads, for these trajectories: the completion is everything after
    the prompt, its tool_mask 0 on the observations' tokens (padded with 1, as TRL pads it)."""
    import torch

    from mathagent.records import LOGPROBS, PROMPT_IDS, TOKEN_IDS, first_action

    prompts, completions, tools, olds = [], [], [], []
    for t in records:
        ids, tool, old = [], [], []
        for m in t["messages"][first_action(t["messages"]):]:
            action = m["role"] == "assistant"
            ids += m[TOKEN_IDS]
            tool += [int(action)] * len(m[TOKEN_IDS])
            old += m[LOGPROBS] if action else [0.0] * len(m[TOKEN_IDS])
        prompts.append(t[PROMPT_IDS])
        completions.append(ids)
        tools.append(tool)
        olds.append(old)
    b, p, c = len(records), max(map(len, prompts)), max(map(len, completions))
    out = {"prompt_ids": torch.full((b, p), pad_id), "prompt_mask": torch.zeros(b, p, dtype=torch.long),
           "completion_ids": torch.full((b, c), pad_id), "completion_mask": torch.zeros(b, c, dtype=torch.long),
           "tool_mask": torch.ones(b, c, dtype=torch.long), "old_per_token_logps": torch.zeros(b, c),
           "advantages": advantages.clone()}
    for i, (prompt, ids, tool, old) in enumerate(zip(prompts, completions, tools, olds, strict=True)):
        out["prompt_ids"][i, p - len(prompt):] = torch.tensor(prompt)
        out["prompt_mask"][i, p - len(prompt):] = 1
        out["completion_ids"][i, : len(ids)] = torch.tensor(ids)
        out["completion_mask"][i, : len(ids)] = 1
        out["tool_mask"][i, : len(ids)] = torch.tensor(tool)
        out["old_per_token_logps"][i, : len(ids)] = torch.tensor(old)
    out["num_items_in_batch"] = (out["completion_mask"] * out["tool_mask"]).sum()
    return out


def run_trl(model: str, records: list[dict], args, out: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from mathagent.batches import make_plan

    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=args.lr, loss_type="dapo", epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
        beta=0.0, num_generations=args.samples, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, optim="adamw_torch", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        seed=0, disable_tqdm=True,
    )
    prompts = Dataset.from_list([{"prompt": r["messages"][:1]} for r in records[:: args.samples]])
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=config, train_dataset=prompts, processing_class=tokenizer)
    # the same trajectories in each step as train-grpo's plan
    plan = make_plan(len(records), our_config(model, out, args, steps), world=1)
    advantages = trl_advantages(records, args.samples)
    batches = []
    for step in range(steps):
        chosen = plan.step(step)[0][0]
        batches.append(trl_inputs([records[i] for i in chosen], advantages[chosen], tokenizer.pad_token_id))
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    accelerator = trainer.accelerator
    model_, optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    losses, tokens, cpu = [], [], []
    step_start = time.perf_counter()
    for inputs in batches:
        model_.train()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model_, inputs)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model_.parameters(), config.max_grad_norm)
        optimizer.step()
        trainer.lr_scheduler.step()
        model_.zero_grad()
        losses.append(loss.item())
        tokens.append(int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()))
        cpu.append(time.process_time())
    step_seconds = time.perf_counter() - step_start
    trainer.save_model(out)
    seconds = time.perf_counter() - start
    return {"tokens": sum(tokens), "seconds": seconds, "step_seconds": step_seconds, "cpu_tokens": sum(tokens[1:]),
            "cpu_seconds": cpu[-1] - cpu[0], "first_loss": losses[0], "final_loss": losses[-1]}


RUNNERS = {"train-grpo": run_ours, "TRL GRPOTrainer": run_trl}


# ---- one run per process -----------------------------------------------------------------------------------


def quiet() -> None:
    logging.disable(logging.WARNING)
    # TRL's import warns that the installed vLLM is newer than it was tested with; nothing here uses vLLM
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")


def child(args) -> None:
    """--child NAME: one run of one trainer in this fresh process; its result (peak RSS increase in MiB
    included) as one JSON line on stdout."""
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    # the side's imports before the baseline, so its memory does not count its libraries (trl's GRPOTrainer
    # module, vLLM with it, is some 190 MiB); the other side's are not imported (vLLM's take seconds)
    import accelerate  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler  # noqa: F401

    if args.child == "train-grpo":
        from mathagent import objectives, training  # noqa: F401
    else:
        import datasets  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401

        from mathagent import batches  # noqa: F401

    records = [json.loads(line) for line in Path(args.records).read_text().splitlines()]
    before = start_peak_rss()
    with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs; stdout is for the result
        result = RUNNERS[args.child](args.model, records, args, args.out, args.steps)
    result["peak_rss_mib"] = (peak_rss() - before) / 1024
    print(json.dumps(result))


def _status_kib(field: str) -> int:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field + ":")))


def start_peak_rss() -> int:
    """The RSS now, in KiB, with the peak reset to it where Linux allows (/proc/self/clear_refs "5"): a
    transient peak of the imports would otherwise hide a run whose own peak stays below it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_rss() -> int:
    """The peak RSS since `start_peak_rss`, in KiB."""
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(name: str, args, model: str, records_path: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", model, "--records", str(records_path),
               "--out", str(out), "--samples", str(args.samples), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--lr", str(args.lr), "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"the {name} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="trajectories per problem (TRL's num_generations)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both (one: the comparison suffers less from other jobs on the machine)")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model, built fresh)")
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (CPU tok/s is over steps 2 to --steps)")
    if args.child:
        child(args)
        return
    quiet()
    import torch

    torch.set_num_threads(args.threads)

    from mathagent.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    try:
        run(args, work, args.model or str(build_tiny_model(work / "tiny")))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, model: str) -> None:
    records = make_trajectories(model, args.problems, args.samples)
    records_path = work / "trajectories.jsonl"
    records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    actions = sum(len(m["token_ids"]) for r in records for m in r["messages"] if m["role"] == "assistant")

    # The same first-step loss on the same batch: both compute the same thing (here, before any timing).
    with contextlib.redirect_stdout(sys.stderr):
        first = {name: runner(model, records, args, str(work / f"check-{i}"), 1)["first_loss"]
                 for i, (name, runner) in enumerate(RUNNERS.items())}
    ours, trl = first["train-grpo"], first["TRL GRPOTrainer"]
    if abs(ours - trl) > 1e-4 * abs(trl):
        raise AssertionError(f"first-step losses differ: train-grpo {ours!r}, TRL {trl!r}")

    results: dict[str, list[dict]] = {name: [] for name in RUNNERS}
    for repeat in range(args.repeats):
        order = list(RUNNERS) if repeat % 2 == 0 else list(reversed(RUNNERS))
        for name in order:
            out = work / f"{name.replace(' ', '_')}-{repeat}"
            results[name].append(run_child(name, args, model, records_path, out))
    best = {}
    for name, runs in results.items():
        fastest = max(runs, key=lambda r: r["tokens"] / r["step_seconds"])
        best[name] = {**fastest, "tokens_per_second": fastest["tokens"] / fastest["seconds"],
                      "step_tokens_per_second": fastest["tokens"] / fastest["step_seconds"],
                      "cpu_step_tokens_per_second": max(r["cpu_tokens"] / r["cpu_seconds"] for r in runs),
                      "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs)}
    ours_run, trl_run = best["train-grpo"], best["TRL GRPOTrainer"]
    if ours_run["tokens"] != trl_run["tokens"]:
        raise AssertionError(f"the trainers saw different tokens: {ours_run['tokens']} and {trl_run['tokens']}")
    summary = {
        "model": model, "problems": args.problems, "samples": args.samples, "trajectories": len(records),
        "action_tokens": actions, "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
        "threads": args.threads, "first_step_loss": first, "results": best,
        "speedup_vs_trl": ours_run["step_tokens_per_second"] / trl_run["step_tokens_per_second"],
        "speedup_vs_trl_whole_call": ours_run["tokens_per_second"] / trl_run["tokens_per_second"],
        "speedup_vs_trl_cpu": ours_run["cpu_step_tokens_per_second"] / trl_run["cpu_step_tokens_per_second"],
        "memory_ratio": ours_run["peak_rss_mib"] / trl_run["peak_rss_mib"] if trl_run["peak_rss_mib"] else None,
    }
    width = max(map(len, best))
    print(f"{len(records)} trajectories, {actions} action tokens; first-step loss train-grpo {ours:.6f}, "
          f"TRL {trl:.6f}", file=sys.stderr)
    print(f"{'trainer':<{width}}  {'tokens':>8}  {'seconds':>8}  {'tok/s':>8}  {'steps tok/s':>11}  "
          f"{'cpu steps tok/s':>15}  {'peak MiB':>8}  {'final loss':>10}", file=sys.stderr)
    for name, r in best.items():
        print(f"{name:<{width}}  {r['tokens']:>8}  {r['seconds']:>8.1f}  {r['tokens_per_second']:>8.0f}  "
              f"{r['step_tokens_per_second']:>11.0f}  {r['cpu_step_tokens_per_second']:>15.0f}  "
              f"{r['peak_rss_mib']:>8.1f}  {r['final_loss']:>10.4f}", file=sys.stderr)
    ratio = summary["memory_ratio"]
    print(f"train-grpo / TRL: {summary['speedup_vs_trl']:.2f}x steps tok/s "
          f"({summary['speedup_vs_trl_whole_call']:.2f}x whole call, "
          f"{summary['speedup_vs_trl_cpu']:.2f}x steps over CPU time), peak memory "
          f"{'-' if ratio is None else f'{ratio:.2f}x'}", file=sys.stderr)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
