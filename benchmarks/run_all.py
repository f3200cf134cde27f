"""`make bench`: every benchmark of benchmarks/, one after the other, each measured against its baseline in
the same run. Tables go to stderr; the JSON summaries are gathered into benchmarks/results.json (and stdout).

    python benchmarks/run_all.py [NAME ...]    # e.g. rollout executor
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Benchmarks run more than once, each time with these arguments, under these names; a file without a
# `__main__` block is a benchmark's component (gpu_standin.py), not a benchmark.
RUNS = {"rollout": {"rollout": [], "rollout-gpu": ["--regime", "gpu"]}}


def main() -> int:
    names = sys.argv[1:] or sorted(p.stem for p in HERE.glob("*.py")
                                   if p.stem != "run_all" and "__main__" in p.read_text(encoding="utf-8"))
    runs = [(label, name, args) for name in names for label, args in RUNS.get(name, {name: []}).items()]
    results, failed = {}, []
    for label, name, args in runs:
        print(f"== benchmarks/{name}.py {' '.join(args)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            failed.append(label)
            continue
        try:
            results[label] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            results[label] = {"stdout": proc.stdout[-2000:]}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
