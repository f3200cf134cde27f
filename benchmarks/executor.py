"""The sandbox against the replay design, side by side, on a corpus of 4-turn trajectories.

The replay design is what an executor without persistent sessions does: every turn starts a fresh `python`
that replays all earlier cells of the trajectory (their output discarded) and then runs the new one. It gets
two concurrent subprocesses, one per core, as the sandbox gets `workers=2`.

    .venv/bin/python benchmarks/executor.py [--trajectories 32] [--workers 2] [--sessions 512]

It also measures the sandbox's own cost: 512 new trajectories of two trivial cells each, the wall time and
the CPU time per session (the machine's, and the sandbox's processes' and the caller's alone) and per warm cell.

Prints a table to stderr and a JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mathagent.sandbox import Cell, Sandbox

# Typical cells of a math agent: sympy solve/simplify, numpy, fractions, plain loops.
TURNS = (
    (
        "from sympy import symbols, solve\nx = symbols('x')\nroots = solve(x**2 - {a}*x + {b}, x)\nroots",
        "import sympy as sp\nn = sp.Symbol('n', integer=True)\ns = sp.summation(n**2, (n, 1, {a} + 5))\ns",
        "from sympy import Rational, simplify, sqrt\nexpr = simplify((sqrt({b}) + 1)**2 - 2*sqrt({b}))\nexpr",
    ),
    (
        "import numpy as np\nvals = np.array([complex(r) for r in roots])\n"
        "print(vals.sum().round(6), vals.prod().round(6))",
        "import numpy as np\nm = np.arange(1, 10).reshape(3, 3) + {a}\nprint(np.linalg.det(m).round(3))",
        "import numpy as np\nprint(np.mean([k**2 for k in range({a}, {a} + 50)]))",
    ),
    (
        "from fractions import Fraction\ntotal = sum(Fraction(1, k) for k in range(1, {n}))\nprint(total)",
        "import math\nprint(math.comb({n}, 3), math.gcd({a} * 12, {b} * 18))",
        "from sympy import factorint, isprime\nprint(factorint({a} * 360 + {b}), isprime({a} * 97 + 1))",
    ),
    (
        "count = 0\nfor i in range({m}):\n    if i % 3 == 0 or i % 5 == 0:\n        count += i\nprint(count)",
        "import itertools\nprint(sum(1 for p in itertools.permutations(range(6)) if p[0] < p[{k}]))",
        "from sympy import symbols, expand, factor\ny = symbols('y')\nprint(factor(expand((y + {a})**3 - {b})))",
    ),
)

REPLAY_RUNNER = r"""
import ast, contextlib, io, json, sys, traceback
cells = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
def run(code, show):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            tree = ast.parse(code)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
                if value is not None:
                    print(repr(value))
        except BaseException:
            print(traceback.format_exc().splitlines()[-1])
    if show:
        sys.stdout.write(out.getvalue())
for code in cells[:-1]:
    run(code, False)
