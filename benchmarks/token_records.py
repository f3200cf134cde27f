"""Benchmark: what carrying token ids costs the records, against records without them, on the same trajectories.

Records with ids (`mathagent/tokens.py`, docs/records.md "Token ids") hold a trajectory's `prompt_ids`, every
later message's `token_ids` and each sampled action's `logprobs` (six decimals); the baseline is the same
records without those three fields, what trajectories were before. Measured side by side, as ratios:

- the trajectories' JSONL: bytes per trajectory (mean), the file's total, and its gzip size (level 6, as
  `gzip FILE` writes it). The gzip ratio overstates what the ids cost next to sampled text: the baseline
  here is templated text repeated across a problem's trajectories (they differ in one number), which
  compresses some 30x; the ids' own cost is the difference in gzip bytes per trajectory, most of it the
  log-probs' digits, which hardly compress;
- reading the whole file with `records.read_records`, with the fields and check `make-pairs` reads with;
- `pairs.make_pairs` with the default `PairConfig` (random, K = 8) over what was read, and the pairs file's size;
- training's encoding of those pairs (`PairObjective.encode_records`, i.e. `objectives.Encoder` on chosen
  and rejected): the recorded ids against rendering the chat template (`chat.tokenize_conversation`) for the
  same pairs with their ids stripped. This is the tokenization training pays before its first step; the
  forward and backward passes are the same size either way (same sequences, within the few tokens checked
  here), so they are not timed.

The trajectories are the demo task's (`tasks.arith`, prompt "tool"), --per-problem of each problem: its gold
solution (correct) and wrong ones whose final \\boxed{} answer is changed. Their ids are what rollout writes
for a sampled trajectory: `tokens.complete_ids` under the tiny model's tokenizer, the final action closed by
the end-of-turn token the model emits (intermediate actions stop at "```output", their turn's closing is in
the observation's ids), and random log-probs on every action id. The gold trajectory of a problem is
tokenized once; a wrong one re-encodes only its final action.

Under the tiny model's ChatML template the two encodings differ, by construction, in two places: the
rendering ends with the newline the template writes after the final end-of-turn token, which no model
samples, and it counts as an action token the end-of-turn token after each intermediate action, which the
model never wrote (it stopped at "```output"; the ids put that token in the observation's). The JSON's
`encodings` counts both.

Each timing is the best of --repeats rounds (default 3; training's encoding --encode-repeats, default 1:
its baseline takes some 20 s), the two kinds taking turns; the table shows this process's CPU time, steadier
than wall time on a shared machine (both are in the JSON). One Python thread; CPU only.

    python benchmarks/token_records.py [--n 10000] [--per-problem 4] [--repeats 3] [--encode-repeats 1]

Prints a table on stderr and the JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mathagent.pairs import PairConfig, check_outcome_fields, make_pairs, needs_grading  # noqa: E402
from mathagent.prompts import PROMPTS  # noqa: E402
from mathagent.records import LOGPROBS, PROMPT_IDS, TOKEN_IDS, RecordWriter, read_records  # noqa: E402
from mathagent.rewards import outcome_reward  # noqa: E402
from mathagent.tasks.arith import gold_trajectory, make_problems  # noqa: E402
from mathagent.tokens import complete_ids, drop_ids, given_action_ids  # noqa: E402

# What make-pairs asks of each trajectory it reads (stages.make_pairs).
PAIR_INPUT_FIELDS = ("id", "problem_id", "messages", "status")
# Wrong final answers: the gold answer plus one of these, a slip of a digit or a place.
SLIPS = (-100, -10, -2, -1, 1, 2, 10, 100)
# The encodings of a pair may differ by the template's text after the last end-of-turn (ids hold what was
# sampled, the rendering what the template writes); more than this is a bug in one of the two paths.
TOKEN_TOLERANCE = 0.05


# ---- the trajectories ------------------------------------------------------------------------------------


def sampled_logprobs(rng: random.Random, k: int) -> list[float]:
    """k log-probs shaped like a sampler's at temperature 1: mostly near 0, some far below."""
    return [round(-rng.expovariate(2.0), 6) for _ in range(k)]


