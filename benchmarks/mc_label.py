"""Monte-Carlo step labeling as built, against one engine call loop per prefix, side by side on vLLM.

The input is what mc-label labels in practice: per synthetic arithmetic problem, the gold tool-integrated
solution, a twin of it that ends in a wrong answer (it shares every prefix with the gold one), and `--n`
trajectories sampled by the tiny model. The reference policy is the embedded tiny model (warmed up to write
the agent's format, so continuations run code and take several turns), on vLLM, with the real sandbox.

- built: `labeling.label_trajectories`: every distinct prefix x M continuations in one `run_agent` (one engine
  call per turn for all of them), identical prefixes sampled once.
- per prefix: for every step of every trajectory, its own `run_agent` over its M continuations (one engine
  call per turn per prefix), no deduplication: what a labeler that sends each prefix on its own does.

Both draw the same samples (continuation ids, hence per-request seeds, depend only on the prefix), and vLLM's
prefix cache is emptied before each, so neither inherits the other's cache.

    python benchmarks/mc_label.py [--problems 12] [--n 2] [--m 8] [--max-tokens 48] [--max-turns 4] [--repeats 3]

Each is run `--repeats` times, alternately, and the median run of each is reported with the ratio of every
repeat (on a shared machine one run's ratio ranged from 1.0x to 5.4x).

Prints a table to stderr and a JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("MATHAGENT_VLLM_KV_BYTES", str(256 * 2**20))

from mathagent import agent, labeling  # noqa: E402
from mathagent.engines import open_engine  # noqa: E402
from mathagent.grading import Grader  # noqa: E402
from mathagent.prompts import PROMPTS  # noqa: E402
from mathagent.sandbox import Sandbox  # noqa: E402
from mathagent.tasks.arith import gold_messages, make_problems  # noqa: E402
from mathagent.tiny import resolve_model  # noqa: E402


def inputs(engine, sandbox, grader, args) -> list[dict]:
    """Graded trajectories: gold, its wrong-answer twin, and n samples of the tiny model, per problem."""
    problems = make_problems(args.problems, seed=7)
    out = []
    for p in problems:
        gold = gold_messages(p, PROMPTS["tool"])
        out.append({**p, "problem_id": p["id"], "id": f"{p['id']}-gold", "messages": gold, "status": "answered"})
        twin = [dict(m) for m in gold]
        twin[-1]["content"] = "The answer is \\boxed{0}."
        out.append({**p, "problem_id": p["id"], "id": f"{p['id']}-twin", "messages": twin, "status": "answered"})
    sampled = [t for p in problems for t in agent.new_trajectories(p, args.n, PROMPTS["tool"])]
    config = agent.AgentConfig(max_turns=args.max_turns, max_tokens=args.max_tokens, temperature=0.7, seed=1)
    agent.run_agent(sampled, engine, sandbox, grader, config)
    for t in out:
        agent.grade(t, grader)
    return out + sampled


def copies(trajectories: list[dict]) -> list[dict]:
    return [{**t, "messages": [dict(m) for m in t["messages"]]} for t in trajectories]


def built(trajectories, engine, sandbox, grader, config, m) -> dict:
    calls, tokens, requests = engine.stats.calls, engine.stats.generated_tokens, engine.stats.requests
    engine_seconds = engine.stats.seconds
    report = labeling.label_trajectories(trajectories, engine, sandbox, grader, config, m=m)
    return {
        "seconds": report.seconds, "engine_seconds": engine.stats.seconds - engine_seconds,
        "engine_calls": engine.stats.calls - calls,
        "completions": report.completions,
        "requests": engine.stats.requests - requests, "tokens": engine.stats.generated_tokens - tokens,
        "prefixes_sampled": report.prefixes,
    }


def per_prefix(trajectories, engine, sandbox, grader, config, m) -> dict:
    calls, tokens, requests = engine.stats.calls, engine.stats.generated_tokens, engine.stats.requests
    engine_seconds = engine.stats.seconds
    start = time.perf_counter()
    completions = prefixes = 0
    for t in trajectories:
        steps = labeling.split_steps(t["messages"])
        labels = []
        for step in steps[:-1]:
            root = labeling.continuation_root(step, t, labeling.prefix_key(step, t.get("answer")))
            group = agent.branch(root, m)
            labeling.complete(group, engine, sandbox, grader, config)
            labels.append(labeling.sampled_step(labeling.outcomes(group)))
            completions += len(group)
            prefixes += 1
        if steps:
            labels.append(labeling.outcome_step(bool(t.get("correct"))))
        t["steps"] = labels
    return {
        "seconds": time.perf_counter() - start, "engine_seconds": engine.stats.seconds - engine_seconds,
        "engine_calls": engine.stats.calls - calls,
        "completions": completions, "requests": engine.stats.requests - requests,
        "tokens": engine.stats.generated_tokens - tokens, "prefixes_sampled": prefixes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=12)
    parser.add_argument("--n", type=int, default=2, help="tiny-model trajectories per problem, beside gold and twin")
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the median run is reported")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()

    engine = open_engine("vllm", resolve_model(args.model), seed=0)
    config = agent.AgentConfig(max_turns=args.max_turns, max_tokens=args.max_tokens, temperature=0.7, seed=0)
    try:
        with Sandbox() as sandbox, Grader() as grader:
            trajectories = inputs(engine, sandbox, grader, args)
            steps = sum(len(labeling.split_steps(t["messages"])) for t in trajectories)
            sampled_steps = steps - sum(1 for t in trajectories if labeling.split_steps(t["messages"]))
            runs = {"built": [], "per_prefix": []}
            outputs = {}
            for _ in range(args.repeats):  # alternated, so that a busy spell of the machine hits both
                for name, run in (("built", built), ("per_prefix", per_prefix)):
                    engine.llm.reset_prefix_cache()  # neither run inherits the other's cache
                    outputs[name] = copies(trajectories)
                    row = run(outputs[name], engine, sandbox, grader, config, args.m)
                    row["labeled_steps_per_s"] = steps / row["seconds"]
                    row["sampled_steps_per_s"] = sampled_steps / row["seconds"]
                    runs[name].append(row)
    finally:
        engine.close()
    # The median run of each (by time): one slow spell does not decide the ratio.
    rows = {name: sorted(rs, key=lambda row: row["seconds"])[len(rs) // 2] for name, rs in runs.items()}
    ratios = [b["labeled_steps_per_s"] / p["labeled_steps_per_s"] for b, p in zip(runs["built"], runs["per_prefix"])]
    same = sum(a["steps"] == b["steps"] for a, b in zip(outputs["built"], outputs["per_prefix"], strict=True))
    summary = {
        "benchmark": "mc_label",
        "trajectories": len(trajectories),
        "steps": steps,
        "sampled_steps": sampled_steps,
        "m": args.m,
        "max_tokens": args.max_tokens,
        "max_turns": args.max_turns,
        "cpus": os.cpu_count(),
        "built": rows["built"],
        "per_prefix": rows["per_prefix"],
        "repeats": args.repeats,
        "speedup": rows["built"]["labeled_steps_per_s"] / rows["per_prefix"]["labeled_steps_per_s"],
        "speedup_per_repeat": [round(r, 2) for r in ratios],
        "identical_labels": f"{same}/{len(trajectories)}",
    }

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mc-label: {len(trajectories)} trajectories, {steps} steps ({sampled_steps} sampled), M = {args.m}")
    table.add_column("")
    for column in ("labeled steps/s", "seconds", "engine calls", "prefixes sampled", "completions", "tokens"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        table.add_row(name, f"{row['labeled_steps_per_s']:.2f}", f"{row['seconds']:.1f}", str(row["engine_calls"]),
                      str(row["prefixes_sampled"]), str(row["completions"]), str(row["tokens"]))
    console = Console(stderr=True, width=120)
    console.print(table)
    console.print(f"speedup (median of {args.repeats} runs each): {summary['speedup']:.1f}x labeled steps/s "
                  f"(per repeat {summary['speedup_per_repeat']}); identical labels: {summary['identical_labels']} "
                  f"trajectories", highlight=False)
    print(json.dumps({k: ({kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()}
                          if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v)
                      for k, v in summary.items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