run(cells[-1], True)
"""


def throughput(latencies: list[float], wall: float) -> dict:
    """Cells per second of wall time and the latency percentiles, the figures both designs report."""
    return {
        "cells": len(latencies),
        "wall_s": wall,
        "cells_per_s": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def corpus(trajectories: int) -> list[list[str]]:
    """Deterministic 4-turn trajectories: turn t of trajectory i uses template i % 3 with i's numbers."""
    out = []
    for i in range(trajectories):
        numbers = {"a": i % 7 + 2, "b": i % 5 + 1, "n": i % 20 + 10, "m": 1000 + 37 * i, "k": i % 5 + 1}
        first = i % 3
        out.append([TURNS[t][first if t < 2 else (first + t) % 3].format(**numbers) for t in range(4)])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_sandbox(trajectories: list[list[str]], workers: int) -> dict:
    started = time.perf_counter()
    with Sandbox(workers=workers, timeout=10) as sandbox:
        sandbox.run([Cell("warm-up", (), "1")])
        startup = time.perf_counter() - started
        sandbox.forget("warm-up")
        latencies, outputs = [], []
        started = time.perf_counter()
        for turn in range(4):
            cells = [Cell(f"traj-{i}", tuple(t[:turn]), t[turn]) for i, t in enumerate(trajectories)]
            results = sandbox.run(cells)
            latencies += [r.seconds for r in results]
            outputs += [r.output for r in results]
            assert all(r.status == "ok" for r in results), [r for r in results if r.status != "ok"][:3]
        wall = time.perf_counter() - started
        for i in range(len(trajectories)):
            sandbox.forget(f"traj-{i}")

        # A simple arithmetic cell alone, on a live session, end to end as the caller sees it: with a pause
        # between turns as when a model writes the next one, and back to back.
        history: tuple[str, ...] = ()
        paused, back_to_back = [], []
        for samples, pause in ((paused, 0.05), (back_to_back, 0.0)):
            for _ in range(60):
                time.sleep(pause)
                t0 = time.perf_counter()
                (result,) = sandbox.run([Cell("arithmetic", history, "1+1")])
                samples.append(time.perf_counter() - t0)
                assert result.output == "2"
                history += ("1+1",)
        fresh = []
        for k in range(30):  # a trajectory's first cell: a new session (from the zygote's spares)
            time.sleep(0.05)
            t0 = time.perf_counter()
            sandbox.run([Cell(f"fresh-{k}", (), "1+1")])
            fresh.append(time.perf_counter() - t0)
            sandbox.forget(f"fresh-{k}")
    return {
        **throughput(latencies, wall),
        "startup_s": startup,
        "arithmetic_p50_ms": 1000 * statistics.median(paused),
        "arithmetic_back_to_back_p50_ms": 1000 * statistics.median(back_to_back),
        "arithmetic_new_session_p50_ms": 1000 * statistics.median(fresh),
        "outputs": outputs,
    }


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent so far (/proc/stat): the sandbox's processes are not the caller's
    children, so this is how their cost is seen, the caller's threads included."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _, _, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """A process's CPU time with that of the children it has collected (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return sum(int(field) for field in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """`process_cpu_seconds` of `pid` and of every live process under it: the sandbox's process the caller
    started and, where that one is the shared supervisor, the zygote it forked before the imports."""
    parents = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                parents[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except OSError:
            continue
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += process_cpu_seconds(current)
        except OSError:
            continue
        stack.extend(child for child, parent in parents.items() if parent == current)
    return total


def bench_sessions(workers: int, sessions: int) -> dict:
    """The sandbox's own cost, without the cells' work: `sessions` new trajectories of two trivial cells each
    (a session start, then a warm cell), through `run` in one call per turn as a rollout makes them.

    Two measures of the CPU: the machine's (/proc/stat, the figure of earlier rounds: it counts whatever else
    the machine runs meanwhile) and the sandbox's own, exact on a busy machine: every process of the sandbox
    is collected by its parent up to the process this one started (the zygote, or the shared supervisor that
    collects the zygote), which this process collects at `close`, so RUSAGE_CHILDREN holds them all (sessions'
    exits included); minus what those had used before the measured turns
    (its imports, the warm-up session), plus the caller's own CPU time in the turns and the `forget`s."""
    children_before = own_cpu_seconds(resource.RUSAGE_CHILDREN)
    with Sandbox(workers=workers, timeout=10) as sandbox:
        sandbox.run([Cell("warm-up", (), "1")])
        sandbox.forget("warm-up")
        time.sleep(0.5)
        zygote_before = tree_cpu_seconds(sandbox.zygote_pid)
        caller_before = own_cpu_seconds(resource.RUSAGE_SELF)
        cpu, started = machine_cpu_seconds(), time.perf_counter()
        first = sandbox.run([Cell(f"s{i}", (), "x = 1") for i in range(sessions)])
        middle_cpu, middle = machine_cpu_seconds(), time.perf_counter()
        second = sandbox.run([Cell(f"s{i}", ("x = 1",), "x + 1") for i in range(sessions)])
        wall, cpu_total = time.perf_counter() - started, machine_cpu_seconds() - cpu
        warm_cpu, warm_wall = machine_cpu_seconds() - middle_cpu, time.perf_counter() - middle
        assert all(r.output == "2" for r in second) and all(r.status == "ok" for r in first)
        for i in range(sessions):
            sandbox.forget(f"s{i}")
        caller = own_cpu_seconds(resource.RUSAGE_SELF) - caller_before
    sandbox_processes = own_cpu_seconds(resource.RUSAGE_CHILDREN) - children_before - zygote_before
    return {
        "sessions": sessions,
        "wall_s": wall,
        "cpu_ms_per_session": 1000 * cpu_total / sessions,  # a start, two cells and their replies
        # the same from the sandbox's processes and the caller alone, their ends included
        "own_cpu_ms_per_session": 1000 * (sandbox_processes + caller) / sessions,
        "caller_cpu_ms_per_session": 1000 * caller / sessions,
        "cpu_ms_per_warm_cell": 1000 * warm_cpu / sessions,
        "warm_cells_per_s": sessions / warm_wall,
    }


def replay_once(cells: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", REPLAY_RUNNER],
        input=json.dumps(cells),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENBLAS_NUM_THREADS": "1"},
    )
    return time.perf_counter() - started, done.stdout.rstrip("\n")


def bench_replay(trajectories: list[list[str]], workers: int) -> dict:
    latencies, outputs = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = time.perf_counter()
        for turn in range(4):
            for seconds, output in pool.map(replay_once, [t[: turn + 1] for t in trajectories]):
                latencies.append(seconds)
                outputs.append(output)
        wall = time.perf_counter() - started
        arithmetic = [replay_once(["1+1"])[0] for _ in range(10)]
    return {
        **throughput(latencies, wall),
        "arithmetic_p50_ms": 1000 * statistics.median(arithmetic),
        "outputs": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=512, help="of the sandbox's own cost (two trivial cells each)")
    args = parser.parse_args()
    trajectories = corpus(args.trajectories)
    sessions = bench_sessions(args.workers, args.sessions)
    sandbox = bench_sandbox(trajectories, args.workers)
    replay = bench_replay(trajectories, args.workers)
    # Both designs must show the model the same thing, or the comparison means nothing.
    same = sum(a == b for a, b in zip(sandbox.pop("outputs"), replay.pop("outputs")))
    summary = {
        "trajectories": args.trajectories,
        "turns": 4,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "sandbox": sandbox,
        "replay": replay,
        "sandbox_cost": sessions,
        "throughput_ratio": sandbox["cells_per_s"] / replay["cells_per_s"],
        "identical_outputs": f"{same}/{sandbox['cells']}",
    }
    rows = [
        ("cells/s", "cells_per_s", "{:.1f}"),
        ("p50 cell ms", "p50_ms", "{:.1f}"),
        ("p99 cell ms", "p99_ms", "{:.1f}"),
        ("p50 `1+1` ms", "arithmetic_p50_ms", "{:.1f}"),
    ]
    print(f"{'':22}{'sandbox':>12}{'replay':>12}", file=sys.stderr)
    for label, key, fmt in rows:
        print(f"{label:22}{fmt.format(sandbox[key]):>12}{fmt.format(replay[key]):>12}", file=sys.stderr)
    print(f"throughput ratio: {summary['throughput_ratio']:.1f}x (target >= 5x)", file=sys.stderr)
    print(
        f"sandbox `1+1`: back to back {sandbox['arithmetic_back_to_back_p50_ms']:.1f} ms, new session "
        f"{sandbox['arithmetic_new_session_p50_ms']:.1f} ms; startup {sandbox['startup_s']:.2f} s; "
        f"identical outputs {summary['identical_outputs']}",
        file=sys.stderr,
    )
    print(
        f"sandbox's own cost, {sessions['sessions']} sessions x 2 trivial cells: {sessions['wall_s']:.2f} s, "
        f"{sessions['cpu_ms_per_session']:.1f} ms of the machine's CPU per session (start and both cells; "
        f"{sessions['own_cpu_ms_per_session']:.1f} ms its own, the caller's {sessions['caller_cpu_ms_per_session']:.1f} "
        f"ms of it), "
        f"{sessions['cpu_ms_per_warm_cell']:.2f} ms per warm cell ({sessions['warm_cells_per_s']:.0f} cells/s)",
        file=sys.stderr,
    )
    json.dump({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}, sys.stdout, default=str)
    print()


if __name__ == "__main__":
    main()
