"""Rollout throughput against the loop our users would otherwise run: the Qwen2.5-Math / ToRA toolkit's.

The toolkit's design, written here from its description (no code of it is used): per turn, one vLLM
`generate` over all live trajectories, stopping at "```output"; then each trajectory's whole code history is
exec'ed with fresh globals in a warm process pool created once (imports stay warm; no isolation, no state
kept between turns). mathagent's loop runs the same model on the same engine, problems, prompts, sampling and
per-request seeds, with every isolation property of its sandbox on. Engine start is included in both (ours
opens its sandbox first, as `mathagent rollout` does, so that the zygote imports while the engine starts).

Workload (the issue's): 128 arithmetic problems x 4 samples = 512 trajectories, up to 3 turns, 96 tokens a
turn, on the embedded tiny model warmed up to write the agent's format. Reported: trajectories/s of both and
their ratio, the engine's own generation time (the limit: what is not generation is loop overhead), and
mathagent's wall time after the engine started over that generation time (and over the toolkit's, which no
other work overlaps).

Then mathagent's loop through one local vLLM server (`--backend openai`, the server started with the in-process
engine's settings and not timed) against the in-process engine, trajectories/s after start.

Then the two schedules of mathagent's loop on a long-tailed workload (actions of very different lengths, one
cell in 16 slow): turn by turn against continuous batching (`AgentConfig.schedule`), same engine and seeds. The
slow cells wait (what a GPU engine sees of a cell computing on the CPU: its time does not take the engine's), or
compute on this machine's cores, which the CPU engine uses too, so that no schedule can overlap the two.

`--regime gpu`: the same loops where a GPU would generate, on this machine. An untimed pass records, with
the real in-process engine, every request each loop makes on each workload and what the tiny model completed;
then each design runs in a fresh process against one engine stand-in (`benchmarks/gpu_standin.py`) that
answers those requests with those completions (a request it has none for fails the run) in the wall time
continuous batching of a ~1.5B model takes on one A100 (a latency model from published vLLM measurements,
derived there), asleep, so that the host's cores are the loop's and its cells'. The cells are real: the
toolkit's warm pool, mathagent's sandbox with every isolation property on, the same number of workers for both
(one per core on the plain workload, whose cells compute; SLOW_WORKERS on the long-tailed one, whose slow cells
wait, as on a GPU node's free host cores). Workloads: plain (above) and long-tailed (below, cells waiting);
designs: the toolkit, mathagent turn by turn, continuously, and continuously with the engine core in the
caller's process (as mathagent's VLLMEngine runs it: the engine steps only inside `step()`). Timed: stand-in
start to the end of the rollout, grading included. Reported: trajectories/s and their ratio to the toolkit's,
the stand-in's busy time (generation: the limit) and mathagent's wall time after start over it, and the CPU
time each design took. On a host with few cores the numbers move with whatever else runs there.

    python benchmarks/rollout.py [--problems 128] [--n 4]   # table on stderr, JSON on stdout
    python benchmarks/rollout.py --regime gpu [--recording FILE]   # the recording is kept and reused
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("MATHAGENT_VLLM_KV_BYTES", str(256 * 2**20))

from mathagent import agent  # noqa: E402
from mathagent.chat import prompt_ids  # noqa: E402
from mathagent.engines import Request, Sampling, open_engine, quiet_engines  # noqa: E402
from mathagent.engines.vllm import local_server  # noqa: E402
from mathagent.grading import Grader  # noqa: E402
from mathagent.prompts import PROMPTS  # noqa: E402
from mathagent.records import OBSERVATION_FENCE, actions, observation_message  # noqa: E402
from mathagent.sandbox import Sandbox  # noqa: E402
from mathagent.tasks.arith import make_problems  # noqa: E402
from mathagent.tiny import cache_dir, resolve_model  # noqa: E402

from benchmarks.gpu_standin import GPUStandIn, Latency, Recorder  # noqa: E402

TIMEOUT = 10
SLOW_CELL = 1.5
SLOW_WORKERS = 16


# -- the toolkit's design ------------------------------------------------------------------------------------


def _warm_worker() -> None:
    import numpy  # noqa: F401
    import sympy  # noqa: F401


def _exec_history(cells: list[str]) -> str:
    """In a pooled worker: the earlier cells with their output discarded, then the last one, all in fresh
    globals; what the last one printed (and its trailing expression's value), or its error."""

    def alarm(signum, frame):
        raise TimeoutError(f"the cell ran longer than {TIMEOUT} s")

    namespace: dict = {"__name__": "__main__"}
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIMEOUT)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for code in cells[:-1]:
                exec(code, namespace)
        with contextlib.redirect_stdout(out):
            tree = ast.parse(cells[-1])
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
                if value is not None:
                    print(repr(value))
        return out.getvalue().rstrip("\n")
    except BaseException as e:  # noqa: BLE001 - the model's code may raise anything
        return (out.getvalue() + f"{type(e).__name__}: {e}").strip("\n")
    finally:
        signal.alarm(0)


