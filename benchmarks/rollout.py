"""Rollout throughput of the two backends, side by side: vLLM against transformers' generate.

256 trajectories (64 synthetic arithmetic problems x 4 samples), up to 3 turns each, on the embedded tiny
model warmed up to write the agent's format (so trajectories really take several turns and run code). Both
backends run the same agent loop with the same sandbox; reported per backend: generated tokens per second of
engine time, trajectories per second end to end, engine calls, turns.

    python benchmarks/rollout.py [--problems 64] [--n 4] [--max-turns 3]   # table on stderr, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("MATHAGENT_VLLM_KV_BYTES", str(256 * 2**20))

from mathagent import agent  # noqa: E402
from mathagent.engines import open_engine  # noqa: E402
from mathagent.sandbox import Sandbox  # noqa: E402
from mathagent.tasks.arith import make_problems  # noqa: E402
from mathagent.tiny import resolve_model  # noqa: E402


def run_backend(backend: str, model: str, args) -> dict:
    problems = make_problems(args.problems, seed=123)
    trajectories = [t for p in problems for t in agent.new_trajectories(p, args.n, agent.PROMPTS["tool"])]
    config = agent.AgentConfig(max_turns=args.max_turns, max_tokens=args.max_tokens, temperature=0.7, seed=0)
    engine = open_engine(backend, model, seed=0)
    try:
        with Sandbox() as sandbox:
            turns = []
            start = time.perf_counter()
            agent.run_agent(trajectories, engine, sandbox, config, on_turn=turns.append)
            seconds = time.perf_counter() - start
    finally:
        engine.close()
    stats = engine.stats
    actions = sum(1 for t in trajectories for m in t["messages"] if m["role"] == "assistant")
    return {
        "backend": backend,
        "trajectories": len(trajectories),
        "actions": actions,
        "cells": sum(r.executed for r in turns),
        "engine_calls": stats.calls,
        "generated_tokens": stats.generated_tokens,
        "engine_seconds": round(stats.seconds, 3),
        "total_seconds": round(seconds, 3),
        "tokens_per_second": round(stats.generated_tokens / stats.seconds, 1),
        "trajectories_per_second": round(len(trajectories) / seconds, 2),
        "accuracy": round(sum(bool(t.get("correct")) for t in trajectories) / len(trajectories), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    model = resolve_model(args.model)
    rows = [run_backend(backend, model, args) for backend in ("vllm", "hf")]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout: {rows[0]['trajectories']} trajectories x up to {args.max_turns} turns")
    columns = ("backend", "actions", "cells", "engine_calls", "tokens_per_second", "trajectories_per_second", "total_seconds")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console(stderr=True).print(table)
    vllm, hf = rows
    summary = {
        "benchmark": "rollout",
        "rows": rows,
        "vllm_over_hf_tokens_per_second": round(vllm["tokens_per_second"] / hf["tokens_per_second"], 2),
        "vllm_over_hf_trajectories_per_second": round(vllm["trajectories_per_second"] / hf["trajectories_per_second"], 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
