"""The `mathagent` command line: one command per stage of the method, JSONL in and out.

Each command parses its options, opens what it needs (engine, sandbox), calls one function of the package, and
writes records. Records go to stdout or `-o PATH` (atomically); logs and progress go to stderr, so stages
chain through pipes:

    mathagent rollout problems.jsonl --model tiny --n 4 | mathagent evaluate
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mathagent import __version__
from mathagent.chat import DEFAULT_MAX_LENGTH
from mathagent.correction import DEFAULT_MARKERS
from mathagent.errors import UserError
from mathagent.records import (
    InvalidCounter,
    RecordWriter,
    check_output_path,
    check_problem_or_trajectory,
    read_finished,
    read_records,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train LLM math agents with multi-turn tool-integrated preference learning (M-DPO / M-KTO).",
)
console = Console(stderr=True, soft_wrap=True)

# Options shared by several stages.
InputArg = Annotated[str, typer.Argument(help="Input JSONL path, or '-' for stdin.")]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output JSONL path (written atomically), or '-' for stdout.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Keep the records already in --output (or left by a killed run) and do only the missing ids.")]
SkipInvalidOpt = Annotated[bool, typer.Option("--skip-invalid", help="Count and skip malformed input lines instead of stopping with exit code 2.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Model: a local path, a hub id, or 'tiny' (the embedded tiny model, built once into the cache).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="Generation backend: vllm, hf (transformers), or openai (OpenAI-compatible servers that already run, e.g. `vllm serve`: see --base-url).")]
BaseUrlOpt = Annotated[list[str] | None, typer.Option("--base-url", help="With --backend openai: a server's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat it for several servers (requests go to the least busy). --model gives the tokenizer and chat template and names the served model; --adapter names a LoRA module the servers serve.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="With --backend openai: the most requests in flight per server.")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="A peft LoRA adapter directory to generate with.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Most tokens generated per turn.")]
MaxTurnsOpt = Annotated[int, typer.Option("--max-turns", help="H: the most actions (assistant turns) a trajectory may have in all.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; each trajectory's samples are seeded from it and its id.")]
PromptOpt = Annotated[str, typer.Option("--prompt", help="'tool' (python blocks, then \\boxed{}), 'cot' (plain chain of thought), or a file with a {question} placeholder.")]
ObservationRoleOpt = Annotated[str, typer.Option("--observation-role", help="Role of observation messages: user (as in the M-DPO data) or tool.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Per-cell wall-clock and CPU limit, in seconds.")]
MemoryOpt = Annotated[int, typer.Option("--memory-mb", help="Memory budget of each trajectory's session (all its processes, memfds and files), in MiB.")]
MaxOutputOpt = Annotated[int, typer.Option("--max-output-chars", help="Observation text beyond this is cut, with a marker saying how much.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Sandbox worker processes (default: the number of cores).")]
SCHEDULES = ("turns", "continuous")
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="turns: all live trajectories advance together, one engine call per turn; continuous (vLLM): each goes on as soon as its own observation is back.")]
VerdictRewardOpt = Annotated[float, typer.Option("--verdict-reward", help="w: a self-rewarding trajectory's reward also gets w x the mean of +1 per faithful verdict and -1 per false one (docs/self-rewarding.md). 0: the final answer's reward only.")]
RewardOpt = Annotated[str, typer.Option("--reward", help="Reward rule: r1 (DeepSeek-R1's rule: +1 boxed and correct, -0.5 boxed and wrong, -1 no boxed answer) or binary (1/0).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mathagent {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show the engines' own logs and warnings (vLLM, torch, transformers); also MATHAGENT_VERBOSE=1.")] = False,
) -> None:
    from mathagent.engines import VERBOSE_ENV, quiet_libraries
    from mathagent.engines import verbose as verbose_env

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    elif not verbose_env():
        quiet_libraries()


def _fail(message: str) -> None:
    # Plain text, never wrapped: scripts grep for "FILE:LINE: ...".
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(2)


@contextmanager
def _user_errors() -> Iterator[None]:
    """User mistakes become one line on stderr and exit code 2; anything else keeps its traceback."""
    try:
        yield
    except UserError as e:
        _fail(str(e))


@contextmanager
def _record_stream() -> Iterator[IO[str]]:
    """A private stream to the real stdout for records, while fd 1 points at stderr.

    stdout must carry only JSONL, but libraries print there: vLLM's logger, C extensions, tqdm. For the
    duration of a stage, whatever anything writes to stdout lands on stderr, and only records reach the pipe.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield stream
    finally:
        stream.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        stream.close()


def _report_invalid(invalid: InvalidCounter) -> None:
    if invalid.count:
        console.print(f"skipped {invalid.count} invalid input line(s), e.g. {invalid.examples[0]}", highlight=False)


DTYPES = ("auto", "bfloat16", "float16", "float32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_model(option: str, name: str | None, *, adapter: bool = False) -> None:
    """A model (or adapter) is 'tiny', an existing directory, or something shaped like a hub id
    ("org/name"); a path that does not exist is refused before anything loads."""
    if name is None or (name == "tiny" and not adapter):
        return
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"{option} {name}: is a file; give the model's directory")
        wanted = "adapter_config.json" if adapter else "config.json"
        if not os.path.isfile(os.path.join(name, wanted)):
            raise UserError(f"{option} {name}: no {wanted} in it: not a {'peft adapter' if adapter else 'model'} "
                            "directory")
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UserError(f"{option} {name}: no such directory (and not a hub id like org/name)")


def _check_backend(backend: str, base_urls: list[str] | None, concurrency: int, adapter: str | None) -> None:
    from mathagent.engines import BACKENDS

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "openai":
        if not base_urls:
            raise UserError("--backend openai needs --base-url (a server's endpoint, e.g. http://127.0.0.1:8000/v1)")
        if concurrency < 1:
            raise UserError("--concurrency must be at least 1")
        return  # --adapter names a LoRA module of the servers, not a directory here
    if base_urls:
        raise UserError(f"--base-url is for --backend openai, not --backend {backend}")
    _check_model("--adapter", adapter, adapter=True)


def _check_verdict_reward(weight: float) -> float:
    if not (math.isfinite(weight) and weight >= 0):
        raise UserError(f"--verdict-reward {weight}: must be 0 or positive")
    return weight


def _markers(mode: str | None, max_revisions: int, verdicts: str, cue: str, verify_prompt: str | None,
             revise_prompt: str | None):
    """The self-rewarding format from the options of `rollout --self-reward`."""
    from mathagent.agent import SELF_REWARD_MODES
    from mathagent.correction import DEFAULT_MARKERS, Markers

    if mode is not None and mode not in SELF_REWARD_MODES:
        raise UserError(f"--self-reward {mode!r}: choose from {', '.join(SELF_REWARD_MODES)}")
    if max_revisions < 0:
        raise UserError("--max-revisions must be 0 or more")
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


