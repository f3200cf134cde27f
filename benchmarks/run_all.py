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


def main() -> int:
    names = sys.argv[1:] or sorted(p.stem for p in HERE.glob("*.py") if p.stem != "run_all")
    results, failed = {}, []
    for name in names:
        print(f"== benchmarks/{name}.py", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py")], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            failed.append(name)
            continue
        try:
            results[name] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            results[name] = {"stdout": proc.stdout[-2000:]}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