def toolkit_loop(trajectories: list[dict], engine, config: agent.AgentConfig, workers: int | None = None) -> int:
    """The toolkit's loop on our records; returns the number of cells run. Per turn: the code of every last
    action runs, its whole history re-exec'ed in the pool, then one `generate` for the trajectories that go on.
    A trajectory may come with actions (the long-tailed workload's first one, its code pending)."""
    sampling = Sampling(config.temperature, config.top_p, config.max_tokens, stop=(OBSERVATION_FENCE,))
    cells = 0
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), initializer=_warm_worker) as pool:
        live = list(trajectories)
        while live:
            running = [t for t in live if agent.pending_code(t["messages"]) is not None]
            histories = [[*agent.executed_cells(t["messages"]), agent.pending_code(t["messages"])] for t in running]
            for t, output in zip(running, pool.map(_exec_history, histories, chunksize=4)):
                t["messages"].append(observation_message(output, "ok", False, config.observation_role))
            cells += len(running)
            # Those that go on: a fresh prompt, or an observation just appended, and actions left.
            live = [t for t in live if t["messages"][-1]["role"] != "assistant"
                    and len(actions(t["messages"])) < config.max_turns]
            if not live:
                break
            requests = [Request(prompt_ids(engine.tokenizer, t["messages"]),
                                seed=agent.request_seed(config.seed, t["id"], len(actions(t["messages"]))))
                        for t in live]
            for t, completion in zip(live, engine.generate(requests, sampling)):
                t["messages"].append({"role": "assistant", "content": agent.cut_after_code(completion.text)})
    with Grader() as grader:
        for t in trajectories:
            agent.grade(t, grader, config.reward)
    return cells


def run_loop(design: str, trajectories: list[dict], engine, config: agent.AgentConfig,
             workers: int | None = None, sandbox: Sandbox | None = None) -> int:
    """One design's rollout of `trajectories` on `engine`, cells on `workers` (default: one per core): the
    toolkit's loop and its pool, or mathagent's with its sandbox (every isolation property on; `sandbox`, one
    opened before the engine, is closed at the end). Returns the number of cells run."""
    if design == "toolkit":
        return toolkit_loop(trajectories, engine, config, workers)
    turns = []
    with sandbox or Sandbox(workers=workers) as sandbox, Grader() as grader:
        agent.run_agent(trajectories, engine, sandbox, grader, config, on_turn=turns.append)
    return sum(r.executed for r in turns)


# -- the workloads -------------------------------------------------------------------------------------------


def plain_workload(args, schedule: str = "turns") -> tuple[list[dict], agent.AgentConfig]:
    """The issue's: args.problems arithmetic problems x args.n samples, up to args.max_turns turns."""
    problems = make_problems(args.problems, seed=123)
    trajectories = [t for p in problems for t in agent.new_trajectories(p, args.n, PROMPTS[args.prompt])]
    config = agent.AgentConfig(max_turns=args.max_turns, max_tokens=args.max_tokens, temperature=0.7, seed=0,
                               schedule=schedule)
    return trajectories, config