def _check_generation(*, temperature: float, top_p: float, max_tokens: int, max_turns: int, chunk_size: int,
                      dtype: str, observation_role: str = "user", reward: str = "r1", n: int = 1,
                      schedule: str = "turns") -> None:
    """The options of the stages that generate (rollout, mc-label), checked before any work."""
    from mathagent.grading import REWARD_KINDS

    if n < 1 or max_turns < 1 or max_tokens < 1 or chunk_size < 1:
        raise UserError("--n, --max-turns, --max-tokens and --chunk-size must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature {temperature}: must be 0 (greedy) or positive")
    if not (0 < top_p <= 1):
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if reward not in REWARD_KINDS:
        raise UserError(f"--reward {reward!r}: choose from {', '.join(REWARD_KINDS)}")
    if schedule not in SCHEDULES:
        raise UserError(f"--schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    _check_observation_role(observation_role)


def _check_observation_role(role: str) -> None:
    if role == "assistant":
        raise UserError("--observation-role cannot be assistant: observations are not the agent's actions")
    if role not in ("user", "tool"):
        raise UserError(f"--observation-role {role!r}: choose from user, tool")


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output-dir {path}: is a file, not a directory")


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise UserError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {shard!r}: need 0 <= I < N")
    return index, count


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


class _AgentProgress:
    """The rich progress bar of a rollout on stderr: problems done, turns, tokens/s, cells run."""

    def __init__(self, units: list[list[dict[str, Any]]]):
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


@app.command()
def rollout(
    input: InputArg = "-",
    output: OutputOpt = "-",
    model: ModelOpt = "tiny",
    backend: BackendOpt = "vllm",
    adapter: AdapterOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = 64,
    n: Annotated[int, typer.Option("--n", help="Samples per problem (or continuations per input trajectory).")] = 1,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_tokens: MaxTokensOpt = 512,
    max_turns: MaxTurnsOpt = 6,
    seed: SeedOpt = 0,
    prompt: PromptOpt = "tool",
    system: Annotated[str | None, typer.Option("--system", help="An optional system message for new trajectories.")] = None,
    observation_role: ObservationRoleOpt = "user",
    execute: Annotated[bool, typer.Option("--execute/--no-execute", help="Run code between turns; --no-execute stops each trajectory at its next tool call (status tool_call) for `mathagent execute`.")] = True,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: take only every N-th input record starting at I (split the input across machines).")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Trajectories advanced together; output is written (and resumable) chunk by chunk.")] = 1024,
    reward: RewardOpt = "r1",
    schedule: ScheduleOpt = "turns",
    self_reward: Annotated[str | None, typer.Option("--self-reward", help="Self-rewarding correction (docs/self-rewarding.md): after an answer the model's own verdict ('[VERIFY] correct' ends, '[VERIFY] wrong' leads to a revision). prompted: asked for in user turns; inline: the model's message goes on, as a trained model writes it. Off by default.")] = None,
    max_revisions: Annotated[int, typer.Option("--max-revisions", help="R: the most revisions after 'wrong' verdicts (with --self-reward).")] = 1,
    verdict_reward: VerdictRewardOpt = 0.0,
    verdicts: Annotated[str, typer.Option("--verdicts", help="The two verdict strings, CORRECT|WRONG (with --self-reward).")] = f"{DEFAULT_MARKERS.correct}|{DEFAULT_MARKERS.wrong}",
    revision_cue: Annotated[str, typer.Option("--revision-cue", help="What an inline revision starts with (with --self-reward inline).")] = DEFAULT_MARKERS.cue,
    verify_prompt: Annotated[str | None, typer.Option("--verify-prompt", help="The user turn asking for a verdict (--self-reward prompted): text, or a file holding it. Default: the paper's.")] = None,
    revise_prompt: Annotated[str | None, typer.Option("--revise-prompt", help="The user turn asking for a revision (--self-reward prompted): text, or a file holding it. Default: the paper's.")] = None,
    timeout: TimeoutOpt = 10.0,
    memory_mb: MemoryOpt = 2048,
    max_output_chars: MaxOutputOpt = 2000,
    workers: WorkersOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: auto, bfloat16, float16, float32.")] = "auto",
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="vLLM context length (default: the model's).")] = None,
    resume: ResumeOpt = False,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Sample multi-turn tool-integrated trajectories: text + ```python -> run -> ```output -> ... -> \\boxed{}.

    Input: problems {"id","question","answer"?}, or trajectories to continue (ending in an observation, in
    pending code, or in an action cut by --max-tokens). Output: trajectories with status, pred, correct, reward.
    """
    from mathagent import agent
    from mathagent.engines import open_engine
    from mathagent.grading import Grader
    from mathagent.sandbox import Sandbox
    from mathagent.tiny import resolve_model

    with _user_errors():
        _check_generation(temperature=temperature, top_p=top_p, max_tokens=max_tokens, max_turns=max_turns,
                          chunk_size=chunk_size, dtype=dtype, observation_role=observation_role, reward=reward, n=n,
                          schedule=schedule)
        _check_model("--model", model)
        _check_backend(backend, base_url, concurrency, adapter)
        template = agent.load_prompt(prompt)
        shard_index, shard_count = _parse_shard(shard)
        invalid = InvalidCounter()
        records = list(read_records(input, required=("id",), skip_invalid=skip_invalid, invalid=invalid,
                                    check=check_problem_or_trajectory, unique_ids=True))
        units = []  # (input record, its trajectories)
        for i, record in enumerate(records):
            if i % shard_count != shard_index:
                continue
            if "messages" in record:
                units.append(agent.branch(record, n))
            else:
                units.append(agent.new_trajectories(record, n, template, system))
        kept: list[dict[str, Any]] = []
        if resume and output != "-":
            finished = {r["id"]: r for r in read_finished(output)}
            todo = []
            for trajectories in units:
                if all(t["id"] in finished for t in trajectories):
                    kept.extend(finished[t["id"]] for t in trajectories)
                else:
                    todo.append(trajectories)
            console.print(f"resume: {len(units) - len(todo)} of {len(units)} inputs already done", highlight=False)
            units = todo
        _report_invalid(invalid)
        config = agent.AgentConfig(
            max_turns=max_turns, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
            observation_role=observation_role, execute=execute, reward=reward, schedule=schedule,
            self_reward=self_reward, max_revisions=max_revisions, verdict_reward=_check_verdict_reward(verdict_reward),
            markers=_markers(self_reward, max_revisions, verdicts, revision_cue, verify_prompt, revise_prompt),
        )
        trajectories = [t for unit in units for t in unit]
        with _record_stream() as stdout, RecordWriter(output, keep=kept, stdout=stdout) as writer, Grader() as grader:
            if trajectories:
                engine = open_engine(backend, resolve_model(model), adapter=adapter, seed=seed, dtype=dtype,
                                     max_model_len=max_model_len, base_urls=base_url, concurrency=concurrency)
                sandbox = Sandbox(workers=workers, timeout=timeout, memory_mb=memory_mb, max_output_chars=max_output_chars) if execute else None
                start = time.perf_counter()
                try:
                    with _AgentProgress(units) as progress:
                        for chunk in _chunks(trajectories, chunk_size):
                            for t in agent.run_agent(chunk, engine, sandbox, grader, config, on_turn=progress.on_turn):
                                writer.write(t)
                finally:
                    if sandbox is not None:
                        sandbox.close()
                    engine.close()
                stats = engine.stats
                console.print(
                    f"rollout: {len(trajectories)} trajectories, {stats.calls} engine calls, "
                    f"{stats.generated_tokens} tokens in {time.perf_counter() - start:.1f} s; {grader.stats.summary()}",
                    highlight=False,
                )


@app.command()
def execute(
    input: InputArg = "-",
    output: OutputOpt = "-",
    observation_role: ObservationRoleOpt = "user",
    timeout: TimeoutOpt = 10.0,
    memory_mb: MemoryOpt = 2048,
    max_output_chars: MaxOutputOpt = 2000,
    workers: WorkersOpt = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Records executed together in one sandbox call.")] = 1024,
    resume: ResumeOpt = False,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Run the pending code of each trajectory's last action and append its output as one observation.

    Records without pending code pass through unchanged, in order. Earlier cells are replayed (output
    discarded) so a cell sees the state its trajectory built.
    """
    from mathagent import agent
    from mathagent.sandbox import Sandbox

    with _user_errors():
        _check_observation_role(observation_role)
        if chunk_size < 1:
            raise UserError("--chunk-size must be at least 1")
        invalid = InvalidCounter()
        records = list(read_records(input, required=("id",), skip_invalid=skip_invalid, invalid=invalid,
                                    unique_ids=True))
        kept: list[dict[str, Any]] = []
        if resume and output != "-":
            finished = {r["id"]: r for r in read_finished(output)}
            kept = [finished[r["id"]] for r in records if r["id"] in finished]
            records = [r for r in records if r["id"] not in finished]
        _report_invalid(invalid)
        with _record_stream() as stdout, RecordWriter(output, keep=kept, stdout=stdout) as writer:
            cells = 0
            if any("messages" in r and agent.pending_code(r["messages"]) is not None for r in records):
                with Sandbox(workers=workers, timeout=timeout, memory_mb=memory_mb, max_output_chars=max_output_chars) as sandbox:
                    for chunk in _chunks(records, chunk_size):
                        trajectories = [r for r in chunk if "messages" in r]
                        cells += agent.execute_pending(trajectories, sandbox, observation_role, release=True)
                        for record in chunk:
                            writer.write(record)
            else:
                for record in records:
                    writer.write(record)
        console.print(f"execute: {cells} cells run, {len(records) - cells} records passed through", highlight=False)