def with_final_answer(tokenizer, trajectory: dict, problem_id: str, k: int, answer: str, correct: bool) -> dict:
    """Trajectory `k` of a problem: `trajectory` (tokenized) with its final action answering `answer`, the
    final action's ids encoded again and closed by the end-of-turn token, as a sampled one is."""
    messages = [dict(m) for m in trajectory["messages"]]
    final = len(messages) - 1
    messages[final]["content"] = f"The answer is \\boxed{{{answer}}}."
    messages[final][TOKEN_IDS] = given_action_ids(tokenizer, messages, final) + [tokenizer.eos_token_id]
    return {**trajectory, "id": f"{problem_id}-{k}", "messages": messages, "pred": answer, "correct": correct,
            "reward": outcome_reward(True, correct)}


def make_trajectories(tokenizer, n: int, per_problem: int, seed: int) -> list[dict]:
    """n demo-task trajectories with ids and log-probs, `per_problem` of each problem: the gold one, then wrong
    ones (distinct final answers)."""
    rng = random.Random(seed)
    out: list[dict] = []
    for problem in make_problems(math.ceil(n / per_problem), seed=seed):
        gold = gold_trajectory(problem, PROMPTS["tool"])
        for m in gold["messages"][2::2]:  # observations carry their cell's outcome, as rollout writes them
            m["outcome"] = {"status": "ok", "cut": False}
        complete_ids(tokenizer, gold)
        answer = int(problem["answer"])
        answers = [(str(answer), True)] + [(str(answer + d), False) for d in rng.sample(SLIPS, per_problem - 1)]
        for k, (pred, correct) in enumerate(answers):
            t = with_final_answer(tokenizer, gold, problem["id"], k, pred, correct)
            for m in t["messages"][1::2]:
                m[LOGPROBS] = sampled_logprobs(rng, len(m[TOKEN_IDS]))
            out.append(t)
    return out[:n]


def without_ids(record: dict, *fields: str) -> dict:
    """A copy of the record without its token ids (`prompt_ids`, and `token_ids` and `logprobs` of the
    messages of `fields`): the baseline record."""
    copy = {key: [dict(m) for m in value] if key in fields else value for key, value in record.items()}
    for name in fields:
        drop_ids(copy, name)
    return copy


# ---- measuring -------------------------------------------------------------------------------------------


def alternating(repeats: int, calls: dict[str, Callable[[], Any]]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Each call's result, and its fastest wall time and CPU time (this process's) over `repeats` rounds, the
    calls taking turns in each round, each started with no garbage left by the one before. The CPU time is
    the steadier figure on a shared machine."""
    results: dict[str, Any] = {}
    times = {kind: {"wall": math.inf, "cpu": math.inf} for kind in calls}
    for _ in range(repeats):
        for kind, call in calls.items():
            results[kind] = None
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            results[kind] = call()
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            times[kind] = {"wall": round(min(times[kind]["wall"], wall), 4),
                           "cpu": round(min(times[kind]["cpu"], cpu), 4)}
    return results, times


def write_jsonl(path: Path, records: list[dict]) -> dict:
    """Write records as the stages do (`RecordWriter`); the file's sizes."""
    with RecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    data = path.read_bytes()
    packed = len(gzip.compress(data, compresslevel=6))
    return {"bytes": len(data), "bytes_per_record": round(len(data) / len(records), 1), "gzip_bytes": packed,
            "gzip_bytes_per_record": round(packed / len(records), 1)}


def read_trajectories(path: Path) -> list[dict]:
    return list(read_records(str(path), required=PAIR_INPUT_FIELDS, check=check_outcome_fields))