def tail_workload(args, schedule: str = "turns", slow: str = "wait") -> tuple[list[dict], agent.AgentConfig]:
    """Trajectories whose first action is given, its code pending: one in 16 is slow for SLOW_CELL seconds
    (`slow`: "compute", on the CPU, or "wait", off it); then up to 3 more actions sampled at temperature 1, whose
    lengths spread from a few tokens to the 160-token cap."""
    problems = make_problems(args.tail_problems, seed=321)
    trajectories = []
    for i, p in enumerate(problems):
        (t,) = agent.new_trajectories(p, 1, PROMPTS[args.prompt])
        if i % 16:
            code = f"print({i} * 3)"
        elif slow == "compute":
            code = (f"import time\nend = time.process_time() + {SLOW_CELL}\nwhile time.process_time() < end:\n"
                    f"    pass\nprint({i})")
        else:
            code = f"import time\ntime.sleep({SLOW_CELL})\nprint({i})"
        t["messages"].append({"role": "assistant", "content": f"Let me compute.\n```python\n{code}\n```"})
        trajectories.append(t)
    config = agent.AgentConfig(max_turns=4, max_tokens=160, temperature=1.0, seed=1, schedule=schedule)
    return trajectories, config


# -- the two, side by side -----------------------------------------------------------------------------------


def run(design: str, model: str, args, base_url: str | None = None) -> dict:
    trajectories, config = plain_workload(args, "continuous" if design.endswith("continuous") else "turns")
    start = time.perf_counter()
    # As `mathagent rollout` does, ours opens its sandbox before the engine: the zygote imports meanwhile.
    sandbox = Sandbox() if design != "toolkit" else None
    try:
        if design == "mathagent-server":  # the server already runs: "start" is the client's
            engine = open_engine("openai", model, base_urls=[base_url], concurrency=args.concurrency)
        else:
            engine = open_engine("vllm", model, seed=0)
    except BaseException:
        if sandbox is not None:  # run_loop would have closed it
            sandbox.close()
        raise
    started = time.perf_counter()
    try:
        cells = run_loop("toolkit" if design == "toolkit" else "mathagent", trajectories, engine, config,
                         sandbox=sandbox)
        end = time.perf_counter()
    finally:
        engine.close()
    stats = engine.stats
    return {
        "design": design,
        "trajectories": len(trajectories),
        "actions": sum(1 for t in trajectories for m in t["messages"] if m["role"] == "assistant"),
        "cells": cells,
        "engine_calls": stats.calls,
        "generated_tokens": stats.generated_tokens,
        "engine_start_seconds": round(started - start, 3),
        "generation_seconds": round(stats.seconds, 3),
        "total_seconds": round(end - start, 3),
        "after_start_over_generation": round((end - started) / stats.seconds, 3),
        "trajectories_per_second": round(len(trajectories) / (end - start), 2),
        "trajectories_per_second_after_start": round(len(trajectories) / (end - started), 2),
        "accuracy": round(sum(bool(t.get("correct")) for t in trajectories) / len(trajectories), 4),
    }