@app.command()
def evaluate(
    input: InputArg = "-",
    k: Annotated[str, typer.Option("--k", help="Comma-separated k for pass@k and maj@k, e.g. 1,4,8 (problems with fewer than k trajectories are left out of that k).")] = "1",
    score_field: Annotated[str | None, typer.Option("--score-field", help="Report best-of-n: pick each problem's trajectory with the highest value of this field (e.g. a PRM's score).")] = None,
    answer_modes: Annotated[str, typer.Option("--answer-modes", help="Comma-separated answer forms to extract from the last action, tried in order: boxed, answer_is, gsm8k.")] = "boxed",
    reward: RewardOpt = "r1",
    verdict_reward: VerdictRewardOpt = 0.0,
    percent_scaling: Annotated[bool, typer.Option("--percent-scaling", help="Also accept answers off by a factor of 100 (0.5 for 50); off by default, since it grades wrong answers right.")] = False,
    grading_timeout: Annotated[float, typer.Option("--grading-timeout", help="Seconds allowed for one symbolic comparison; past it the answer grades wrong and is counted.")] = 5.0,
    json_path: Annotated[str | None, typer.Option("--json", help="Write the JSON summary to this path instead of stdout.")] = None,
    graded: Annotated[str | None, typer.Option("--graded", help="Write every input record with pred, correct and reward set by this grading (JSONL, atomically).")] = None,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Re-grade trajectories from their messages and report accuracy, pass@k, maj@k, best-of-n and turn statistics.

    Input: trajectories {"id","problem_id","answer","messages","status",...}, several per problem. Stored pred and
    correct are ignored: pred is extracted from the last action again. A table goes to stderr, the JSON summary
    to stdout (or --json).
    """

    from mathagent import metrics
    from mathagent.grading import ANSWER_MODES, REWARD_KINDS, Grader

    with _user_errors():
        try:
            ks = sorted({int(x) for x in k.split(",") if x.strip()})
        except ValueError:
            raise UserError(f"--k {k!r}: expected comma-separated positive integers, e.g. 1,4,8") from None
        if not ks or ks[0] < 1:
            raise UserError(f"--k {k!r}: expected comma-separated positive integers, e.g. 1,4,8")
        modes = tuple(m.strip() for m in answer_modes.split(",") if m.strip())
        if not modes or any(m not in ANSWER_MODES for m in modes):
            raise UserError(f"--answer-modes {answer_modes!r}: choose from {', '.join(ANSWER_MODES)}")
        if reward not in REWARD_KINDS:
            raise UserError(f"--reward {reward!r}: choose from {', '.join(REWARD_KINDS)}")
        if not (grading_timeout > 0 and math.isfinite(grading_timeout)):
            raise UserError(f"--grading-timeout {grading_timeout}: must be a positive number of seconds")
        for path in (graded, json_path):
            if path not in (None, "-"):
                check_output_path(path)
        invalid = InvalidCounter()
        records = list(read_records(input, required=("id", "problem_id", "messages"), skip_invalid=skip_invalid,
                                    invalid=invalid))
        _report_invalid(invalid)
        with Grader(percent_scaling=percent_scaling, timeout=grading_timeout) as grader:
            graded_records = metrics.grade_trajectories(records, grader, answer_modes=modes, reward_kind=reward,
                                                        verdict_reward=_check_verdict_reward(verdict_reward))
            summary = metrics.evaluate(graded_records, ks=ks, score_field=score_field, equal=grader.is_equivalent)
            summary["grading"] = grader.stats.as_dict()
        if graded is not None:
            with RecordWriter(graded) as writer:
                for record in graded_records:
                    writer.write(record)
        for line in metrics.format_report(summary):
            console.print(line, highlight=False)
        text = json.dumps(summary, indent=2)
        if json_path is None:
            typer.echo(text)
        else:
            try:
                with open(json_path, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
            except OSError as e:
                raise UserError(f"{json_path}: cannot write: {e.strerror}") from None


@app.command("make-pairs")
def make_pairs(
    input: InputArg = "-",
    output: OutputOpt = "-",
    format: Annotated[str, typer.Option("--format", help="pairs: {prompt, chosen, rejected} for M-DPO; kto: each trajectory of the selected pairs once, {prompt, completion, label}; sft: the selected winners as trajectories, for rejection-sampling fine-tuning.")] = "pairs",
    strategy: Annotated[str, typer.Option("--strategy", help="random: up to K (winner, loser) combinations sampled without replacement; max-min: the best-scored winner against the worst-scored loser, then the next best against the next worst, up to K; all: every winner with every loser.")] = "random",
    k: Annotated[int | None, typer.Option("--k", help="Most pairs (for sft: winners) per problem; default 8 for random, 1 for max-min; not allowed with all.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random strategy; each problem's sample depends only on it and the problem id.")] = 0,
    score_field: Annotated[str | None, typer.Option("--score-field", help="max-min ranks by this numeric field (e.g. a PRM's score) instead of the reward.")] = None,
    reward_threshold: Annotated[float | None, typer.Option("--reward-threshold", help="Winners are the trajectories with reward above this, losers the rest, instead of correct / incorrect.")] = None,
    regrade: Annotated[bool, typer.Option("--regrade", help="Grade every trajectory with an answer from its messages; by default stored correct/reward are trusted and only records missing them are graded.")] = False,
    reward: Annotated[str, typer.Option("--reward", help="Reward rule of the trajectories graded here: r1 (DeepSeek-R1's rule: +1 boxed and correct, -0.5 boxed and wrong, -1 no boxed answer) or binary (1/0).")] = "r1",
    keep_unfinished: Annotated[bool, typer.Option("--keep-unfinished", help="Turn off the unfinished (status not answered) and no_answer filters: such trajectories become losers.")] = False,
    keep_errors: Annotated[bool, typer.Option("--keep-errors", help="Turn off the error_observation filter (a Python error or timeout in the last observation).")] = False,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Drop trajectories longer than this many tokens under the chat template (needs --tokenizer). Default with --tokenizer: 4096, the length beyond which train-mdpo and train-sft drop an example.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", "--model", help="Tokenizer for --max-length (the policy's): a local path, a hub id, or 'tiny'.")] = None,
    stats_path: Annotated[str | None, typer.Option("--stats", help="Also write the counts (filters, duplicates, winners, losers, records) as JSON to this path.")] = None,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Build preference data from trajectories: pairs for M-DPO, labelled completions for M-KTO, winners for SFT.

    Input: trajectories (id, problem_id, messages, status, and answer, correct, reward when known), grouped by
    problem_id. Winners are correct, losers incorrect (or split by --reward-threshold). Stored grades are
    trusted; a trajectory missing one is graded from its messages when it has an answer.

    Named filters (no_action, unfinished, no_answer, error_observation, too_long, ungraded, no_score,
    prompt_mismatch) drop unusable trajectories, then identical responses are deduplicated; every count goes
    to stderr (and --stats).

    A pair: id ({problem_id}:{chosen_id}>{rejected_id}), problem_id, prompt (the messages before the first
    action), chosen and rejected (the rest of each trajectory), chosen_id, rejected_id, chosen_reward,
    rejected_reward, and the fields the two share. The exact rules are in mathagent/pairs.py.
    """

    from mathagent import pairs
    from mathagent.grading import REWARD_KINDS, Grader

    with _user_errors():
        if format not in pairs.FORMATS:
            raise UserError(f"--format {format!r}: choose from {', '.join(pairs.FORMATS)}")
        if strategy not in pairs.STRATEGIES:
            raise UserError(f"--strategy {strategy!r}: choose from {', '.join(pairs.STRATEGIES)}")
        if k is not None and k < 1:
            raise UserError("--k must be at least 1")
        if k is not None and strategy == "all":
            raise UserError("--k does not apply to --strategy all (every winner with every loser)")
        if reward not in REWARD_KINDS:
            raise UserError(f"--reward {reward!r}: choose from {', '.join(REWARD_KINDS)}")
        if score_field is not None and strategy != "max-min":
            raise UserError("--score-field applies to --strategy max-min only")
        if max_length is not None and (max_length < 1 or tokenizer is None):
            raise UserError("--max-length needs a positive length and --tokenizer (or --model)")
        if max_length is None and tokenizer is not None:
            max_length = DEFAULT_MAX_LENGTH  # what training would drop anyway
        if stats_path is not None:
            check_output_path(stats_path)
        config = pairs.PairConfig(
            strategy=strategy, k=k, seed=seed, score_field=score_field, reward_threshold=reward_threshold,
            keep_unfinished=keep_unfinished, keep_errors=keep_errors, max_length=max_length, regrade=regrade,
            reward_kind=reward, format=format,
        )
        invalid = InvalidCounter()
        records = list(read_records(
            input, required=("id", "problem_id", "messages", "status"), skip_invalid=skip_invalid, invalid=invalid,
            check=lambda r: pairs.check_outcome_fields(r, score_field),
        ))
        _report_invalid(invalid)
        chat_tokenizer = None
        if max_length is not None:
            from transformers import AutoTokenizer

            from mathagent.tiny import resolve_model

            try:
                chat_tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
            except (OSError, ValueError) as e:  # a missing directory, or a name that is no hub id
                raise UserError(f"--tokenizer {tokenizer!r}: cannot load: {e}") from None
        if any(pairs.needs_grading(r, config) for r in records):
            with Grader() as grader:
                out, stats = pairs.make_pairs(records, config, grader=grader, tokenizer=chat_tokenizer)
                grading = grader.stats.as_dict()
        else:
            out, stats = pairs.make_pairs(records, config, tokenizer=chat_tokenizer)
            grading = None
        with _record_stream() as stdout, RecordWriter(output, stdout=stdout) as writer:
            for record in out:
                writer.write(record)
        for line in pairs.format_stats(stats, config):
            console.print(line, highlight=False)
        if grading is not None and grading["failures"]:
            console.print(f"  grading: {grading['failures']} comparisons failed and graded wrong", highlight=False)
        if stats_path is not None:
            summary = {**stats.as_dict(), "invalid_lines": invalid.count, "grading": grading}
            try:
                with open(stats_path, "w", encoding="utf-8") as f:
                    f.write(json.dumps(summary, indent=2) + "\n")
            except OSError as e:
                raise UserError(f"{stats_path}: cannot write: {e.strerror}") from None


# --------------------------------------------------------------------------------------------------------
# Process reward model: mc-label -> train-prm -> score-prm (mathagent/labeling.py, mathagent/prm.py)
# --------------------------------------------------------------------------------------------------------

@app.command("make-corrections")
def make_corrections(
    input: InputArg = "-",
    output: OutputOpt = "-",
    format: Annotated[str, typer.Option("--format", help="sft: the demonstrations, trajectories for train-sft; pairs: preference pairs for train-mdpo (the faithful verdict over the false one, the successful correction over the failed one).")] = "sft",
    failed_share: Annotated[float, typer.Option("--failed-share", help="Share of each problem's wrong first attempts made into failed corrections (wrong -> '[VERIFY] wrong' -> a wrong revision -> '[VERIFY] wrong'); the others are corrected with a right attempt.")] = 0.2,
    seed: SeedOpt = 0,
    verdicts: Annotated[str, typer.Option("--verdicts", help="The two verdict strings, CORRECT|WRONG.")] = f"{DEFAULT_MARKERS.correct}|{DEFAULT_MARKERS.wrong}",
    revision_cue: Annotated[str, typer.Option("--revision-cue", help="What a revision starts with.")] = DEFAULT_MARKERS.cue,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Self-rewarding correction data by sequential rejection sampling (docs/self-rewarding.md).

    Input: trajectories of a rollout, several per problem (graded here from their messages). Each problem's
    right first attempts become (answer -> '[VERIFY] correct'), its wrong ones (answer -> '[VERIFY] wrong' ->
    the cue -> a right attempt -> '[VERIFY] correct'), or, for --failed-share of them, the same with a wrong
    revision; the verdicts are the grader's. Output: those trajectories (--format sft) or pairs (--format pairs).
    """
    from mathagent import correction, metrics
    from mathagent.grading import Grader

    with _user_errors():
        if format not in ("sft", "pairs"):
            raise UserError(f"--format {format!r}: choose from sft, pairs")
        if not 0 <= failed_share <= 1:
            raise UserError(f"--failed-share {failed_share}: must be between 0 and 1")
        markers = _markers(None, 0, verdicts, revision_cue, None, None)
        invalid = InvalidCounter()
        records = list(read_records(input, required=("id", "problem_id", "messages", "answer"),
                                    skip_invalid=skip_invalid, invalid=invalid))
        _report_invalid(invalid)
        with Grader() as grader:
            graded = metrics.grade_trajectories(records, grader)
        demonstrations, stats = correction.build_demonstrations(graded, failed_share=failed_share, seed=seed,
                                                                markers=markers)
        out = demonstrations if format == "sft" else correction.build_pairs(demonstrations, markers=markers)
        with _record_stream() as stdout, RecordWriter(output, stdout=stdout) as writer:
            for record in out:
                writer.write(record)
        shapes = ", ".join(f"{n} {shape}" for shape, n in stats.shapes.items())
        console.print(f"make-corrections: {stats.problems} problems ({stats.skipped} with nothing to make): "
                      f"{shapes}" + (f"; {len(out)} pairs" if format == "pairs" else ""), highlight=False)


StepsOpt = Annotated[str, typer.Option("--steps", help="What a step is: turns (an action with its observations) or paragraphs (the text of actions split at blank lines, never inside a ``` fence; an action's observations go with its last paragraph).")]


@app.command("mc-label")
def mc_label(
    input: InputArg = "-",
    output: OutputOpt = "-",
    model: ModelOpt = "tiny",
    backend: BackendOpt = "vllm",
    adapter: AdapterOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = 64,
    m: Annotated[int, typer.Option("--m", help="M: completions sampled from each step's prefix.")] = 8,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_tokens: MaxTokensOpt = 512,
    max_turns: MaxTurnsOpt = 6,
    seed: SeedOpt = 0,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Continue under this prompt instead of each trajectory's own first user message: 'tool', 'cot', or a file with a {question} placeholder (needs the field 'question'). Default: the trajectory's own.")] = None,
    steps: StepsOpt = "turns",
    schedule: ScheduleOpt = "turns",
    self_reward: Annotated[str | None, typer.Option("--self-reward", help="Continue self-rewarding trajectories in their mode (prompted or inline, as rollout --self-reward): completions are judged and revised, and graded on their final answer.")] = None,
    max_revisions: Annotated[int, typer.Option("--max-revisions", help="R of the completions (with --self-reward).")] = 1,
    verdicts: Annotated[str, typer.Option("--verdicts", help="The two verdict strings, CORRECT|WRONG (with --self-reward).")] = f"{DEFAULT_MARKERS.correct}|{DEFAULT_MARKERS.wrong}",
    q: Annotated[str, typer.Option("--q", help="The soft label 'q': mean (Q-hat, the fraction of correct completions) or soft-optimal (Q* = eta log mean exp(u/eta), the talk's KL-regularised value; eta -> infinity gives the mean, eta -> 0 the hard label).")] = "mean",
    eta: Annotated[float, typer.Option("--eta", help="eta of --q soft-optimal (the KL coefficient).")] = 1.0,
    format: Annotated[str, typer.Option("--format", help="records: every input trajectory with 'steps' added; prm: PRM training chats (user = step, assistant = '+'/'-') with 'labels' and soft labels 'q'.")] = "records",
    observation_role: ObservationRoleOpt = "user",
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Trajectories labeled together (their prefixes go to the engine together); output is written, and resumable, chunk by chunk.")] = 1024,
    timeout: TimeoutOpt = 10.0,
    memory_mb: MemoryOpt = 2048,
    max_output_chars: MaxOutputOpt = 2000,
    workers: WorkersOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: auto, bfloat16, float16, float32.")] = "auto",
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="vLLM context length (default: the model's).")] = None,
    resume: ResumeOpt = False,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Label every step of graded trajectories by Monte Carlo: Q-hat = fraction of M completions that are correct.

    Input: trajectories with messages, answer and correct (as rollout writes them). For each step h but the
    last, M completions of the prefix up to a_h and its observation run through the agent loop (code executed)
    and are graded: "steps"[h] = {"q": Q-hat, "label": "+" if any is correct else "-", "m": M, "correct": hits}.
    A completion cut by --max-tokens is continued (up to --max-turns rounds), and left out of Q-hat if still
    cut ("cut": how many). The last step is the trajectory's own grade: {"q": 1.0 or 0.0, "label", "m": 0}.
    Identical prefixes are sampled once; all prefixes of a chunk go to the engine together. The cost goes to
    stderr.
    """
    from mathagent import agent, labeling, prm
    from mathagent.engines import open_engine
    from mathagent.grading import Grader
    from mathagent.sandbox import Sandbox
    from mathagent.tiny import resolve_model

    with _user_errors():
        if m < 1:
            raise UserError("--m must be at least 1")
        _check_generation(temperature=temperature, top_p=top_p, max_tokens=max_tokens, max_turns=max_turns,
                          chunk_size=chunk_size, dtype=dtype, observation_role=observation_role, schedule=schedule)
        _check_model("--model", model)
        _check_backend(backend, base_url, concurrency, adapter)
        if steps not in labeling.STEP_MODES:
            raise UserError(f"--steps {steps!r}: choose from {', '.join(labeling.STEP_MODES)}")
        labeling.check_estimate(q, eta)
        if format not in ("records", "prm"):
            raise UserError(f"--format {format!r}: choose from records, prm")
        template = agent.load_prompt(prompt) if prompt is not None else None
        invalid = InvalidCounter()
        records = list(read_records(input, required=("id", "messages", "answer", "correct"), skip_invalid=skip_invalid,
                                    invalid=invalid, check=labeling.check_graded_trajectory, unique_ids=True))
        _report_invalid(invalid)
        finished: dict[str, dict[str, Any]] = {}
        if resume and output != "-":
            finished = {r["id"]: r for r in read_finished(output)}
            console.print(f"resume: {sum(r['id'] in finished for r in records)} of {len(records)} trajectories already done", highlight=False)
        config = agent.AgentConfig(max_turns=max_turns, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                   seed=seed, observation_role=observation_role, schedule=schedule,
                                   self_reward=self_reward, max_revisions=max_revisions,
                                   markers=_markers(self_reward, max_revisions, verdicts, DEFAULT_MARKERS.cue, None, None))
        todo = [r for r in records if r["id"] not in finished]
        step_counts = [len(labeling.split_steps(r["messages"], steps)) for r in todo]
        needs_engine = any(count > 1 for count in step_counts)
        single = step_counts.count(1)
        if single and steps == "turns":
            console.print(
                f"mc-label: {single} of {len(todo)} trajectories have a single action: with --steps turns that is "
                "one step, labeled by the trajectory's own grade, with no Monte-Carlo estimate. For "
                "chain-of-thought solutions use --steps paragraphs (each paragraph a step).", highlight=False)
        report = labeling.LabelingReport()

        def on_turn(turn) -> None:
            console.print(f"mc-label: turn {turn.turn}: {turn.generated} actions, {turn.executed} cells, "
                          f"{turn.tokens} tokens, {turn.finished} completions ended", highlight=False)

        with _record_stream() as stdout, RecordWriter(output, stdout=stdout) as writer, Grader() as grader:
            engine = open_engine(backend, resolve_model(model), adapter=adapter, seed=seed, dtype=dtype,
                                 max_model_len=max_model_len, base_urls=base_url,
                                 concurrency=concurrency) if needs_engine else None
            sandbox = Sandbox(workers=workers, timeout=timeout, memory_mb=memory_mb,
                              max_output_chars=max_output_chars) if needs_engine else None
            cache = labeling.LabelCache()
            try:
                for chunk in _chunks(records, chunk_size):
                    new = [r for r in chunk if r["id"] not in finished]
                    if new:
                        report.add(labeling.label_trajectories(new, engine, sandbox, grader, config, m=m, mode=steps,
                                                               cache=cache, prompt=template, estimate=q, eta=eta,
                                                               on_turn=on_turn))
                    for r in chunk:
                        if r["id"] in finished:
                            writer.write(finished[r["id"]])
                        else:
                            writer.write(prm.prm_example(r, steps) if format == "prm" else r)
            finally:
                if sandbox is not None:
                    sandbox.close()
                if engine is not None:
                    engine.close()
        console.print(f"mc-label: {report.summary()}; {grader.stats.summary()}", highlight=False)


@app.command("score-prm")
def score_prm(
    input: InputArg = "-",
    output: OutputOpt = "-",
    model: Annotated[str, typer.Option("--model", help="The PRM: a directory train-prm wrote (full model or LoRA adapter), a hub id, or 'tiny'.")] = "prm",
    steps: Annotated[str | None, typer.Option("--steps", help="What a step is: turns or paragraphs (see mc-label). Default: what the PRM was trained on (its prm.json), else turns.")] = None,
    aggregate: Annotated[str, typer.Option("--aggregate", help="Trajectory score from its step scores: min (Math-Shepherd's), prod (PRM800K's), mean (RLHFlow's) or last; docs/prm.md compares them.")] = "min",
    field: Annotated[str, typer.Option("--field", help="Field the aggregate is written to (for `mathagent evaluate --score-field`).")] = "score",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Trajectories per forward pass.")] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: auto, bfloat16, float16, float32.")] = "auto",
    resume: ResumeOpt = False,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Score every step of trajectories with a PRM: one forward pass per trajectory reads P('+') at every step.

    Writes each input record with "step_scores" (P('+') per step) and the aggregate in --field ("score"), in
    order. Then `mathagent evaluate --score-field score` reports best-of-n.
    """
    from mathagent import labeling, prm
    from mathagent.tiny import resolve_model

    with _user_errors():
        _check_model("--model", model)
        model = resolve_model(model)
        if steps is None:  # score steps as the PRM was taught to see them
            steps = prm.trained_steps_mode(model)
        if steps not in labeling.STEP_MODES:
            raise UserError(f"--steps {steps!r}: choose from {', '.join(labeling.STEP_MODES)}")
        if aggregate not in prm.AGGREGATES:
            raise UserError(f"--aggregate {aggregate!r}: choose from {', '.join(prm.AGGREGATES)}")
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        invalid = InvalidCounter()
        records = list(read_records(input, required=("id", "messages"), skip_invalid=skip_invalid, invalid=invalid,
                                    unique_ids=True))
        _report_invalid(invalid)
        finished: dict[str, dict[str, Any]] = {}
        if resume and output != "-":
            finished = {r["id"]: r for r in read_finished(output)}
        todo = [r for r in records if r["id"] not in finished]
        report = prm.ScoreReport()
        with _record_stream() as stdout, RecordWriter(output, stdout=stdout) as writer:
            if todo:
                model_, tokenizer = prm.load_prm(model, dtype=dtype)
                report = prm.score_trajectories(model_, tokenizer, todo, mode=steps, how=aggregate, field=field,
                                                batch_size=batch_size)
            for r in records:
                writer.write(finished.get(r["id"], r))
        console.print(f"score-prm: {report.trajectories} trajectories, {report.steps} steps in {report.forward_passes} "
                      f"forward passes, {report.seconds:.1f} s"
                      + (f"; {report.per_prefix} scored prefix by prefix (their chat template tokenizes a step's "
                         f"prompt differently from the whole conversation)" if report.per_prefix else ""),
                      highlight=False)


# --------------------------------------------------------------------------------------------------------
# Training: train-mdpo, train-sft, train-prm, one recipe (mathagent/training.py; losses.py, prm.py)
# --------------------------------------------------------------------------------------------------------

# The options every training command takes, declared here once, with their defaults (a command may set its
# own default: `training_command`). They are fields of training.TrainConfig, but for input and skip_invalid.
TRAINING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "input": (Annotated[str, typer.Argument(help="Input JSONL path, or '-' for stdin (a path under torchrun / accelerate launch).")], "-"),
    "output_dir": (Annotated[str, typer.Option("--output-dir", "-o", help="Directory for the trained model (or LoRA adapter), metrics.jsonl, training_summary.json and checkpoints/.")], None),
    "model": (ModelOpt, "tiny"),
    "learning_rate": (Annotated[float, typer.Option("--learning-rate", "--lr", help="AdamW learning rate.")], None),
    "lr_scheduler": (Annotated[str, typer.Option("--lr-scheduler", help="linear, cosine, constant or constant_with_warmup (after --warmup-steps).")], "linear"),
    "warmup_steps": (Annotated[int, typer.Option("--warmup-steps", help="Learning-rate warm-up steps (transformers' schedules: the first step's rate is 0).")], 0),
    "weight_decay": (Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")], 0.0),
    "max_grad_norm": (Annotated[float, typer.Option("--max-grad-norm", help="Clip the gradient norm to this (0: no clipping).")], 1.0),
    "batch_size": (Annotated[int, typer.Option("--batch-size", help="Examples per optimizer step over all processes and micro-batches (train-mdpo: pairs; train-sft: trajectories; train-prm: PRM chats).")], 8),
    "grad_accum": (Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step (per process); --batch-size is split across them.")], 1),
    "max_steps": (Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps in all (overrides --epochs).")], None),
    "epochs": (Annotated[float, typer.Option("--epochs", help="Passes over the data, each in its own seeded order; may be fractional (ceil(epochs x steps per epoch) steps).")], 1.0),
    "lora": (Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter on every linear layer (peft) instead of all weights.")], False),
    "lora_rank": (Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.")], 16),
    "lora_alpha": (Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha (scale alpha / r).")], 32),
    "merge_lora": (Annotated[bool, typer.Option("--merge-lora", help="Save the LoRA merged into the base model (vLLM --model, transformers alone) instead of the adapter (vLLM --adapter with the base --model).")], False),
    "resume": (Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output-dir (same data and options); nothing to do on a finished run.")], False),
    "seed": (Annotated[int, typer.Option("--seed", help="Random seed: the data order of every epoch and the LoRA initialization.")], 0),
    "max_length": (Annotated[int, typer.Option("--max-length", help="Drop examples longer than this many tokens, never cut them (counted and reported; make-pairs --max-length has the same default).")], DEFAULT_MAX_LENGTH),
    "gradient_checkpointing": (Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, more time.")], False),
    "save_every": (Annotated[int, typer.Option("--save-every", help="Checkpoint every N optimizer steps (0: only the final model).")], 0),
    "precision": (Annotated[str, typer.Option("--precision", help="auto (bf16 mixed precision on a GPU that has it, else fp32), bf16 or fp32.")], "auto"),
    "report_to": (Annotated[str, typer.Option("--report-to", help="Also send each step's metrics (the names and steps of OUTPUT_DIR/metrics.jsonl, which is always written) to: none; tensorboard (offline event files in OUTPUT_DIR/tensorboard: tensorboard --logdir OUTPUT_DIR/tensorboard); wandb (project $WANDB_PROJECT, default mathagent; its files in OUTPUT_DIR/wandb); a comma list of these; or all (those installed). From the main process only.")], "none"),
    "skip_invalid": (SkipInvalidOpt, False),
}
MaskObservationsOpt = Annotated[bool, typer.Option("--mask-observations/--no-mask-observations", help="Loss on the agent's action tokens only (default), or on every token after the prompt, observations and template scaffolding included (the single-turn baseline).")]


def training_command(name: str, **defaults: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a training command. Its options: INPUT, --output-dir and --model, then the function's own, then
    the rest of TRAINING_OPTIONS (with `defaults` for some). The function is called with its own options by name
    and the shared ones as `options`, a dict."""
    import inspect

    def register(function: Callable[..., None]) -> Callable[..., None]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(function, eval_str=True).parameters.values() if p.name != "options"]
        shared = [inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                    default=defaults.get(option, default))
                  for option, (annotation, default) in TRAINING_OPTIONS.items()]

        def command(**values: Any) -> None:
            function(options={option: values.pop(option) for option in TRAINING_OPTIONS}, **values)

        command.__signature__ = inspect.Signature(shared[:3] + own + shared[3:])  # type: ignore[attr-defined]
        command.__doc__ = function.__doc__
        app.command(name)(command)
        return function

    return register


