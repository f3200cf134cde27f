"""The stages of the method as the commands run them: rollout -> execute -> evaluate -> make-pairs, and the
PRM's mc-label -> score-prm, and the training commands.

A stage reads its records (`RecordIO`: a path or '-', FILE:LINE errors, --skip-invalid, --resume), opens what it
needs as a context manager (the engine: `EngineOptions.open`; the sandbox: `SandboxOptions.open`; the
grader: `grading.Grader`), runs the package's functions chunk by chunk, writes records to the real stdout or
atomically to `-o PATH` (`records.RecordWriter`), and reports on stderr. The command line (cli.py) only parses
options into these calls.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mathagent.answers import ANSWER_MODES
from mathagent.attempts import DEFAULT_MARKERS, Markers
from mathagent.engines import Engine, open_engine
from mathagent.errors import UserError
from mathagent.prompts import load_prompt
from mathagent.records import (
    InvalidCounter,
    RecordWriter,
    check_output_path,
    check_problem_or_trajectory,
    finished_records,
    read_records,
    record_stream,
    split_finished,
)
from mathagent.tiny import base_model, check_model, is_adapter_dir, resolve_model

console = Console(stderr=True, soft_wrap=True)


def log(line: str) -> None:
    console.print(line, highlight=False)


# --------------------------------------------------------------------------------------------------------
# What every stage opens
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordIO:
    """A stage's records: INPUT (a path or '-'), --output (a path, written atomically, or '-'), --resume and
    --skip-invalid."""

    input: str = "-"
    output: str = "-"
    resume: bool = False
    skip_invalid: bool = False

    def read(self, required: Sequence[str] = ("id",), *, invalid: InvalidCounter | None = None,
             **checks: Any) -> list[dict[str, Any]]:
        """Every input record (`records.read_records` with `checks`); skipped invalid lines are reported (and
        counted in `invalid`)."""
        invalid = invalid if invalid is not None else InvalidCounter()
        records = list(read_records(self.input, required=required, skip_invalid=self.skip_invalid, invalid=invalid,
                                    **checks))
        if invalid.count:
            log(f"skipped {invalid.count} invalid input line(s), e.g. {invalid.examples[0]}")
        return records

    def finished(self) -> dict[str, dict[str, Any]]:
        """The records an earlier run already finished, by id (--resume)."""
        return finished_records(self.output, self.resume)

    @contextmanager
    def writer(self, keep: Sequence[dict[str, Any]] = ()) -> Iterator[RecordWriter]:
        """The output, with the kept records first; while it is open, anything else printed to stdout goes to
        stderr."""
        with record_stream() as stdout, RecordWriter(self.output, keep=keep, stdout=stdout) as writer:
            yield writer


@dataclass(frozen=True)
class EngineOptions:
    """Everything that opens an engine, as a command's options give it; checked when made, before any work.
    `model` is where the model comes from: resolved (`tiny.resolve_model`: 'tiny' is built once into the cache)
    only when the engine opens, so a stage with nothing to do builds nothing."""

    model: str = "tiny"  # a local path, a hub id, or 'tiny'
    backend: str = "vllm"
    adapter: str | None = None
    base_urls: tuple[str, ...] = ()  # openai: the servers
    concurrency: int = 64  # openai: the most requests in flight per server
    seed: int = 0
    dtype: str = "auto"
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if is_adapter_dir(self.model) and self.adapter is not None:
            raise UserError(f"--model {self.model} is a peft adapter: give its base model as --model to use "
                            "--adapter")
        if self.backend == "openai":
            if not self.base_urls:
                raise UserError("--backend openai needs --base-url (a server's endpoint, e.g. http://127.0.0.1:8000/v1)")
            if self.concurrency < 1:
                raise UserError("--concurrency must be at least 1")
            if self.dtype != "auto" or self.max_model_len is not None:
                raise UserError("--dtype and --max-model-len are the servers' settings with --backend openai")
            # --model may be a peft adapter directory (on the base model the servers serve), --adapter a directory
            # (loaded into the servers) or the name of a LoRA module they serve: see engines.openai
            if not is_adapter_dir(self.model):
                check_model("--model", self.model)
            if self.adapter is not None and os.path.exists(self.adapter):
                check_model("--adapter", self.adapter, adapter=True)
            return
        if self.base_urls:
            raise UserError(f"--base-url is for --backend openai, not --backend {self.backend}")
        if is_adapter_dir(self.model):  # generated with the adapter on its base model (see `open`)
            check_model("--model", base_model(self.model))
            return
        check_model("--model", self.model)
        check_model("--adapter", self.adapter, adapter=True)

    @contextmanager
    def open(self) -> Iterator[Engine]:
        """The engine (`engines.open_engine`), closed when the block ends, however it ends."""
        if self.backend == "openai":
            options = {"base_urls": list(self.base_urls), "concurrency": self.concurrency}
        else:
            options = {"seed": self.seed, "dtype": self.dtype, "max_model_len": self.max_model_len}
        model, adapter = self.model, self.adapter
        if self.backend != "openai" and is_adapter_dir(model):  # an iteration trained with --lora
            model, adapter = base_model(model), model
        engine = open_engine(self.backend, resolve_model(model), adapter=adapter, **options)
        try:
            yield engine
        finally:
            engine.close()


@dataclass(frozen=True)
class SandboxOptions:
    """The sandbox as the options give it: --workers, --timeout, --memory-mb, --max-output-chars."""

    workers: int | None = None
    timeout: float = 10.0
    memory_mb: int = 2048
    max_output_chars: int = 2000

    def open(self):
        from mathagent.sandbox import Sandbox

        return Sandbox(workers=self.workers, timeout=self.timeout, memory_mb=self.memory_mb,
                       max_output_chars=self.max_output_chars)


@contextmanager
def nothing() -> Iterator[None]:
    """What a stage opens when it has no work for an engine or a sandbox."""
    yield None


def check_agent_config(config, *, chunk_size: int, n: int = 1) -> None:
    """The stage's own options of the stages that generate (rollout, mc-label); the loop's are checked by
    `agent.AgentConfig` itself."""
    if n < 1 or chunk_size < 1:
        raise UserError("--n, --max-turns, --max-tokens and --chunk-size must be at least 1")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """--shard I/N: (I, N); (0, 1) without it."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise UserError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {shard!r}: need 0 <= I < N")
    return index, count


