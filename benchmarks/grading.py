"""Benchmark: this grader against math-verify alone, on the same answer pairs, side by side.

Pairs (gold, pred):
- MATH-500: each reference solution against its own `answer` (all should be equal);
- the screen: 2,000 seeded pairs of answers of different MATH-500 problems (almost all unequal);
- the rewritten answers: each MATH-500 answer against sympy's LaTeX of math-verify's parse of it (the same
  value written differently; unlabelled, since a parse can lose meaning, e.g. \text{(C)} -> c);
- the regression corpus data/grading_cases.jsonl (labelled).

math-verify alone is `math_verify.parse` + `math_verify.verify` with its defaults; it runs in the main
thread because its timeouts use signal.alarm. This grader is `Grader.is_equivalent` after `extract_answer`
for a full solution. Both timings include their start-up (imports, math-verify's first parse, the grader's
sympy worker). Prints a table on stderr and the JSON summary on stdout.

    python benchmarks/grading.py [--data ../shared/data/math500.jsonl] [--screen-pairs 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mathagent.answers import extract_answer  # noqa: E402
from mathagent.grading import Grader  # noqa: E402


def screen_pairs(answers: list[str], n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n seeded (i, j) index pairs of two different problems: the false-positive screen of the tests."""
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        i, j = rng.randrange(len(answers)), rng.randrange(len(answers))
        if i != j:
            pairs.append((i, j))
    return pairs


def build_pairs(data: Path, corpus: Path, n_screen: int) -> list[dict]:
    rows = [json.loads(line) for line in data.open()]
    pairs = [
        {"set": "math500_solutions", "gold": r["answer"], "pred_text": r["solution"], "equal": True} for r in rows
    ]
    answers = [r["answer"] for r in rows]
    pairs += [
        {"set": "screen", "gold": answers[i], "pred": answers[j], "equal": None}
        for i, j in screen_pairs(answers, n_screen)
    ]
    pairs += [{"set": "rewritten", "gold": gold, "pred": pred, "equal": None} for gold, pred in rewritten(answers)]
    for line in corpus.open():
        case = json.loads(line)
        pairs.append({"set": "corpus", "gold": case["gold"], "pred": case["pred"], "equal": case["equal"]})
    return pairs


def rewritten(answers: list[str]) -> list[tuple[str, str]]:
    """(answer, sympy.latex(parse(answer))) where the rendering differs from the answer."""
    import sympy
    from math_verify import parse

    out = []
    for answer in answers:
        parsed = parse(f"${answer}$")
        if not parsed or not isinstance(parsed[0], (sympy.Basic, sympy.MatrixBase)):
            continue
        try:
            latex = sympy.latex(parsed[0])
        except Exception:  # noqa: BLE001 - some parsed objects have no LaTeX printer
            continue
        if latex != answer:
            out.append((answer, latex))
    return out


def run_math_verify(pairs: list[dict]) -> tuple[list[bool], list[float], float]:
    start = time.perf_counter()
    from math_verify import parse, verify

    results, seconds = [], []
    for pair in pairs:
        t = time.perf_counter()
        gold = parse(f"${pair['gold']}$")
        pred = parse(pair["pred_text"]) if "pred_text" in pair else parse(f"${pair['pred']}$")
        results.append(bool(verify(gold, pred)))
        seconds.append(time.perf_counter() - t)
    return results, seconds, time.perf_counter() - start


def run_grader(pairs: list[dict]) -> tuple[list[bool], list[float], float, dict]:
    start = time.perf_counter()
    with Grader() as grader:
        results, seconds = [], []
        for pair in pairs:
            t = time.perf_counter()
            pred = extract_answer(pair["pred_text"]) if "pred_text" in pair else pair["pred"]
            results.append(grader.is_equivalent(pred, pair["gold"]))
            seconds.append(time.perf_counter() - t)
        stats = grader.stats.as_dict()
    return results, seconds, time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "math500.jsonl")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "grading_cases.jsonl")
    parser.add_argument("--screen-pairs", type=int, default=2000)
    parser.add_argument("--show", type=int, default=40, help="disagreements to list on stderr")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every timeout and parse failure

    pairs = build_pairs(args.data, args.corpus, args.screen_pairs)
    mv, mv_times, mv_seconds = run_math_verify(pairs)
    ours, our_times, our_seconds, stats = run_grader(pairs)

    by_set: dict[str, dict] = {}
    for pair, a, b, ta, tb in zip(pairs, ours, mv, our_times, mv_times):
        s = by_set.setdefault(pair["set"], {"pairs": 0, "agree": 0, "ours_equal": 0, "math_verify_equal": 0,
                                            "labelled": 0, "ours_right": 0, "math_verify_right": 0,
                                            "ours_seconds": 0.0, "math_verify_seconds": 0.0})
        s["pairs"] += 1
        s["ours_seconds"] += ta
        s["math_verify_seconds"] += tb
        s["agree"] += a == b
        s["ours_equal"] += a
        s["math_verify_equal"] += b
        if pair["equal"] is not None:
            s["labelled"] += 1
            s["ours_right"] += a == pair["equal"]
            s["math_verify_right"] += b == pair["equal"]
    disagreements = [
        {"set": p["set"], "gold": p["gold"], "pred": p.get("pred", "<solution>"), "ours": a, "math_verify": b,
         "label": p["equal"]}
        for p, a, b in zip(pairs, ours, mv)
        if a != b
    ]
    n = len(pairs)
    summary = {
        "pairs": n,
        "ours": {"seconds": round(our_seconds, 3), "pairs_per_s": round(n / our_seconds, 1), "stats": stats},
        "math_verify": {"seconds": round(mv_seconds, 3), "pairs_per_s": round(n / mv_seconds, 1)},
        "agreement": round(sum(a == b for a, b in zip(ours, mv)) / n, 4),
        "by_set": by_set,
        "disagreements": disagreements,
        "cpu_count": os.cpu_count(),
    }

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"grading: {n} pairs, agreement {summary['agreement']:.2%} (mv: math-verify)")
    for column in ("set", "pairs", "agree", "ours equal", "mv equal", "ours right", "mv right", "ours pairs/s", "mv pairs/s"):
        table.add_column(column, justify="right" if column != "set" else "left")
    for name, s in by_set.items():
        right = lambda k: f"{s[k]}/{s['labelled']}" if s["labelled"] else "-"  # noqa: E731
        table.add_row(name, str(s["pairs"]), str(s["agree"]), str(s["ours_equal"]), str(s["math_verify_equal"]),
                      right("ours_right"), right("math_verify_right"),
                      f"{s['pairs'] / s['ours_seconds']:.0f}", f"{s['pairs'] / s['math_verify_seconds']:.0f}")
    speed = Table(title="speed (one thread, start-up included)")
    for column in ("grader", "seconds", "pairs/s"):
        speed.add_column(column)
    speed.add_row("mathagent.grading", f"{our_seconds:.2f}", f"{n / our_seconds:.0f}")
    speed.add_row("math-verify", f"{mv_seconds:.2f}", f"{n / mv_seconds:.0f}")
    console = Console(stderr=True, width=130)
    console.print(table)
    console.print(speed)
    for d in disagreements[: args.show]:
        console.print(f"[{d['set']}] gold={d['gold']!r} pred={d['pred']!r} ours={d['ours']} "
                      f"math-verify={d['math_verify']} label={d['label']}", markup=False, highlight=False)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