def _train_line(row: dict[str, Any]) -> str:
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


def _training_config(options: dict[str, Any], **objective: Any) -> tuple[Any, str, bool]:
    """The checked `training.TrainConfig` of the shared options and a command's own, with INPUT and
    --skip-invalid; an impossible option is a UserError here, before any work."""
    from mathagent import training

    options = dict(options)
    input, skip_invalid = options.pop("input"), options.pop("skip_invalid")
    config = training.TrainConfig(**options, **objective)
    if input == "-" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("under torchrun / accelerate launch every process reads the input: give a path, not stdin")
    config.check()
    _check_model("--model", config.model)
    _check_model("--ref-model", config.ref_model)
    _check_output_dir(config.output_dir)
    return config, input, skip_invalid


def _run_training(name: str, config: Any, input: str, skip_invalid: bool, check: Callable[[dict[str, Any]], str | None],
                  *, required: tuple[str, ...] = ("id",),
                  evaluate: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Read the records, train (`training.train`), print the summary: every training command's body.
    `evaluate` adds to the summary, on the main process, once the model is saved."""
    from mathagent import training

    invalid = InvalidCounter()
    records = list(read_records(input, required=required, skip_invalid=skip_invalid, invalid=invalid, check=check))
    _report_invalid(invalid)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = os.environ.get("RANK", "0") == "0"
    with _record_stream() as stdout:
        summary = training.train(config, records, on_step=lambda row: console.print(_train_line(row), highlight=False),
                                 log=lambda line: console.print(line, highlight=False))
        if main_process:
            if evaluate is not None:
                summary.update(evaluate(summary))
            stdout.write(json.dumps(summary) + "\n")
    if main_process:
        final = summary["final"]
        console.print(f"{name}: {summary['steps']} steps in {summary['train_seconds']:.1f} s "
                      f"({summary['tokens_per_second'] or 0:.0f} tok/s), final loss {final.get('loss', float('nan')):.4f}; "
                      f"saved the {summary['saved']} to {summary['output_dir']}"
                      + (f"; held-out label accuracy {summary['eval_accuracy']:.3f}" if "eval_accuracy" in summary
                         else ""), highlight=False)
    if processes > 1:
        # A bounded teardown under torchrun: the work is saved and the group destroyed; threads that libraries
        # leave behind (gloo, tokenizers) must not keep this rank, and so torchrun, from exiting.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@training_command("train-mdpo", output_dir="mdpo", learning_rate=5e-7)
def train_mdpo(
    options: dict[str, Any],
    ref_model: Annotated[str | None, typer.Option("--ref-model", help="Reference policy pi_ref (default: the starting policy --model); its log-probs are computed once, before training, and cached in OUTPUT_DIR/reference_logps.json.")] = None,
    loss: Annotated[str, typer.Option("--loss", help="sigmoid (M-DPO), ipo, hinge, or kto (M-KTO: reads make-pairs --format kto records, or pairs as two examples each).")] = "sigmoid",
    beta: Annotated[float, typer.Option("--beta", help="The paper's eta: the KL coefficient; a trajectory's reward is beta x its summed action log-ratio.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Conservative DPO: the assumed probability that a pair's preference is flipped (sigmoid loss).")] = 0.0,
    nll_weight: Annotated[float, typer.Option("--nll-weight", help="Add this times the mean NLL of the chosen action tokens (pair losses).")] = 0.0,
    desirable_weight: Annotated[float, typer.Option("--desirable-weight", help="M-KTO: weight of the desirable examples' loss.")] = 1.0,
    undesirable_weight: Annotated[float, typer.Option("--undesirable-weight", help="M-KTO: weight of the undesirable examples' loss.")] = 1.0,
    mask_observations: MaskObservationsOpt = True,
) -> None:
    """Multi-turn preference learning (M-DPO / M-KTO): the log-ratio log pi/pi_ref is summed over the agent's
    action tokens only; observations (the interpreter's output) are masked.

    Input: make-pairs records {"id","prompt","chosen","rejected"} (or, with --loss kto, {"id","prompt",
    "completion","label"}). One row per optimizer step goes to OUTPUT_DIR/metrics.jsonl (loss, rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins as in TRL) and a line to stderr; a JSON summary to
    stdout. Runs under `torchrun` / `accelerate launch` for several devices (docs/training.md).
    """
    from mathagent import losses, training

    with _user_errors():
        if loss not in losses.LOSSES:
            raise UserError(f"--loss {loss!r}: choose from {', '.join(losses.LOSSES)}")
        objective = "kto" if loss == "kto" else "pairs"
        config = _training_config(options, objective=objective, ref_model=ref_model, loss=loss, beta=beta,
                                  label_smoothing=label_smoothing, nll_weight=nll_weight,
                                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                  mask_observations=mask_observations)
        _run_training("train-mdpo", *config, training.check_kto if objective == "kto" else training.check_pair)


@training_command("train-sft", output_dir="sft", learning_rate=1e-5)
def train_sft(options: dict[str, Any], mask_observations: MaskObservationsOpt = True) -> None:
    """Supervised fine-tuning on trajectories (make-pairs --format sft, or any records with "messages"): the
    negative log-likelihood of the action tokens only, averaged over the step's action tokens.

    Same tokenization, checkpoints, --resume, LoRA and multi-device support as train-mdpo.
    """
    from mathagent import training

    with _user_errors():
        config = _training_config(options, objective="sft", mask_observations=mask_observations)
        _run_training("train-sft", *config, training.check_trajectory)


@training_command("train-prm", output_dir="prm", learning_rate=1e-5, lr_scheduler="constant_with_warmup")
def train_prm(
    options: dict[str, Any],
    labels: Annotated[str, typer.Option("--labels", help="hard: cross-entropy on the '+'/'-' label token; soft: binary cross-entropy of P('+') among {'+','-'} against Q-hat.")] = "hard",
    steps: StepsOpt = "turns",
    eval_path: Annotated[str | None, typer.Option("--eval", help="Held-out examples (same formats as the input): report their label accuracy, scored as score-prm scores.")] = None,
) -> None:
    """Fine-tune a causal LM as a process reward model on step labels, with the loss on the label tokens only.

    Input: mc-label output, either trajectories with "steps" or --format prm chats (user = step, assistant =
    '+'/'-', soft labels in "q"). Saves a model that loads with transformers (or a peft adapter with --lora and
    no --merge-lora), and prm.json. One row per optimizer step (loss, grad_norm, learning_rate, epoch) goes to
    OUTPUT_DIR/metrics.jsonl and a line to stderr; a JSON summary (with the held-out accuracy of --eval) to
    stdout. Same recipe as train-mdpo: checkpoints, --resume, LoRA, torchrun / accelerate launch.
    """
    from mathagent import prm

    def held_out_accuracy(summary: dict[str, Any]) -> dict[str, Any]:
        model, tokenizer = prm.load_prm(summary["output_dir"])
        examples = [prm.training_chat(r, steps)[:2] for r in held_out]
        return {"eval_accuracy": prm.label_accuracy(model, tokenizer, examples),
                "eval_labels": sum(len(step_labels) for _, step_labels in examples)}

    with _user_errors():
        config = _training_config(options, objective="prm", labels=labels, steps_mode=steps)
        check = lambda r: prm.check_training_record(r, steps, labels)  # noqa: E731
        held_out = list(read_records(eval_path, required=("messages",), check=check)) if eval_path else []
        _run_training("train-prm", *config, check, required=("id", "messages"),
                      evaluate=held_out_accuracy if held_out else None)


def main() -> None:
    # vLLM's info logs would drown the progress bar; users can ask for them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