def parse_answer_modes(text: str) -> tuple[str, ...]:
    """--answer-modes: a comma list of `answers.ANSWER_MODES`, tried in order."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in ANSWER_MODES for m in modes):
        raise UserError(f"--answer-modes {text!r}: choose from {', '.join(ANSWER_MODES)}")
    return modes


def markers_from_options(verdicts: str, cue: str = DEFAULT_MARKERS.cue, verify_prompt: str | None = None,
                         revise_prompt: str | None = None) -> Markers:
    """The format from a command's options: --verdicts CORRECT|WRONG, the revision cue, and the prompted turns
    (text, or a file holding it; None: the paper's)."""
    parts = verdicts.split("|")
    if len(parts) != 2 or not all(p.strip() for p in parts) or parts[0].strip() == parts[1].strip():
        raise UserError(f"--verdicts {verdicts!r}: expected two different strings, CORRECT|WRONG")

    def text(option: str, value: str | None, default: str) -> str:
        if value is None:
            return default
        if os.path.isfile(value):
            return Path(value).read_text(encoding="utf-8").strip()
        if not value.strip():
            raise UserError(f"{option}: empty")
        return value

    return Markers(correct=parts[0].strip(), wrong=parts[1].strip(), cue=cue,
                   verify_prompt=text("--verify-prompt", verify_prompt, DEFAULT_MARKERS.verify_prompt),
                   revise_prompt=text("--revise-prompt", revise_prompt, DEFAULT_MARKERS.revise_prompt))


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


def write_json(path: str, summary: dict[str, Any]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None


# --------------------------------------------------------------------------------------------------------
# rollout and execute
# --------------------------------------------------------------------------------------------------------


class AgentProgress:
    """The rich progress bar of a rollout on stderr: problems done, turns, tokens/s, cells run."""

    def __init__(self, units: Sequence[Sequence[dict[str, Any]]]):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("turn {task.fields[turn]}  {task.fields[tps]:.0f} tok/s  {task.fields[cells]} cells"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("problems", total=len(units), turn=0, tps=0.0, cells=0)
        # a problem is done when the last of its trajectories ends
        self.unit_of = {t["id"]: i for i, unit in enumerate(units) for t in unit}
        self.left = [len(unit) for unit in units]
        self.tokens = 0
        self.seconds = 0.0
        self.cells = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_turn(self, report) -> None:
        self.tokens += report.tokens
        self.seconds += report.seconds
        self.cells += report.executed
        done = 0
        for trajectory_id in report.ended:
            unit = self.unit_of[trajectory_id]
            self.left[unit] -= 1
            done += self.left[unit] == 0
        tps = self.tokens / self.seconds if self.seconds else 0.0
        self.progress.update(self.task, advance=done, turn=report.turn, tps=tps, cells=self.cells)


@dataclass(frozen=True)
class RolloutJob:
    """One input of a rollout, its output and how it is sampled. The command's own INPUT and -o are its first
    job; each --job adds one that shares its engine start, sandbox and grader (`rollout`)."""

    io: RecordIO
    config: Any  # agent.AgentConfig
    n: int


# What a --job may set; every other option is the command's, shared by all its jobs.
JOB_OPTIONS = {"--output": "output", "-o": "output", "--n": "n", "--temperature": "temperature",
               "--top-p": "top_p", "--seed": "seed"}


def parse_job(spec: str, first: RolloutJob) -> RolloutJob:
    """--job 'INPUT -o OUTPUT [--n N] [--temperature T] [--top-p P] [--seed S]': another input sampled by the
    same engine, with the first job's settings where the spec gives none."""
    try:
        words = shlex.split(spec)
    except ValueError as e:
        raise UserError(f"--job {spec!r}: {e}") from None
    if not words or words[0].startswith("-"):
        raise UserError(f"--job {spec!r}: start with the job's INPUT (a path, or '-')")
    values: dict[str, str] = {}
    for option, value in zip(words[1::2], [*words[2::2], None]):
        if option not in JOB_OPTIONS:
            settable = ", ".join(sorted(set(JOB_OPTIONS) - {"--output"}))
            raise UserError(f"--job {spec!r}: {option!r}: a job sets only {settable}")
        if value is None:
            raise UserError(f"--job {spec!r}: {option} needs a value")
        values[JOB_OPTIONS[option]] = value
    if "output" not in values:
        raise UserError(f"--job {spec!r}: give its output (-o PATH)")
    try:
        n = int(values.pop("n", first.n))
        changes = {k: (int(v) if k == "seed" else float(v)) for k, v in values.items() if k != "output"}
    except ValueError as e:
        raise UserError(f"--job {spec!r}: {e}") from None
    io = RecordIO(words[0], values["output"], first.io.resume, first.io.skip_invalid)
    try:
        config = dataclasses.replace(first.config, **changes)  # checked as the command's own options are
    except UserError as e:
        raise UserError(f"--job {spec!r}: {e}", options=e.options) from None
    return RolloutJob(io, config, n)


def rollout(jobs: Sequence[RolloutJob], engine_options: EngineOptions, sandbox_options: SandboxOptions, *,
            prompt: str, system: str | None, shard: str | None, chunk_size: int) -> None:
    """Sample n trajectories of every problem (or continue every trajectory), chunk by chunk, resumable by
    input: an input is done when all its trajectories are. Several jobs (inputs sampled their own way, as an
    iteration's held-out evaluations and the next iteration's training samples of one policy) are read and
    checked first, then run one after another in one engine start, each into its own output; the engine opens
    only if some job has work."""
    from mathagent import agent
    from mathagent.grading import Grader

    outputs, stdin = [job.io.output for job in jobs], [job.io.input for job in jobs].count("-")
    for path in outputs:
        if outputs.count(path) > 1:
            raise UserError(f"{path}: the output of {outputs.count(path)} jobs: give each job its own")
    if stdin > 1:
        raise UserError(f"-: the input of {stdin} jobs: give each job its own")
    template = load_prompt("--prompt", prompt)
    shard_index, shard_count = parse_shard(shard)
    planned = []
    for job in jobs:
        check_agent_config(job.config, chunk_size=chunk_size, n=job.n)
        records = job.io.read(check=check_problem_or_trajectory, unique_ids=True)
        units = [agent.branch(r, job.n) if "messages" in r else agent.new_trajectories(r, job.n, template, system)
                 for i, r in enumerate(records) if i % shard_count == shard_index]  # (an input's trajectories)
        kept: list[dict[str, Any]] = []
        if job.io.resume and job.io.output != "-":
            kept, todo = split_finished(units, job.io.finished())
            log(f"resume: {len(units) - len(todo)} of {len(units)} inputs already done"
                + (f" ({job.io.input} -> {job.io.output})" if len(jobs) > 1 else ""))
            units = todo
        planned.append((job, units, kept))
    work = any(units for _, units, _ in planned)
    # (a job sets only its sampling: whether code runs is the command's, the same for every job). The sandbox
    # first: its zygote imports the math modules in the background while the engine starts.
    with (sandbox_options.open() if work and jobs[0].config.execute else nothing() as sandbox,
          engine_options.open() if work else nothing() as engine,
          Grader() if work else nothing() as grader):
        for job, units, kept in planned:
            trajectories = [t for unit in units for t in unit]
            with job.io.writer(keep=kept) as writer:
                if not trajectories:
                    continue
                calls, tokens, start = engine.stats.calls, engine.stats.generated_tokens, time.perf_counter()
                graded = grader.stats.as_dict()
                with AgentProgress(units) as progress:
                    for chunk in chunks(trajectories, chunk_size):
                        for t in agent.run_agent(chunk, engine, sandbox, grader, job.config, on_turn=progress.on_turn):
                            writer.write(t)
            log(f"rollout{f' of {job.io.input}' if len(jobs) > 1 else ''}: {len(trajectories)} trajectories, "
                f"{engine.stats.calls - calls} engine calls, {engine.stats.generated_tokens - tokens} tokens in "
                f"{time.perf_counter() - start:.1f} s; {grader.stats.summary(grader.stats.since(graded))}")


def execute(io: RecordIO, sandbox_options: SandboxOptions, *, observation_role: str, chunk_size: int) -> None:
    """Run the pending code of every record that has some; the others pass through, in order."""
    from mathagent import agent

    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    records = io.read(unique_ids=True)
    kept, todo = split_finished([[r] for r in records], io.finished())
    records = [r for (r,) in todo]
    cells = 0
    with io.writer(keep=kept) as writer:
        pending = any("messages" in r and agent.pending_code(r["messages"]) is not None for r in records)
        with sandbox_options.open() if pending else nothing() as sandbox:
            for chunk in chunks(records, chunk_size):
                if sandbox is not None:
                    trajectories = [r for r in chunk if "messages" in r]
                    cells += agent.execute_pending(trajectories, sandbox, observation_role, release=True)
                for record in chunk:
                    writer.write(record)
    log(f"execute: {cells} cells run, {len(records) - cells} records passed through")


# --------------------------------------------------------------------------------------------------------
# evaluate, make-pairs, make-corrections
# --------------------------------------------------------------------------------------------------------


def evaluate(ios: Sequence[RecordIO], *, pass_at: str, score_field: str | None, answer_modes: str, reward: str,
             verdict_reward: float, percent_scaling: bool, grading_timeout: float, json_path: str | None,
             graded: str | None, plot: str | None) -> None:
    """Re-grade the trajectories of each input and report its metrics: a table on stderr, the JSON summary as
    one line per input on stdout (or, for one input, to --json), and with --plot pass@n and maj@n against n.

    The k of pass@k and maj@k are resolved per input (`metrics.parse_pass_at`): `n` is the most samples one
    of its problems has."""
    from collections import Counter

    from rich.markup import escape

    from mathagent import metrics, rewards
    from mathagent.grading import Grader

    metrics.parse_pass_at(pass_at, samples=1)  # its mistakes before any work
    modes = parse_answer_modes(answer_modes)
    if not (math.isfinite(verdict_reward) and verdict_reward >= 0):
        raise UserError(f"--verdict-reward {verdict_reward}: must be 0 or positive")
    if not (grading_timeout > 0 and math.isfinite(grading_timeout)):
        raise UserError(f"--grading-timeout {grading_timeout}: must be a positive number of seconds")
    if len(ios) > 1:
        for option, value in (("--json", json_path), ("--graded", graded)):
            if value is not None:
                raise UserError(f"{option} takes one input, not {len(ios)}: with several, each input's summary "
                                "is one line on stdout")
        if sum(io.input == "-" for io in ios) > 1:
            raise UserError("'-' (stdin) is named more than once: it can be read only once")
    if plot is not None and not plot.endswith(".png"):
        raise UserError(f"--plot {plot}: the plot is a PNG; name a path ending in .png")
    for path in (graded, json_path, plot):
        if path not in (None, "-"):
            check_output_path(path)
    labels = input_labels([io.input for io in ios])
    summaries: list[dict[str, Any]] = []
    with Grader(percent_scaling=percent_scaling, timeout=grading_timeout) as grader:
        for io in ios:
            records = io.read(("id", "problem_id", "messages"))
            before = grader.stats.as_dict()
            graded_records = rewards.grade_trajectories(records, grader, answer_modes=modes, reward_kind=reward,
                                                        verdict_reward=verdict_reward)
            per_problem = Counter(str(r["problem_id"]) for r in graded_records if r.get("correct") is not None)
            ks = metrics.parse_pass_at(pass_at, samples=max(per_problem.values(), default=1))
            summary = {"input": io.input, **metrics.evaluate(graded_records, ks=ks, score_field=score_field,
                                                              equal=grader.is_equivalent)}
            summary["grading"] = grader.stats.since(before)  # this input's share of the one grader's counts
            summaries.append(summary)
    if graded is not None:
        with RecordWriter(graded) as writer:
            for record in graded_records:
                writer.write(record)
    for label, summary in zip(labels, summaries, strict=True):
        if len(ios) > 1:
            log(f"{escape(label)}:")
        for line in metrics.format_report(summary):
            log(line)
    if json_path is not None:
        write_json(json_path, summaries[0])
    else:
        for summary in summaries:
            sys.stdout.write(json.dumps(summary) + "\n")
    if plot is not None:
        plot_pass_at(summaries, labels, plot)
        log(f"plot: {plot}")


def input_labels(paths: Sequence[str]) -> list[str]:
    """Names for inputs in a legend: each path's last parts, as few as keep them apart ('-' is <stdin>), so
    runs/it1/sampled.jsonl and runs/it2/sampled.jsonl are it1/sampled.jsonl and it2/sampled.jsonl."""
    parts = [("<stdin>",) if path == "-" else Path(path).parts for path in paths]
    for depth in range(1, max((len(p) for p in parts), default=0) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(paths)  # a path named twice


def plot_pass_at(summaries: Sequence[dict[str, Any]], labels: Sequence[str], path: str) -> None:
    """pass@n (solid) and maj@n (dashed) against n on a log2 axis, one colour per evaluated input (the talk's
    Figure 2), written atomically to the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: draw to a file
    import matplotlib.pyplot as plt
    from rich.markup import escape

    from mathagent.records import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ticks: set[int] = set()
    for i, (summary, label) in enumerate(zip(summaries, labels, strict=True)):
        drawn = False
        for metric, name, style in (("pass@k", "pass@n", "o-"), ("maj@k", "maj@n", "s--")):
            points = sorted((int(k), 100 * value) for k, value in summary[metric].items() if value is not None)
            if points:
                ax.plot(*zip(*points), style, color=f"C{i % 10}", label=f"{label} {name}")
                ticks.update(k for k, _ in points)
                drawn = True
        if not drawn:
            log(f"plot: nothing to draw for {escape(label)} (no problem with a reference answer and k samples)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    if ticks:
        ax.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
        ax.legend(fontsize="small")
    ax.set_xlabel("n (samples per problem)")
    ax.set_ylabel("problems solved (%)")
    ax.grid(alpha=0.3)
    ax.set_title("pass@n and maj@n against n")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".tmp.png") as staging:
            fig.savefig(staging)
    finally:
        plt.close(fig)


def make_pairs(io: RecordIO, config, *, tokenizer: str | None, stats_path: str | None) -> None:
    """Preference data from trajectories (`pairs.make_pairs`); the filters' counts on stderr and in --stats."""
    from mathagent import pairs
    from mathagent.grading import Grader

    if config.max_length is not None and tokenizer is None:
        raise UserError("--max-length needs a positive length and --tokenizer (or --model)")
    if stats_path is not None:
        check_output_path(stats_path)
    invalid = InvalidCounter()
    records = io.read(("id", "problem_id", "messages", "status"), invalid=invalid,
                      check=lambda r: pairs.check_outcome_fields(r, config.score_field))
    chat_tokenizer = None
    if config.max_length is not None:
        from transformers import AutoTokenizer

        try:
            chat_tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
        except (OSError, ValueError) as e:  # a missing directory, or a name that is no hub id
            raise UserError(f"--tokenizer {tokenizer!r}: cannot load: {e}") from None
    grading = None
    if any(pairs.needs_grading(r, config) for r in records):
        with Grader() as grader:
            out, stats = pairs.make_pairs(records, config, grader=grader, tokenizer=chat_tokenizer)
            grading = grader.stats.as_dict()
    else:
        out, stats = pairs.make_pairs(records, config, tokenizer=chat_tokenizer)
    with io.writer() as writer:
        for record in out:
            writer.write(record)
    for line in pairs.format_stats(stats, config):
        log(line)
    if grading is not None and grading["failures"]:
        log(f"  grading: {grading['failures']} comparisons failed and graded wrong")
    if stats_path is not None:
        write_json(stats_path, {**stats.as_dict(), "invalid_lines": invalid.count, "grading": grading})


def make_corrections(io: RecordIO, *, format: str, failed_share: float, seed: int, markers) -> None:
    """Self-rewarding correction data from a rollout's trajectories (`correction.build_demonstrations`)."""
    from mathagent import correction, rewards
    from mathagent.grading import Grader

    if not 0 <= failed_share <= 1:
        raise UserError(f"--failed-share {failed_share}: must be between 0 and 1")
    records = io.read(("id", "problem_id", "messages", "answer"))
    with Grader() as grader:
        graded = rewards.grade_trajectories(records, grader)
    demonstrations, stats = correction.build_demonstrations(graded, failed_share=failed_share, seed=seed,
                                                            markers=markers)
    out = demonstrations if format == "sft" else correction.build_pairs(demonstrations, markers=markers)
    with io.writer() as writer:
        for record in out:
            writer.write(record)
    shapes = ", ".join(f"{n} {shape}" for shape, n in stats.shapes.items())
    log(f"make-corrections: {stats.problems} problems ({stats.skipped} with nothing to make): {shapes}"
        + (f"; {len(out)} pairs" if format == "pairs" else ""))


# --------------------------------------------------------------------------------------------------------
# Process reward model: mc-label, score-prm
# --------------------------------------------------------------------------------------------------------


def mc_label(io: RecordIO, engine_options: EngineOptions, sandbox_options: SandboxOptions, config, *, m: int,
             steps: str, prompt: str | None, q: str, eta: float, format: str, chunk_size: int) -> None:
    """Monte-Carlo step labels of graded trajectories (`labeling.label_trajectories`), chunk by chunk, in input
    order, resumable by trajectory."""
    from mathagent import labeling, prm
    from mathagent.grading import Grader

    labeling.check_estimate(q, eta, m)
    check_agent_config(config, chunk_size=chunk_size)
    template = load_prompt("--prompt", prompt) if prompt is not None else None
    records = io.read(("id", "messages", "answer", "correct"), check=labeling.check_graded_trajectory,
                      unique_ids=True)
    finished = io.finished()
    if io.resume and io.output != "-":
        log(f"resume: {sum(r['id'] in finished for r in records)} of {len(records)} trajectories already done")
    todo = [r for r in records if r["id"] not in finished]
    step_counts = [len(labeling.split_steps(r["messages"], steps)) for r in todo]
    needs_engine = any(count > 1 for count in step_counts)
    single = step_counts.count(1)
    if single and steps == "turns":
        log(f"mc-label: {single} of {len(todo)} trajectories have a single action: with --steps turns that is "
            "one step, labeled by the trajectory's own grade, with no Monte-Carlo estimate. For "
            "chain-of-thought solutions use --steps paragraphs (each paragraph a step).")
    report = labeling.LabelingReport()

    def on_turn(turn) -> None:
        log(f"mc-label: turn {turn.turn}: {turn.generated} actions, {turn.executed} cells, {turn.tokens} tokens, "
            f"{turn.finished} completions ended")

    with (io.writer() as writer, Grader() as grader,
          sandbox_options.open() if needs_engine else nothing() as sandbox,  # importing while the engine starts
          engine_options.open() if needs_engine else nothing() as engine):
        cache = labeling.LabelCache()
        for chunk in chunks(records, chunk_size):
            new = [r for r in chunk if r["id"] not in finished]
            if new:
                report.add(labeling.label_trajectories(new, engine, sandbox, grader, config, m=m, mode=steps,
                                                       cache=cache, prompt=template, estimate=q, eta=eta,
                                                       on_turn=on_turn))
            for r in chunk:
                writer.write(finished[r["id"]] if r["id"] in finished
                             else prm.prm_example(r, steps) if format == "prm" else r)
    log(f"mc-label: {report.summary()}; {grader.stats.summary()}")


def score_prm(io: RecordIO, *, model: str, steps: str | None, aggregate: str, field: str, batch_size: int,
              dtype: str, implicit: bool = False, ref_model: str | None = None, beta: float = 0.1) -> None:
    """Score every step of trajectories with a PRM (`prm.score_trajectories`), or with the implicit reward of a
    policy against its reference (`implicit_prm`), in input order, resumable."""
    from mathagent import implicit_prm, labeling, prm

    check_model("--model", model)
    model = resolve_model(model)
    if implicit:
        if ref_model is None:
            raise UserError("--implicit needs --ref-model: the reference policy the --model policy was trained against")
        check_model("--ref-model", ref_model)
        ref_model = resolve_model(ref_model)
        if steps not in (None, "turns"):
            raise UserError(f"--steps {steps}: an implicit reward is a step's action tokens, so --implicit scores turns")
        if aggregate not in implicit_prm.AGGREGATES:
            raise UserError(f"--aggregate {aggregate!r}: choose from {', '.join(implicit_prm.AGGREGATES)} with --implicit")
        if not (math.isfinite(beta) and beta > 0):
            raise UserError(f"--beta {beta}: must be a positive number")
    else:
        if steps is None:  # score steps as the PRM was taught to see them
            steps = prm.trained_steps_mode(model)
        if steps not in labeling.STEP_MODES:  # from prm.json
            raise UserError(f"--steps {steps!r}: choose from {', '.join(labeling.STEP_MODES)}")
        if aggregate not in prm.AGGREGATES:
            raise UserError(f"--aggregate {aggregate!r}: choose from {', '.join(prm.AGGREGATES)}")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    records = io.read(("id", "messages"), unique_ids=True)
    finished = io.finished()
    todo = [r for r in records if r["id"] not in finished]
    report = prm.ScoreReport()
    with io.writer() as writer:
        if todo and implicit:
            policy, tokenizer = prm.load_prm(model, dtype=dtype)
            reference, _ = prm.load_prm(ref_model, dtype=dtype)
            report = implicit_prm.score_trajectories(policy, reference, tokenizer, todo, beta=beta, how=aggregate,
                                                     field=field, batch_size=batch_size)
        elif todo:
            prm_model, tokenizer = prm.load_prm(model, dtype=dtype)
            report = prm.score_trajectories(prm_model, tokenizer, todo, mode=steps, how=aggregate, field=field,
                                            batch_size=batch_size)
        for r in records:
            writer.write(finished.get(r["id"], r))
    log(f"score-prm: {report.trajectories} trajectories, {report.steps} steps in {report.forward_passes} forward "
        f"passes, {report.seconds:.1f} s"
        + (f"; {report.per_prefix} scored prefix by prefix (their chat template tokenizes a step's prompt "
           f"differently from the whole conversation)" if report.per_prefix else ""))


# --------------------------------------------------------------------------------------------------------
# Training: train-mdpo, train-sft, train-prm
# --------------------------------------------------------------------------------------------------------


def train_line(row: dict[str, Any]) -> str:
    """The per-step line on stderr."""
    def f(key: str, fmt: str = ".4f") -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    parts = [f"step {row['step']}", f"loss {f('loss')}"]
    if "rewards/chosen" in row:
        parts += [f"chosen {f('rewards/chosen')}", f"rejected {f('rewards/rejected')}"]
    if "rewards/accuracies" in row:
        parts.append(f"acc {f('rewards/accuracies', '.2f')}")
    if "rewards/margins" in row:
        parts.append(f"margin {f('rewards/margins')}")
    if "kl" in row:
        parts.append(f"kl {f('kl')}")
    parts += [f"lr {f('learning_rate', '.2e')}", f"{f('tokens_per_second', '.0f')} tok/s"]
    return "  ".join(parts)


def train(io: RecordIO, name: str, config, objective, check: Callable[[dict[str, Any]], str | None], *,
          required: tuple[str, ...] = ("id",), evaluate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
          ) -> None:
    """Read the records, train (`training.train` with the `train_config.TrainConfig` and the `objectives`
    objective the command built), print the summary: every training command's body. `evaluate` adds to the
    summary, on the main process, once the model is saved."""
    from mathagent import training

    if io.input == "-" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("under torchrun / accelerate launch every process reads the input: give a path, not stdin")
    records = io.read(required, check=check)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = os.environ.get("RANK", "0") == "0"
    with record_stream() as stdout:
        summary = training.train(config, objective, records, on_step=lambda row: log(train_line(row)), log=log)
        if main_process:
            if evaluate is not None:
                summary.update(evaluate(summary))
            stdout.write(json.dumps(summary) + "\n")
    if main_process:
        final = summary["final"]
        log(f"{name}: {summary['steps']} steps in {summary['train_seconds']:.1f} s "
            f"({summary['tokens_per_second'] or 0:.0f} tok/s), final loss {final.get('loss', float('nan')):.4f}; "
            f"saved the {summary['saved']} to {summary['output_dir']}"
            + (f"; held-out label accuracy {summary['eval_accuracy']:.3f}" if "eval_accuracy" in summary else ""))
    if processes > 1:
        # A bounded teardown under torchrun: the work is saved and the group destroyed; threads that libraries
        # leave behind (gloo, tokenizers) must not keep this rank, and so torchrun, from exiting.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