def long_tailed(engine, args, schedule: str, slow: str) -> dict:
    """mathagent's loop on the long-tailed workload (`tail_workload`) with one schedule."""
    trajectories, config = tail_workload(args, schedule, slow)
    # Waiting cells model a GPU node, where the engine leaves the CPU to the cells and the sandbox has a worker
    # per core of many: the slow ones run side by side, not two at a time.
    with Sandbox(workers=SLOW_WORKERS if slow == "wait" else None) as sandbox, Grader() as grader:
        start = time.perf_counter()
        agent.run_agent(trajectories, engine, sandbox, grader, config)
        seconds = time.perf_counter() - start
    lengths = sorted(len(m["content"]) for t in trajectories for m in t["messages"][3:] if m["role"] == "assistant")
    return {
        "schedule": schedule,
        "slow_cells": slow,
        "trajectories": len(trajectories),
        "actions": sum(1 for t in trajectories for m in t["messages"] if m["role"] == "assistant"),
        "action_chars_p50_p99": [lengths[len(lengths) // 2], lengths[int(len(lengths) * 0.99)]] if lengths else [],
        "seconds": round(seconds, 3),
        "trajectories_per_second": round(len(trajectories) / seconds, 2),
        "statuses": dict(sorted(Counter(t["status"] for t in trajectories).items())),
    }


# -- the GPU regime: both loops on one engine stand-in (benchmarks/gpu_standin.py) ---------------------------

WORKLOADS = ("plain", "long-tailed")
# mathagent-continuous-inproc: the engine core in the caller's process, as mathagent's VLLMEngine runs it
# (VLLM_ENABLE_V1_MULTIPROCESSING=0): the engine steps only inside `step()`; the others' core runs on its own.
GPU_DESIGNS = ("toolkit", "mathagent", "mathagent-continuous", "mathagent-continuous-inproc")
# Options a child process of the GPU regime gets from its parent (the workloads' and the latency model's).
_SHARED = ("problems", "n", "max_turns", "max_tokens", "prompt", "tail_problems", "model", *(
    f"gpu_{f}" for f in ("step_ms", "per_sequence_ms", "per_context_token_ns", "prefill_ms_per_token",
                         "max_num_seqs", "max_batched_tokens")))


def gpu_workload(workload: str, args, schedule: str) -> tuple[list[dict], agent.AgentConfig, int]:
    """A workload of the GPU regime and the cell workers each design gets for it. Plain: one per core of this
    machine, where its cells compute. Long-tailed: SLOW_WORKERS, a GPU node's host cores for one GPU; its slow
    cells wait, so here too they run side by side without taking a core."""
    if workload == "plain":
        return (*plain_workload(args, schedule), os.cpu_count() or 1)
    return (*tail_workload(args, schedule, "wait"), SLOW_WORKERS)


def gpu_record(args, model: str, path: str) -> None:
    """The untimed pass: each loop on each workload with the real in-process engine, every completion kept
    under its request (`gpu_standin.Recorder`). mathagent's continuous schedule makes the requests of its turns
    (per-request seeds), so one recording of mathagent serves both schedules."""
    recording = {}
    with quiet_engines():
        engine = Recorder(open_engine("vllm", model, seed=0))
        try:
            for workload in WORKLOADS:
                for loop in ("toolkit", "mathagent"):
                    begun = time.perf_counter()
                    trajectories, config, workers = gpu_workload(workload, args, "turns")
                    engine.completions = {}
                    run_loop(loop, trajectories, engine, config, workers)
                    recording[f"{workload}/{loop}"] = engine.completions
                    print(f"recorded {workload}/{loop}: {len(engine.completions)} requests in "
                          f"{time.perf_counter() - begun:.1f} s", file=sys.stderr, flush=True)
        finally:
            engine.close()
    with open(path, "w") as f:
        json.dump({"options": _options(args), "recording": recording}, f)


def gpu_run(args, model: str, design: str, workload: str, path: str) -> dict:
    """One timed run: stand-in start to the end of the rollout (grading included), the cells real."""
    from transformers import AutoTokenizer

    loop = "toolkit" if design == "toolkit" else "mathagent"
    schedule = "continuous" if "continuous" in design else "turns"
    with open(path) as f:
        completions = json.load(f)["recording"][f"{workload}/{loop}"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    latency = _latency(args)
    trajectories, config, workers = gpu_workload(workload, args, schedule)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    engine = GPUStandIn(completions, tokenizer, latency, background=not design.endswith("inproc"))
    started = time.perf_counter()
    if loop == "toolkit":
        _warm_worker()  # the pool's workers fork from a parent that imported numpy and sympy once
    cells = run_loop(loop, trajectories, engine, config, workers)
    end = time.perf_counter()
    cpu = _cpu_seconds() - cpu
    if engine.misses:
        raise SystemExit(f"{design} on {workload}: {engine.misses} of {engine.stats.requests} requests are not in "
                         f"the recording {path}")
    return {
        "workload": workload,
        "design": design,
        "workers": workers,
        "trajectories": len(trajectories),
        "actions": sum(1 for t in trajectories for m in t["messages"] if m["role"] == "assistant"),
        "cells": cells,
        "engine_calls": engine.stats.calls,
        "requests": engine.stats.requests,
        "misses": engine.misses,
        "generated_tokens": engine.stats.generated_tokens,
        "prompt_tokens": engine.stats.prompt_tokens,
        "prefilled_tokens": engine.prefilled_tokens,
        "steps": engine.steps,
        "mean_batch": round(engine.sampled / max(engine.steps, 1), 1),
        "busy_seconds": round(engine.busy_seconds, 3),
        "total_seconds": round(end - start, 3),
        "after_start_seconds": round(end - started, 3),
        "after_start_over_busy": round((end - started) / engine.busy_seconds, 3),
        "cpu_seconds": round(cpu, 2),
        "trajectories_per_second": round(len(trajectories) / (end - start), 2),
        "accuracy": round(sum(bool(t.get("correct")) for t in trajectories) / len(trajectories), 4),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the pool's workers, the sandbox's zygote and
    the sessions it reaped, the grader): what the rollout took of the host's cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _latency(args) -> Latency:
    return Latency(args.gpu_step_ms, args.gpu_per_sequence_ms, args.gpu_per_context_token_ns,
                   args.gpu_prefill_ms_per_token, args.gpu_max_num_seqs, args.gpu_max_batched_tokens)


def _recording_path(args, model: str) -> str:
    """Where the recording is kept between runs: beside the tiny model (`tiny.cache_dir`), named by what it
    depends on (the options, the model and its build, vLLM's version)."""
    import importlib.util

    def text(path: str) -> str:
        return open(path).read() if os.path.exists(path) else ""

    # vLLM's version from its file: importing vllm here would take the parent ~10 s for nothing.
    version = text(os.path.join(os.path.dirname(importlib.util.find_spec("vllm").origin), "_version.py"))
    key = json.dumps([_options(args), model, text(os.path.join(model, "mathagent_tiny.json")), version])
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return str(cache_dir() / f"rollout-gpu-recording-{digest}.json")


def _options(args) -> dict:
    return {name: getattr(args, name) for name in _SHARED}


def _child(args, *stage: str) -> subprocess.CompletedProcess:
    """This script in a fresh process (nothing of the recording pass's vLLM in the timed ones)."""
    command = [sys.executable, os.path.abspath(__file__), "--regime", "gpu", *stage]
    for name, value in _options(args).items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)


def gpu_main(args, model: str) -> None:
    if args.stage == "record":
        return gpu_record(args, model, args.recording)
    if args.stage == "run":
        print(json.dumps(gpu_run(args, model, args.design, args.workload, args.recording)))
        return None
    path = args.recording or _recording_path(args, model)
    reuse = False
    if os.path.exists(path):
        with open(path) as f:
            reuse = json.load(f)["options"] == _options(args)
    if reuse:
        print(f"reusing the recording {path}", file=sys.stderr)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _child(args, "--stage", "record", "--recording", path + ".partial")
        os.replace(path + ".partial", path)
    rows = [json.loads(_child(args, "--stage", "run", "--design", design, "--workload", workload,
                              "--recording", path).stdout)
            for workload in WORKLOADS for design in GPU_DESIGNS]
    with open(path) as f:
        recording = json.load(f)["recording"]
    from rich.console import Console
    from rich.table import Table

    lat = _latency(args)
    table = Table(title=f"rollout on a GPU engine stand-in (A100, ~1.5B model: step {lat.step_ms} ms + "
                        f"{lat.per_sequence_ms} ms/seq + {lat.per_context_token_ns} ns/context token; "
                        f"{os.cpu_count()} cores here)")
    columns = ("workload", "design", "workers", "actions", "cells", "engine_calls", "generated_tokens",
               "prefilled_tokens", "steps", "mean_batch", "busy_seconds", "total_seconds", "after_start_over_busy",
               "cpu_seconds", "trajectories_per_second")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console(stderr=True).print(table)
    by = {(row["workload"], row["design"]): row for row in rows}
    ratios, fastest = {}, {}
    for workload in WORKLOADS:
        toolkit = by[workload, "toolkit"]["trajectories_per_second"]
        # The busy time of mathagent's turns: the same requests in whole-turn batches, the least generation
        # takes (a schedule that steps smaller batches is busy longer for the same tokens).
        batched = by[workload, "mathagent"]["busy_seconds"]
        for design in GPU_DESIGNS[1:]:
            row = by[workload, design]
            ratios[f"{workload}/{design}"] = {
                "over_toolkit_trajectories_per_second": round(row["trajectories_per_second"] / toolkit, 2),
                "after_start_over_busy": row["after_start_over_busy"],
                "after_start_over_turns_busy": round(row["after_start_seconds"] / batched, 3)}
        fastest[workload] = max(GPU_DESIGNS[1:], key=lambda d: by[workload, d]["trajectories_per_second"])
    for name, r in ratios.items():
        print(f"{name}: {r['over_toolkit_trajectories_per_second']}x the toolkit's trajectories/s; wall after "
              f"start {r['after_start_over_busy']}x the stand-in's busy time ({r['after_start_over_turns_busy']}x "
              f"that of whole-turn batches)", file=sys.stderr)
    summary = {
        "benchmark": "rollout",
        "regime": "gpu",
        "latency": asdict(lat),
        "cores": os.cpu_count(),
        "rows": rows,
        "ratios": ratios,
        "fastest_mathagent_design": fastest,
        "recording": _agreement(recording),
    }
    print(json.dumps(summary, indent=2))
    return None


def _agreement(recording: dict) -> dict:
    """How many requests each loop made, and how many of them the other loop made too (same prompt ids, seed
    and sampling) with the same completion: where the toolkit's re-rendered prompts equal mathagent's ids."""
    out = {}
    for workload in WORKLOADS:
        toolkit, ours = recording[f"{workload}/toolkit"], recording[f"{workload}/mathagent"]
        shared = toolkit.keys() & ours.keys()
        out[workload] = {"toolkit_requests": len(toolkit), "mathagent_requests": len(ours), "shared": len(shared),
                         "shared_same_tokens": sum(toolkit[k]["token_ids"] == ours[k]["token_ids"] for k in shared)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompt", default="tool")
    parser.add_argument("--tail-problems", type=int, default=128)
    parser.add_argument("--designs", default="toolkit,mathagent,mathagent-continuous")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=True,
                        help="also run mathagent through one local vLLM server (--backend openai)")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight to the server")
    parser.add_argument("--regime", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: the loops on in-process vLLM on this machine; gpu: on a GPU engine stand-in")
    parser.add_argument("--recording", help="gpu: the recording pass's file, reused while its options match "
                                             "(default: one in the mathagent cache named by what it depends on)")
    lat = Latency()
    for name, value in (("step_ms", lat.step_ms), ("per_sequence_ms", lat.per_sequence_ms),
                        ("per_context_token_ns", lat.per_context_token_ns),
                        ("prefill_ms_per_token", lat.prefill_ms_per_token)):
        parser.add_argument(f"--gpu-{name.replace('_', '-')}", type=float, default=value,
                            help="gpu: the latency model's constant (benchmarks/gpu_standin.py)")
    parser.add_argument("--gpu-max-num-seqs", type=int, default=lat.max_num_seqs)
    parser.add_argument("--gpu-max-batched-tokens", type=int, default=lat.max_batched_tokens)
    parser.add_argument("--stage", choices=("record", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--design", choices=GPU_DESIGNS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = resolve_model(args.model)
    if args.regime == "gpu":
        return gpu_main(args, model)
    with quiet_engines():
        open_engine("vllm", model, seed=0).close()  # warm the disk cache and compiled kernels for both
        rows = [run(design, model, args) for design in args.designs.split(",")]
    if args.server:
        # One server with the in-process engine's settings; its start (~20-40 s on a CPU) is not counted, as
        # a user's servers already run. Compared after start with the in-process rows.
        kv = int(os.environ["MATHAGENT_VLLM_KV_BYTES"])
        begun = time.perf_counter()
        with local_server(model, kv_cache_memory_bytes=kv) as url:
            server_start = time.perf_counter() - begun
            rows.append({**run("mathagent-server", model, args, base_url=url),
                         "server_start_seconds": round(server_start, 3)})
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout: {rows[0]['trajectories']} trajectories x up to {args.max_turns} turns, vLLM")
    columns = ("design", "actions", "cells", "engine_calls", "engine_start_seconds", "generation_seconds",
               "total_seconds", "after_start_over_generation", "trajectories_per_second",
               "trajectories_per_second_after_start")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console(stderr=True).print(table)
    by_design = {row["design"]: row for row in rows}
    toolkit, ours = by_design["toolkit"], by_design["mathagent"]
    with quiet_engines():
        engine = open_engine("vllm", model, seed=0)
        try:
            tail = [long_tailed(engine, args, schedule, slow) for slow in ("wait", "compute")
                    for schedule in ("turns", "continuous")]
        finally:
            engine.close()
    table = Table(title=f"long-tailed workload: {tail[0]['trajectories']} trajectories, 1 in 16 cells slow for "
                        f"{SLOW_CELL} s (waiting, or computing on the cores the engine uses)")
    for column in tail[0]:
        table.add_column(column)
    for row in tail:
        table.add_row(*(str(v) for v in row.values()))
    Console(stderr=True).print(table)
    summary = {
        "benchmark": "rollout",
        "rows": rows,
        "mathagent_over_toolkit_trajectories_per_second": round(
            ours["trajectories_per_second"] / toolkit["trajectories_per_second"], 2),
        "mathagent_after_start_over_generation": ours["after_start_over_generation"],
        # The engine's time grows when the loop overlaps its own work with generation (sessions started ahead
        # take cores from a CPU engine): against the toolkit's generation time, which nothing overlaps.
        "mathagent_after_start_over_toolkit_generation": round(
            (ours["total_seconds"] - ours["engine_start_seconds"]) / toolkit["generation_seconds"], 3),
        **({"mathagent_continuous_over_toolkit_trajectories_per_second": round(
            by_design["mathagent-continuous"]["trajectories_per_second"] / toolkit["trajectories_per_second"], 2)}
           if "mathagent-continuous" in by_design else {}),
        **({"server_over_inprocess_trajectories_per_second_after_start": round(
            by_design["mathagent-server"]["trajectories_per_second_after_start"]
            / ours["trajectories_per_second_after_start"], 2)} if "mathagent-server" in by_design else {}),
        "long_tailed": tail,
        # Slow cells that wait are what a GPU engine sees of cells computing on the CPU; on this CPU-only machine
        # the engine takes every core, so computing cells and generation cannot overlap under any schedule.
        "continuous_over_turns": round(tail[1]["trajectories_per_second"] / tail[0]["trajectories_per_second"], 2),
        "continuous_over_turns_computing_cells": round(
            tail[3]["trajectories_per_second"] / tail[2]["trajectories_per_second"], 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
