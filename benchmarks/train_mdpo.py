"""Benchmark: training tokens/s of `train-mdpo` against TRL's DPOTrainer, same tiny model, same pairs.

The pairs are single-turn (a question, then one assistant answer), so both trainers optimize the same loss on
the same tokens: the chosen answer is a GSM8K training solution ending in \\boxed{}, the rejected one the
solution of another problem (synthetic arithmetic if ../shared/data is absent). Both use the sigmoid loss,
beta 0.1, the same learning rate, batch size, steps, max length, fp32 on the CPU, no dropout, gradient
clipping at 1.0, a linear schedule, and save the final model.

Tokens are the non-padding tokens of the chosen and rejected sequences of every step (TRL's `num_tokens`);
the time is the whole training call, from tokenizing the pairs to the saved model (model loading included,
imports excluded): for train-mdpo its single reference pass before training, for TRL its reference forward
pass at each step (its default) or, in a third row, its `precompute_ref_log_probs=True`. "steps tok/s" is
the same tokens over the optimizer-step loop alone. Each trainer runs --repeats times, alternating; the best
run of each is reported. Both run on --threads torch threads (default 1).

    python benchmarks/train_mdpo.py [--pairs 64] [--batch-size 8] [--steps 16] [--repeats 2] [--threads 1]

Prints a table on stderr and the JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"


def single_turn_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs {id, prompt, chosen, rejected} with one assistant message each."""
    rng = random.Random(seed)
    if GSM8K.exists():
        rows = [json.loads(line) for _, line in zip(range(4 * n), GSM8K.open())]
        problems = [(r["question"], re.sub(r"<<.*?>>", "", r["answer"].split("####")[0]).strip()
                     + f"\nThe answer is $\\boxed{{{r['answer'].split('####')[1].strip()}}}$.") for r in rows]
    else:
        problems = []
        for _ in range(4 * n):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            problems.append((f"What is {a} + {b}?", f"We add {a} and {b}: {a} + {b} = {a + b}. "
                                                     f"The answer is $\\boxed{{{a + b}}}$."))
    pairs = []
    for i in range(n):
        question, solution = problems[i]
        other = problems[(i + 1 + rng.randrange(len(problems) - 1)) % len(problems)][1]
        pairs.append({"id": str(i), "problem_id": str(i), "prompt": [{"role": "user", "content": question}],
                      "chosen": [{"role": "assistant", "content": solution}],
                      "rejected": [{"role": "assistant", "content": other}]})
    return pairs


def run_ours(model: str, pairs: list[dict], args, out: str) -> dict:
    from mathagent import training
    from mathagent.objectives import PairObjective
    from mathagent.train_config import TrainConfig

    config = TrainConfig(
        model=model, output_dir=out, batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
        beta=0.1, loss="sigmoid", max_length=args.max_length, precision="fp32", seed=0,
    )
    start = time.perf_counter()
    summary = training.train(config, PairObjective(config), pairs, log=lambda _: None)
    seconds = time.perf_counter() - start
    return {"tokens": summary["train_tokens"], "seconds": seconds, "step_seconds": summary["train_seconds"],
            "final_loss": summary["final"]["loss"]}


def run_trl(model: str, pairs: list[dict], args, out: str, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, beta=0.1, loss_type=["sigmoid"], max_length=args.max_length,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, disable_dropout=True,
        precompute_ref_log_probs=precompute, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = DPOTrainer(model=policy, args=config, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(out)
    seconds = time.perf_counter() - start
    logs = [row for row in trainer.state.log_history if "num_tokens" in row]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"tokens": int(logs[-1]["num_tokens"]), "seconds": seconds, "step_seconds": result.metrics["train_runtime"],
            "final_loss": losses[-1] if losses else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both (one: the comparison suffers less from other jobs on the machine)")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model, built fresh)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)

    from mathagent.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-mdpo-"))
    try:
        run(args, work, args.model or str(build_tiny_model(work / "tiny")))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, model: str) -> None:
    pairs = single_turn_pairs(args.pairs)
    runners = {
        "train-mdpo": lambda out: run_ours(model, pairs, args, out),
        "TRL DPOTrainer": lambda out: run_trl(model, pairs, args, out, precompute=False),
        "TRL DPOTrainer, precomputed ref": lambda out: run_trl(model, pairs, args, out, precompute=True),
    }
    results: dict[str, list[dict]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            out = str(work / f"{name.replace(' ', '_').replace(',', '')}-{repeat}")
            with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs; stdout is for the JSON
                results[name].append(runners[name](out))
    best = {}
    for name, runs in results.items():
        run = max(runs, key=lambda r: r["tokens"] / r["seconds"])
        best[name] = {**run, "tokens_per_second": run["tokens"] / run["seconds"],
                      "step_tokens_per_second": run["tokens"] / run["step_seconds"]}
    ours = best["train-mdpo"]["tokens_per_second"]
    summary = {
        "model": model, "pairs": args.pairs, "batch_size": args.batch_size, "steps": args.steps,
        "max_length": args.max_length, "repeats": args.repeats, "threads": args.threads,
        "data": "gsm8k" if GSM8K.exists() else "synthetic",
        "results": best,
        "speedup_vs_trl": ours / best["TRL DPOTrainer"]["tokens_per_second"],
        "speedup_vs_trl_precomputed": ours / best["TRL DPOTrainer, precomputed ref"]["tokens_per_second"],
    }
    width = max(map(len, best))
    print(f"{'trainer':<{width}}  {'tokens':>8}  {'seconds':>8}  {'tok/s':>8}  {'steps tok/s':>11}  {'final loss':>10}",
          file=sys.stderr)
    for name, r in best.items():
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        print(f"{name:<{width}}  {r['tokens']:>8}  {r['seconds']:>8.1f}  {r['tokens_per_second']:>8.0f}  "
              f"{r['step_tokens_per_second']:>11.0f}  {loss:>10}", file=sys.stderr)
    print(f"train-mdpo / TRL: {summary['speedup_vs_trl']:.2f}x (precomputed ref: "
          f"{summary['speedup_vs_trl_precomputed']:.2f}x)", file=sys.stderr)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