def parse_only(path: Path) -> list[dict]:
    """The JSON decoding alone of what `read_trajectories` reads: the rest of its time is the checks."""
    with path.open("rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_pairs(tokenizer, pairs: list[dict], output_dir: str):
    """Training's encoding of the pairs (train-mdpo's objective), with a fresh Encoder (no cached prompts)."""
    from mathagent.objectives import PairObjective
    from mathagent.train_config import TrainConfig

    objective = PairObjective(TrainConfig(model="tiny", output_dir=output_dir))
    objective.setup(tokenizer)
    return objective.encode_records(pairs)


def compare_encodings(from_ids: list, rendered: list) -> dict:
    """Per pair (chosen + rejected), the two paths' tokens and action tokens, the largest relative difference of
    their token counts, and the share of pairs whose ids are the same (wholly, or as a prefix of the
    rendering: the template writes text after the last action that was never sampled) and whose action
    tokens (the mask-1 ids) are the same."""
    if [e.id for e in from_ids] != [e.id for e in rendered]:
        raise SystemExit("the two encodings kept different pairs")
    tokens = {"ids": 0, "rendered": 0}
    actions = {"ids": 0, "rendered": 0}
    worst = 0.0
    same_ids = prefix = same_actions = 0
    for a, b in zip(from_ids, rendered):
        rows_a = [r for s in a.sequences for r in s.rows()]
        rows_b = [r for s in b.sequences for r in s.rows()]
        na, nb = sum(len(r.input_ids) for r in rows_a), sum(len(r.input_ids) for r in rows_b)
        tokens["ids"] += na
        tokens["rendered"] += nb
        actions["ids"] += sum(s.actions for s in a.sequences)
        actions["rendered"] += sum(s.actions for s in b.sequences)
        worst = max(worst, abs(nb - na) / na)
        aligned = len(rows_a) == len(rows_b)
        same_ids += aligned and all(x.input_ids == y.input_ids for x, y in zip(rows_a, rows_b))
        prefix += aligned and all(y.input_ids[: len(x.input_ids)] == x.input_ids for x, y in zip(rows_a, rows_b))
        same_actions += [t for r in rows_a for t, m in zip(r.input_ids, r.action_mask) if m] == [
            t for r in rows_b for t, m in zip(r.input_ids, r.action_mask) if m]
    n = len(from_ids)
    return {
        "pairs": n,
        "tokens_per_pair": {k: round(v / n, 2) for k, v in tokens.items()},
        "action_tokens_per_pair": {k: round(v / n, 2) for k, v in actions.items()},
        "max_token_difference": round(worst, 4),
        "identical_ids_share": round(same_ids / n, 4),
        "ids_prefix_of_rendering_share": round(prefix / n, 4),
        "identical_action_tokens_share": round(same_actions / n, 4),
    }


def id_field_bytes(trajectories: list[dict]) -> dict:
    """Mean JSON bytes per trajectory of each token-id field's values (keys and separators not counted)."""
    sizes = {PROMPT_IDS: 0, TOKEN_IDS: 0, LOGPROBS: 0}
    for t in trajectories:
        sizes[PROMPT_IDS] += len(json.dumps(t[PROMPT_IDS]))
        for m in t["messages"]:
            for name in (TOKEN_IDS, LOGPROBS):
                if name in m:
                    sizes[name] += len(json.dumps(m[name]))
    return {name: round(size / len(trajectories), 1) for name, size in sizes.items()}


# ---- the run ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="trajectories")
    parser.add_argument("--per-problem", type=int, default=4,
                        help="trajectories per problem (1 correct, the rest wrong)")
    parser.add_argument("--repeats", type=int, default=3, help="reading and pairing: the best of this many rounds")
    parser.add_argument("--encode-repeats", type=int, default=1, help="training's encoding: the best of this many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 2 <= args.per_problem <= len(SLIPS) + 1:
        parser.error(f"--per-problem must be in 2..{len(SLIPS) + 1}")
    if args.n < args.per_problem or args.repeats < 1 or args.encode_repeats < 1:
        parser.error("--n must be at least --per-problem, and the repeats at least 1")

    from transformers import AutoTokenizer

    from mathagent.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    start = time.perf_counter()
    trajectories = {"ids": make_trajectories(tokenizer, args.n, args.per_problem, args.seed)}
    trajectories["none"] = [without_ids(t, "messages") for t in trajectories["ids"]]
    made_in = time.perf_counter() - start
    # The trajectories in memory are the benchmark's, not the stages': frozen, the garbage collector's full
    # passes during a timed call do not walk them (a stage holds only what it reads).
    gc.collect()
    gc.freeze()
    config = PairConfig()
    if any(needs_grading(t, config) for t in trajectories["ids"]):
        raise SystemExit("some trajectory needs grading: the benchmark gives every one its grade")

    kinds = ("none", "ids")  # without ids (the baseline), with ids
    runs: dict[str, dict] = {kind: {} for kind in kinds}
    pairs: dict[str, list[dict]] = {}
    examples: dict[str, list] = {}

    def timed(name: str, call: Callable[[str], Any], repeats: int) -> dict[str, Any]:
        results, times = alternating(repeats, {kind: (lambda kind=kind: call(kind)) for kind in kinds})
        for kind in kinds:
            runs[kind][f"{name}_seconds"] = times[kind]
        return results

    with tempfile.TemporaryDirectory() as tmp:
        paths = {kind: Path(tmp) / f"trajectories-{kind}.jsonl" for kind in kinds}
        for kind in kinds:
            runs[kind]["trajectories_file"] = write_jsonl(paths[kind], trajectories[kind])
        timed("parse", lambda kind: parse_only(paths[kind]), args.repeats)
        read = timed("read", lambda kind: read_trajectories(paths[kind]), args.repeats)
        made = timed("pair", lambda kind: make_pairs(read[kind], config), args.repeats)
        for kind in kinds:
            pairs[kind], stats = made[kind]
            if stats.graded or stats.written == 0:
                raise SystemExit(f"make_pairs graded {stats.graded} and wrote {stats.written}")
            runs[kind]["pairs_file"] = write_jsonl(Path(tmp) / f"pairs-{kind}.jsonl", pairs[kind])
        # The baseline of training: the pairs with ids, their ids stripped (the same as make-pairs of the
        # trajectories without ids: checked).
        stripped = [without_ids(p, "chosen", "rejected") for p in pairs["ids"]]
        if stripped != pairs["none"]:
            raise SystemExit("the pairs with their ids stripped differ from the pairs of the trajectories without ids")
        training = {"none": stripped, "ids": pairs["ids"]}
        encoded = timed("encode", lambda kind: encode_pairs(tokenizer, training[kind], tmp), args.encode_repeats)
        for kind in kinds:
            examples[kind], report = encoded[kind]
            runs[kind]["encode_report"] = vars(report)
    if runs["ids"]["encode_report"]["from_ids"] != 2 * len(pairs["ids"]) or runs["none"]["encode_report"]["from_ids"]:
        raise SystemExit(f"the encodings did not take the paths meant: {runs['ids']['encode_report']} "
                         f"{runs['none']['encode_report']}")
    agreement = compare_encodings(examples["ids"], examples["none"])
    if agreement["max_token_difference"] > TOKEN_TOLERANCE:
        raise SystemExit(f"a pair's token counts differ by {agreement['max_token_difference']:.1%} between the "
                         f"two encodings (more than {TOKEN_TOLERANCE:.0%})")

    rows = [  # (the ratio's key in the JSON, the table's label, the figure's path in a run, its format)
        ("trajectory_bytes", "trajectory JSONL, bytes/trajectory",
         ("trajectories_file", "bytes_per_record"), "{:,.0f}"),
        (None, "trajectory JSONL, total MB", ("trajectories_file", "bytes"), "mb"),
        ("trajectory_gzip_bytes", "trajectory JSONL gzip, bytes/trajectory",
         ("trajectories_file", "gzip_bytes_per_record"), "{:,.0f}"),
        (None, "trajectory JSONL gzip, total MB", ("trajectories_file", "gzip_bytes"), "mb"),
        ("read_cpu_seconds", "read_records, CPU s", ("read_seconds", "cpu"), "{:.2f}"),
        ("parse_cpu_seconds", "  of which json.loads, CPU s", ("parse_seconds", "cpu"), "{:.2f}"),
        ("pair_cpu_seconds", "make_pairs, CPU s", ("pair_seconds", "cpu"), "{:.2f}"),
        ("pairs_bytes", "pairs JSONL, bytes/pair", ("pairs_file", "bytes_per_record"), "{:,.0f}"),
        (None, "pairs JSONL, total MB", ("pairs_file", "bytes"), "mb"),
        ("pairs_gzip_bytes", "pairs JSONL gzip, bytes/pair", ("pairs_file", "gzip_bytes_per_record"), "{:,.0f}"),
        (None, "pairs JSONL gzip, total MB", ("pairs_file", "gzip_bytes"), "mb"),
        ("encode_cpu_seconds", "training's encoding, CPU s", ("encode_seconds", "cpu"), "{:.2f}"),
    ]
    walls = [(f"{name}_wall_seconds", (f"{name}_seconds", "wall")) for name in ("read", "parse", "pair", "encode")]

    def value(kind: str, path: tuple[str, ...]) -> float:
        out = runs[kind]
        for key in path:
            out = out[key]
        return out

    def ratio(path: tuple[str, ...]) -> float:
        return round(value("ids", path) / value("none", path), 3)

    summary = {
        "trajectories": len(trajectories["ids"]),
        "problems": len({t["problem_id"] for t in trajectories["ids"]}),
        "pairs": len(pairs["ids"]),
        "id_field_bytes_per_trajectory": id_field_bytes(trajectories["ids"]),
        "without_ids": runs["none"],
        "with_ids": runs["ids"],
        "ratio": {**{key: ratio(path) for key, _, path, _ in rows if key},
                  **{key: ratio(path) for key, path in walls}},
        "encodings": agreement,
        "note": "training's forward/backward reads the same sequences either way, to the few tokens of "
                "encodings.max_token_difference; only the tokenization before the first step differs",
        "make_seconds": round(made_in, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "repeats": args.repeats,
        "encode_repeats": args.encode_repeats,
        "cpu_count": os.cpu_count(),
    }

    from rich.console import Console
    from rich.table import Table

    def shown(x: float, unit: str) -> str:
        return f"{x / 1e6:.2f}" if unit == "mb" else unit.format(x)

    table = Table(title=f"token ids in records: {summary['trajectories']:,} trajectories of {summary['problems']:,} "
                        f"problems, {summary['pairs']:,} pairs")
    for column in ("metric", "without ids", "with ids", "ratio"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for _, label, path, unit in rows:
        table.add_row(label, shown(value("none", path), unit), shown(value("ids", path), unit), f"{ratio(path):.2f}x")
    per_pair = agreement["tokens_per_pair"]
    action_tokens = agreement["action_tokens_per_pair"]
    table.add_row("tokens/pair (chosen + rejected)", f"{per_pair['rendered']:.1f}", f"{per_pair['ids']:.1f}",
                  f"{per_pair['ids'] / per_pair['rendered']:.3f}x")
    table.add_row("action tokens/pair", f"{action_tokens['rendered']:.1f}", f"{action_tokens['ids']:.1f}",
                  f"{action_tokens['ids'] / action_tokens['rendered']:.3f}x")
    console = Console(stderr=True, width=120)
    console.print(table)
    fields = summary["id_field_bytes_per_trajectory"]
    console.print("bytes/trajectory of the id fields: " + ", ".join(f"{k} {v:,.0f}" for k, v in fields.items()),
                  highlight=False)
    console.print(f"pairs whose recorded ids are the rendering's: {agreement['identical_ids_share']:.1%} identical, "
                  f"{agreement['ids_prefix_of_rendering_share']:.1%} a prefix of it, "
                  f"{agreement['identical_action_tokens_share']:.1%} with the same action tokens; token counts "
                  f"within {agreement['max_token_difference']:.1%}. Training's forward/backward is the same size "
                  "either way, to that difference.", highlight=False)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
