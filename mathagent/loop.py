"""The online iterative loop (Xiong et al. 2024, Algorithm 1) as the Makefile runs it: its bookkeeping.

The loop itself is the Makefile (`make iterations RUN=... N=3`): per iteration k, sample with pi_{k-1},
grade, pair, train pi_k with M-DPO, evaluate pi_k on held-out problems, each stage a file target. This module
is what the Makefile should not write in shell:

    python -m mathagent.loop stage DIR -- mathagent rollout ...   run one stage, log it, record argv and time
    python -m mathagent.loop sample DIR --mixture 0.7,1.0 ... -- mathagent rollout ...   one sampling strategy
    python -m mathagent.loop problems --task arith --split train --n 256 --seed 1 -o train.jsonl
    python -m mathagent.loop policy --out DIR                     the demo's warm-start SFT policy (cached)
    python -m mathagent.loop eval-json DIR                        DIR/eval.json from its two evaluations
    python -m mathagent.loop manifest DIR KEY=VALUE...            DIR/manifest.json
    python -m mathagent.loop report DIR                           the paper's table, a plot, summary.json
    python -m mathagent.loop compare A=DIR B=DIR --plot X.png     runs side by side (an ablation), a plot

Every file it writes is written beside and renamed, so a killed run never leaves half a file that make would
take as finished. A user's mistake is one line on stderr and exit code 2, as in `mathagent` (`errors.user_errors`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import typer
from rich.console import Console
from rich.table import Table

from mathagent.errors import UserError, user_errors
from mathagent.records import atomic_path, read_records, write_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Bookkeeping of the Makefile's online iterative loop.")
# A pipe or a log (not a terminal) gets the table unwrapped, as wide as it is.
console = Console(stderr=True, soft_wrap=True, highlight=False, width=None if sys.stderr.isatty() else 120)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """`app.command`, run inside `errors.user_errors()`: a user's mistake is one line and exit code 2."""
    def register(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def run(*call_args: Any, **call_kwargs: Any) -> None:
            with user_errors():
                function(*call_args, **call_kwargs)

        app.command(*args, **kwargs)(run)
        return function

    return register


STAGES_FILE = "stages.jsonl"
MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """One digest of a file, or of a directory's files (names and contents; checkpoints and logs left out)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(("checkpoints/", "logs/")) or relative.endswith(".log"):
            continue
        digest.update(relative.encode() + b"\0" + sha256_file(file).encode() + b"\0")
    return digest.hexdigest()


# ---- stage: run one stage's command ------------------------------------------------------------------------


def stage_name_of(command: list[str]) -> str:
    """`mathagent rollout ...` -> rollout; `python -m mathagent.cli train-mdpo` -> train-mdpo."""
    words = [w for w in command if not w.startswith("-")]
    for i, word in enumerate(words):
        if Path(word).name == "mathagent" or word in ("mathagent.cli",):
            return words[i + 1] if i + 1 < len(words) else Path(word).name
    return Path(command[0]).name


@command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def stage(
    ctx: typer.Context,
    directory: Annotated[str, typer.Argument(help="The iteration's directory: the log and stages.jsonl go there.")],
    name: Annotated[str | None, typer.Option("--name", help="Stage name (default: the mathagent subcommand).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", envvar="VERBOSE", help="Show the command's own stderr (progress bars, per-step lines) instead of logging it.")] = False,
    also: Annotated[list[str] | None, typer.Option("--also", help="Another iteration's directory the command also writes for (a rollout --job): the stage is recorded there too, its seconds counted in DIR only.")] = None,
) -> None:
    """Run COMMAND (after `--`) as one stage: its stderr goes to DIR/logs/NAME.log (or the terminal with
    --verbose), one line per stage to the terminal, and on success {stage, command, seconds} to
    DIR/stages.jsonl. Exits with the command's exit code; a failure shows the end of its log."""
    _run_stage(Path(directory), _after_dashes(ctx.args), name, verbose, [Path(d) for d in also or ()])


def _after_dashes(args: list[str]) -> list[str]:
    command = list(args)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("no command after --")
    return command


def _run_stage(folder: Path, command: list[str], name: str | None, verbose: bool, also: list[Path] = ()) -> None:
    """`stage`'s work: run `command`, log it under folder/logs/, record it in folder/stages.jsonl."""
    stage_name = name or stage_name_of(command)
    for directory in (folder / "logs", *also):  # the command writes into them
        directory.mkdir(parents=True, exist_ok=True)
    log_path = folder / "logs" / f"{stage_name}.log"
    label = f"{folder}  {stage_name}"
    if verbose or console.is_terminal:  # on a terminal the line is overwritten by the result
        console.print(f"{label} ...", end="\n" if verbose else "\r")
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        # stdout: the stages write their records with -o (or --json); what is left there (train-mdpo's summary,
        # also in its output dir) goes to the log, so the terminal shows one line per stage.
        proc = subprocess.run(command, stdout=log, stderr=None if verbose else log)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        console.print(f"{label}  [red]failed[/red] (exit {proc.returncode}) after {seconds:.1f} s; log: {log_path}")
        if not verbose:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            for line in tail:
                console.print(f"  | {line}", markup=False)
        raise typer.Exit(proc.returncode)
    console.print(f"{label}  {seconds:6.1f} s")
    entry = {"stage": stage_name, "command": shlex.join(command), "seconds": round(seconds, 3),
             "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(folder / STAGES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    for other in also:
        with open(other / STAGES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({**entry, "seconds": 0.0, "shared_with": str(folder), "shared_seconds": entry["seconds"]}) + "\n")


# ---- sample: an iteration's training samples, one strategy ------------------------------------------------

POLICY_ROLES = ("current", "previous", "sft")


class Component(NamedTuple):
    policy: str  # one of POLICY_ROLES
    temperature: float
    n: int  # samples per problem


def parse_mixture(spec: str, n: int) -> list[Component]:
    """A sampling strategy: comma-separated `[POLICY:]TEMPERATURE` components (POLICY current, previous or
    sft; current when left out), the n samples of each problem split evenly among them, in order."""
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise UserError(f"--mixture {spec!r}: give [POLICY:]TEMPERATURE components separated by commas")
    if n % len(items):
        raise UserError(f"--mixture {spec!r}: {len(items)} components do not split --n {n} samples evenly")
    components = []
    for item in items:
        role, _, temperature = item.rpartition(":")
        role = role or "current"
        if role not in POLICY_ROLES:
            raise UserError(f"--mixture {spec!r}: policy {role!r}: choose from {', '.join(POLICY_ROLES)}")
        try:
            value = float(temperature)
        except ValueError:
            raise UserError(f"--mixture {spec!r}: temperature {temperature!r} is not a number") from None
        if value <= 0:
            raise UserError(f"--mixture {spec!r}: temperature {temperature}: sampling needs one above 0")
        components.append(Component(role, value, n // len(items)))
    return components


def merge_samples(parts: list[tuple[Component, str, Path]], n: int) -> list[dict[str, Any]]:
    """The parts' trajectories as one rollout of n samples per problem, problem by problem in the first part's
    order: ids renumbered `{problem_id}-{k}` across the parts, and each one's `sampler` (policy, model,
    temperature) recorded."""
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for component, model, path in parts:
        for record in read_records(str(path), required=("id", "problem_id")):
            record["sampler"] = {"policy": component.policy, "model": model, "temperature": component.temperature}
            by_problem.setdefault(str(record["problem_id"]), []).append(record)
    merged = []
    for problem_id, records in by_problem.items():
        if len(records) != n:
            raise UserError(f"problem {problem_id}: {len(records)} samples in the parts, expected {n}")
        for k, record in enumerate(records):
            record["id"] = f"{problem_id}-{k}"
            merged.append(record)
    return merged


def informative_groups(path: str | os.PathLike) -> int:
    """The problems of a rollout whose samples' rewards differ: the groups GRPO learns from."""
    rewards: dict[str, set] = {}
    for record in read_records(str(path), required=("id", "problem_id")):
        rewards.setdefault(str(record["problem_id"]), set()).add(record.get("reward"))
    return sum(1 for values in rewards.values() if len(values) > 1 and None not in values)


def next_round(wanted: int, found: int, taken: int) -> int:
    """How many more problems a round of `sample --groups` takes: enough for the groups still wanted at the
    rate found so far (at least 1 in 8 assumed), the first round `wanted`."""
    if taken == 0:
        return wanted
    rate = max(found / taken, 1 / 8)
    return math.ceil((wanted - found) / rate)


@command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sample(
    ctx: typer.Context,
    directory: Annotated[str, typer.Argument(help="The iteration's directory (stage logs, as `stage`).")],
    problems: Annotated[str, typer.Option("--problems", help="The training problems the rollout reads.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The iteration's trajectories (JSONL, written atomically).")],
    mixture: Annotated[str, typer.Option("--mixture", help="The strategy: [POLICY:]TEMPERATURE components, comma-separated (POLICY: current, previous or sft).")],
    n: Annotated[int, typer.Option("--n", help="Samples per problem, split evenly among the components.")],
    seed: Annotated[int, typer.Option("--seed", help="The rollout seed (component i: seed + 1000 i).")],
    policies: Annotated[list[str], typer.Option("--policy", help="ROLE=MODEL for current (pi_{k-1}), previous (pi_{k-2}) and sft (pi_0).")],
    groups: Annotated[int, typer.Option("--groups", help="Sample problems (in a seeded order, round after round) until this many have samples whose rewards differ, or the problems run out (DAPO's dynamic sampling); 0: every problem, once.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", envvar="VERBOSE", help="As `stage`.")] = False,
) -> None:
    """Sample an iteration's training trajectories with one strategy (Xiong et al. 2024, Figure 4): run
    COMMAND (a `mathagent rollout` without its input, --model, --temperature, --n, --seed and -o, after `--`)
    once per component of --mixture on --problems, each resumable, then merge them into --output
    (`merge_samples`). One component (a plain temperature) is a single rollout straight into --output. With
    --groups G the problems are taken in rounds (`next_round`) until G of them have samples that disagree,
    each round's rollouts kept beside --output, so a killed stage resumes its round."""
    command = _after_dashes(ctx.args)
    models = {}
    for item in policies:
        role, sep, model = item.partition("=")
        if not sep or role not in POLICY_ROLES or not model:
            raise UserError(f"--policy {item!r}: give ROLE=MODEL, ROLE one of {', '.join(POLICY_ROLES)}")
        models[role] = model
    components = parse_mixture(mixture, n)
    missing = sorted({c.policy for c in components} - set(models))
    if missing:
        raise UserError(f"--mixture {mixture!r} samples {', '.join(missing)}: give --policy {missing[0]}=MODEL")
    if groups < 0:
        raise UserError(f"--groups {groups}: must be 0 (every problem) or more")
    folder = Path(directory)
    if not groups:
        _sample_with(folder, command, problems, output, components, models, n, seed, "", verbose)
        return
    pool = list(read_records(problems, required=("id",)))
    random.Random(f"{seed}/groups").shuffle(pool)
    rounds: list[Path] = []
    taken = found = 0
    while found < groups and taken < len(pool):
        batch = pool[taken : taken + next_round(groups, found, taken)]
        r = len(rounds)
        part = Path(output).with_suffix(f".round{r}.jsonl")
        if not part.exists():
            subset = part.with_suffix(".problems.jsonl")
            write_atomic(subset, "".join(json.dumps(p) + "\n" for p in batch))
            _sample_with(folder, command, str(subset), str(part), components, models, n, seed + 100_000 * r,
                         f"-round{r}", verbose)
            subset.unlink()
        rounds.append(part)
        taken += len(batch)
        found += informative_groups(part)
    write_atomic(output, "".join(part.read_text(encoding="utf-8") for part in rounds))
    for part in rounds:
        part.unlink()
    console.print(f"{output}: {taken} problems in {len(rounds)} round(s), {found} of them with samples that "
                  f"disagree ({groups} wanted)")


def _sample_with(folder: Path, command: list[str], problems: str, output: str, components: list[Component],
                 models: dict[str, str], n: int, seed: int, suffix: str, verbose: bool) -> None:
    """`sample`'s one strategy on one problem file: a rollout per component, merged into `output`."""
    if len(components) == 1:
        only = components[0]
        _run_stage(folder, [*command, problems, "--model", models[only.policy], "--temperature",
                            str(only.temperature), "--n", str(n), "--seed", str(seed), "--resume", "-o", output],
                   f"rollout{suffix}" if suffix else None, verbose)
        return
    parts = []
    for i, component in enumerate(components):
        part = Path(output).with_suffix(f".part{i}.jsonl")
        _run_stage(folder, [*command, problems, "--model", models[component.policy], "--temperature",
                            str(component.temperature), "--n", str(component.n), "--seed", str(seed + 1000 * i),
                            "--resume", "-o", str(part)], f"rollout{suffix}-{i}", verbose)
        parts.append((component, models[component.policy], part))
    write_atomic(output, "".join(json.dumps(r) + "\n" for r in merge_samples(parts, n)))
    for _, _, part in parts:
        part.unlink()
    console.print(f"{output}: {n} samples per problem from {', '.join(f'{c.policy}:{c.temperature}' for c in components)}")


# ---- problems and the warm-start policy -------------------------------------------------------------------


@command()
def problems(
    output: Annotated[str, typer.Option("--output", "-o", help="Problem records (JSONL, written atomically).")],
    task: Annotated[str, typer.Option("--task", help="arith (the embedded family), gsm8k or math.")] = "arith",
    split: Annotated[str, typer.Option("--split", help="arith: train or heldout (disjoint by construction); gsm8k/math: the data set's split.")] = "train",
    n: Annotated[int | None, typer.Option("--n", help="How many problems (arith: required; others: the first N).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="arith: the generator's seed.")] = 0,
    path: Annotated[str | None, typer.Option("--path", help="gsm8k/math: a local JSONL file of the data set's rows (default: the hub).")] = None,
    demos: Annotated[bool, typer.Option("--demos", help="arith: write the SFT demonstrations (arith.demonstrations, trajectories for train-sft) instead of problems.")] = False,
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt of the demonstrations (as rollout's --prompt).")] = "bare",
) -> None:
    """Write a problem file for rollout (or, with --demos, the demonstrations train-sft warm-starts on)."""
    from mathagent.prompts import load_prompt
    from mathagent.tasks import arith, load_problems

    if task == "arith":
        if n is None or n < 1:
            raise UserError("--task arith needs --n (at least 1)")
        if split not in arith.SPLITS:
            raise UserError(f"--split {split!r}: arith has {', '.join(arith.SPLITS)}")
        if demos:
            rows = arith.demonstrations(n, seed=seed, prompt=load_prompt("--prompt", prompt))
        else:
            rows = arith.make_problems(n, seed=seed, split=split)
    else:
        if demos:
            raise UserError("--demos: only the arith task has demonstrations")
        rows = load_problems(task, path, split=split, limit=n)
    write_atomic(output, "".join(json.dumps(r) + "\n" for r in rows))
    console.print(f"{output}: {len(rows)} {'demonstrations' if demos else 'problems'}")


@command()
def policy(
    out: Annotated[str, typer.Option("--out", help="Where the SFT policy goes (a copy of the cached build).")],
    demos: Annotated[int, typer.Option("--demos", help="Demonstrations to train on (arith.demonstrations, train split).")] = 3000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the base model, the demonstrations and the SFT order.")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="SFT optimizer steps.")] = 700,
    batch_size: Annotated[int, typer.Option("--batch-size", help="SFT batch size.")] = 32,
    learning_rate: Annotated[float, typer.Option("--lr", help="SFT learning rate.")] = 3e-3,
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt the policy learns to answer (as rollout's --prompt).")] = "bare",
) -> None:
    """The demo's starting policy pi_0: a random tiny Llama (digit-level tokenizer) warm-started with
    `mathagent train-sft` on demonstrations of the arith task (`arith.demonstrations`: with the tool, or,
    when the numbers look small, the answer alone).

    Built once per content hash (the demonstrations, the tiny build's version and every SFT setting) under
    $MATHAGENT_CACHE, then copied to --out; a second run with the same settings only copies (`tiny.sft_policy`).
    """
    from mathagent.prompts import load_prompt
    from mathagent.tiny import sft_policy

    template = load_prompt("--prompt", prompt)
    try:
        built = sft_policy(out, prompt=template, demos=demos, seed=seed, steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, log=console.print)
    except subprocess.CalledProcessError as e:  # train-sft's own failure: its log, and its exit code
        console.print(f"train-sft failed (exit {e.returncode}):", markup=False)
        console.print(e.output, markup=False)
        raise typer.Exit(e.returncode) from None
    console.print(f"{Path(out)}: the SFT policy (cached as {built})")


# ---- evaluations and manifests -----------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _first(mapping: dict[str, Any] | None, key: str) -> Any:
    return None if not mapping else mapping.get(key)


@command("eval-json")
def eval_json(directory: Annotated[str, typer.Argument(help="An iteration's directory with greedy.json and sampled.json.")]) -> None:
    """DIR/eval.json: the held-out greedy accuracy and the sampled pass@1 / maj@k, from `mathagent evaluate`'s
    two summaries (greedy.json, sampled.json), which it keeps in full."""
    folder = Path(directory)
    greedy, sampled = _load_json(folder / "greedy.json"), _load_json(folder / "sampled.json")
    if greedy is None or sampled is None:
        raise UserError(f"{folder} needs greedy.json and sampled.json")
    ks = sorted(int(k) for k in sampled.get("maj@k", {}))
    k = ks[-1] if ks else 1
    summary = {
        "accuracy": greedy["accuracy"], "problems": greedy["problems"],
        "sampled": {"pass@1": sampled["pass@k"].get("1"), "k": k, f"maj@{k}": sampled["maj@k"].get(str(k)),
                    f"pass@{k}": sampled["pass@k"].get(str(k)), "trajectories": sampled["trajectories"]},
        "greedy_report": greedy, "sampled_report": sampled,
    }
    write_atomic(folder / "eval.json", json.dumps(summary, indent=2) + "\n")


@command()
def manifest(
    directory: Annotated[str, typer.Argument(help="The iteration's directory.")],
    settings: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE: the configuration (the Makefile's variables).")] = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", help="A file or model directory the iteration read; its sha256 is recorded.")] = None,
) -> None:
    """DIR/manifest.json: configuration, commands and wall time of every stage, input hashes, metrics."""
    folder = Path(directory)
    config = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{item!r}: expected KEY=VALUE")
        config[key] = value
    stages = []
    if (folder / STAGES_FILE).is_file():
        stages = [json.loads(line) for line in (folder / STAGES_FILE).read_text().splitlines() if line.strip()]
    hashes = {}
    for item in inputs or []:
        if Path(item).exists():
            hashes[item] = sha256_tree(item)
        else:
            hashes[item] = None  # a hub id: named, not hashed
    for name in ("trajectories.jsonl", "pairs.jsonl", "heldout.jsonl", "sampled.jsonl"):
        if (folder / name).is_file():
            hashes[str(folder / name)] = sha256_file(folder / name)
    evaluation = _load_json(folder / "eval.json") or {}
    pair_stats = _load_json(folder / "pairs.stats.json")
    training = _load_json(folder / "model" / "training_summary.json")
    sampled = evaluation.get("sampled", {})
    metrics = {
        "accuracy": evaluation.get("accuracy"),
        "pass@1": sampled.get("pass@1"),
        "maj@k": sampled.get(f"maj@{sampled.get('k')}"),
        "k": sampled.get("k"),
        "pairs": _first(pair_stats, "written"),
        "train_loss": _first(_first(training, "final"), "loss"),
        "train_steps": _first(training, "steps"),
        "train_examples": _first(training, "examples"),
    }
    if (folder / "trajectories.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "trajectories.jsonl").read_text().splitlines() if line.strip()]
        metrics["train_sample_accuracy"] = sum(bool(r.get("correct")) for r in rows) / len(rows) if rows else None
    record = {
        "directory": str(folder), "config": config, "stages": stages, "inputs": hashes, "metrics": metrics,
        "seconds": round(sum(s["seconds"] for s in stages), 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(folder / MANIFEST_FILE, json.dumps(record, indent=2) + "\n")


# ---- report: the paper's table ----------------------------------------------------------------------------


def _iterations(run: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for folder in sorted(run.glob("iter*")):
        suffix = folder.name[len("iter"):]
        if suffix.isdigit() and (folder / MANIFEST_FILE).is_file():
            out.append((int(suffix), json.loads((folder / MANIFEST_FILE).read_text())))
    return sorted(out, key=lambda item: item[0])


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


@command()
def report(
    directory: Annotated[str, typer.Argument(help="The demo's directory: sft/, mdpo/iter*/ and dpo/iter*/ with manifests.")],
    seconds: Annotated[float | None, typer.Option("--seconds", help="Wall time of the whole demo, for summary.json (default: the sum of its stages).")] = None,
    started: Annotated[float | None, typer.Option("--started", help="Unix time the demo started; its wall time is now minus this.")] = None,
) -> None:
    """The paper's table for the demo (rows: SFT, single-turn DPO, M-DPO iterations; columns: held-out greedy
    accuracy, sampled pass@1 and maj@k, pairs, final train loss, wall time), a PNG of held-out accuracy
    against iteration for both methods, and DIR/summary.json."""
    root = Path(directory)
    mdpo, dpo = _iterations(root / "mdpo"), _iterations(root / "dpo")
    start = next((m for k, m in mdpo if k == 0), None)
    if start is None:
        raise UserError(f"{root}/mdpo/iter0/manifest.json (the SFT policy's evaluation) is missing")
    first = start["config"]

    def row(method: str, iteration: int, m: dict[str, Any]) -> dict[str, Any]:
        folder = Path(m["directory"])
        model = first.get("MODEL") if iteration == 0 else str(folder / "model")
        return {"method": method, "iteration": iteration, "model": model, "heldout": str(folder / "heldout.jsonl"),
                "accuracy": m["metrics"]["accuracy"], "pass@1": m["metrics"]["pass@1"],
                "maj@k": m["metrics"]["maj@k"], "k": m["metrics"]["k"], "pairs": m["metrics"].get("pairs"),
                "train_loss": m["metrics"].get("train_loss"), "seconds": m["seconds"]}

    rows = [row("sft", 0, start)]
    rows += [row("mdpo", k, m) for k, m in mdpo if k > 0]
    rows += [row("dpo", k, m) for k, m in dpo if k > 0]

    k = start["metrics"]["k"]
    table = Table(title=f"{root}: held-out accuracy of the online iterations (cf. Xiong et al. 2024, Table 1)")
    for column in ("method", "held-out greedy", "sampled pass@1", f"maj@{k}", "pairs", "final loss", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    names = {"sft": "SFT policy", "mdpo": "M-DPO iteration {}", "dpo": "single-turn DPO iteration {}"}
    last_dpo = max((r["iteration"] for r in rows if r["method"] == "dpo"), default=None)
    shown = [r for r in rows if r["method"] != "dpo" or r["iteration"] == last_dpo]
    shown = shown[:1] + [r for r in shown if r["method"] == "dpo"] + [r for r in shown if r["method"] == "mdpo"]
    for r in shown:
        table.add_row(names[r["method"]].format(r["iteration"]), _percent(r["accuracy"]), _percent(r["pass@1"]),
                      _percent(r["maj@k"]), "-" if r["pairs"] is None else str(r["pairs"]),
                      "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}", f"{r['seconds']:.0f}")
    console.print(table)

    plot_path = root / "accuracy.png"
    _plot(rows, plot_path)
    total = seconds if seconds is not None else (time.time() - started if started is not None else
                                                 sum(r["seconds"] for r in rows))
    summary = {
        "seconds": round(total, 1),
        "train_problems": first.get("PROBLEMS"),
        "heldout_problems": first.get("EVAL"),
        "rollout_args": shlex.split(first.get("GREEDY_ARGS", "")) + ["--backend", first.get("BACKEND", "vllm"),
                                                                     "--seed", first.get("SEED", "0")],
        "rows": [{key: r[key] for key in ("method", "iteration", "model", "heldout", "accuracy")}
                 | {"pass@1": r["pass@1"], f"maj@{r['k']}": r["maj@k"], "pairs": r["pairs"],
                    "train_loss": r["train_loss"], "seconds": r["seconds"]} for r in rows],
    }
    write_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    console.print(f"plot: {plot_path}\nsummary: {root / 'summary.json'}")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    start = next(r for r in rows if r["method"] == "sft")
    series = []
    for method, label, style in (("mdpo", "M-DPO (observations masked)", "o-"),
                                 ("dpo", "single-turn DPO (no mask)", "s--")):
        points = [start] + sorted((r for r in rows if r["method"] == method), key=lambda r: r["iteration"])
        if len(points) > 1:
            series.append({"label": label, "style": style, "iterations": points})
    _plot_series(series, path, "Online iterative preference learning on the arith task",
                 xlabel="iteration (0 = the SFT policy)")


# ---- compare: several runs side by side -------------------------------------------------------------------


@command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="LABEL=DIR: a run's directory (iter*/ with manifests) and its name in the table and plot.")],
    start: Annotated[str | None, typer.Option("--start", help="A run whose iter0 is every run's iteration 0 (the shared starting policy), for runs that started at iteration 1.")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Also draw held-out greedy accuracy against iteration, one line per run, into this PNG.")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the runs' metrics per iteration to this file.")] = None,
    title: Annotated[str, typer.Option("--title", help="The table's and the plot's title.")] = "Held-out accuracy against iteration",
) -> None:
    """Runs of the loop side by side (an ablation: the NLL term, the sampling strategy): held-out greedy
    accuracy per iteration, and the last iteration's sampled pass@1, maj@k and pairs."""
    shared = dict(_iterations(Path(start))).get(0) if start else None
    if start and shared is None:
        raise UserError(f"{start}/iter0/manifest.json (the starting policy's evaluation) is missing")
    series: list[dict[str, Any]] = []
    for spec in runs:
        label, sep, directory = spec.partition("=")
        if not sep or not label or not directory:
            raise UserError(f"run {spec!r}: give LABEL=DIR")
        iterations = dict(_iterations(Path(directory)))
        if 0 not in iterations and shared is not None:
            iterations[0] = shared
        if not [k for k in iterations if k > 0]:
            raise UserError(f"{directory}: no finished iteration (iter*/manifest.json)")
        points = [{"iteration": k, "accuracy": m["metrics"]["accuracy"], "pass@1": m["metrics"]["pass@1"],
                   "maj@k": m["metrics"]["maj@k"], "k": m["metrics"]["k"], "pairs": m["metrics"].get("pairs")}
                  for k, m in sorted(iterations.items())]
        series.append({"label": label, "run": directory, "iterations": points})

    last = max(p["iteration"] for s in series for p in s["iterations"])
    k = series[0]["iterations"][-1]["k"]
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    for iteration in range(last + 1):
        table.add_column(f"iter {iteration}", justify="right")
    for column in ("sampled pass@1", f"maj@{k}", "pairs"):
        table.add_column(column, justify="right")
    for s in series:
        by_iteration = {p["iteration"]: p for p in s["iterations"]}
        final = s["iterations"][-1]
        table.add_row(s["label"], *(_percent(by_iteration[i]["accuracy"]) if i in by_iteration else "-"
                                    for i in range(last + 1)),
                      _percent(final["pass@1"]), _percent(final["maj@k"]),
                      "-" if final["pairs"] is None else str(final["pairs"]))
    console.print(table)
    if json_out:
        write_atomic(Path(json_out), json.dumps({"title": title, "runs": series}, indent=2) + "\n")
    if plot:
        _plot_series(series, Path(plot), title)
        console.print(f"plot: {plot}")


def _plot_series(series: list[dict[str, Any]], path: Path, title: str,
                 xlabel: str = "iteration (0 = the starting policy)") -> None:
    """Held-out greedy accuracy against iteration, one line per series ({"label", "iterations": [{"iteration",
    "accuracy"}, ...]}, and a matplotlib "style" if it has one), into the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s, marker in zip(series, "os^vDP*X" * len(series)):
        points = s["iterations"]
        ax.plot([p["iteration"] for p in points], [100 * p["accuracy"] for p in points], s.get("style", f"{marker}-"),
                label=s["label"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_xticks(sorted({p["iteration"] for s in series for p in s["iterations"]}))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as staging:
        fig.savefig(staging)
    plt.close(fig)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
