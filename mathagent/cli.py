"""The `mathagent` command line: one command per stage of the method, JSONL in and out.

Each command declares its options and makes one call, to the stage of the same name in mathagent/stages.py
(which opens the engine, sandbox and grader, and reads and writes the records); a choice option is an enum of
the values its module declares. Records go to stdout or `-o PATH` (atomically); logs and progress go to
stderr, so stages chain through pipes:

    mathagent rollout problems.jsonl --model tiny --n 4 | mathagent evaluate
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from mathagent import __version__, agent, correction, labeling, pairs, rewards, stages
from mathagent.chat import DEFAULT_MAX_LENGTH
from mathagent.attempts import DEFAULT_MARKERS
from mathagent.engines import BACKENDS, DTYPES
from mathagent.errors import user_errors
from mathagent.records import OBSERVATION_ROLES
from mathagent.stages import EngineOptions, RecordIO, SandboxOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train LLM math agents with multi-turn tool-integrated preference learning (M-DPO / M-KTO).",
)


class _OptionError(typer.BadParameter):
    """A wrong choice is one line on stderr and exit code 2, like every other impossible option."""

    def show(self, file: Any = None) -> None:
        sys.stderr.write(f"error: {self.message}\n")


def _choice(name: str, values: Sequence[str]) -> type[enum.StrEnum]:
    """The values of a choice option, declared where they belong (e.g. rewards.REWARD_KINDS), as an enum."""
    return enum.StrEnum(name, {value: value for value in values})


def _choose(option: str, choices: type[enum.StrEnum], *, refused: dict[str, str] | None = None, **kwargs: Any):
    """A typer.Option whose value is one of `choices`; `refused` names values refused with a reason."""
    def parse(value: str) -> enum.StrEnum:
        if isinstance(value, choices):
            return value
        if refused and value in refused:
            raise _OptionError(f"{option} cannot be {value}: {refused[value]}")
        try:
            return choices(value)
        except ValueError:
            raise _OptionError(f"{option} {value!r}: choose from {', '.join(choices)}") from None

    return typer.Option(option, parser=parse, metavar=f"[{'|'.join(choices)}]", **kwargs)


Backend = _choice("Backend", BACKENDS)
Dtype = _choice("Dtype", DTYPES)
Reward = _choice("Reward", rewards.REWARD_KINDS)
Schedule = _choice("Schedule", agent.SCHEDULES)
SelfReward = _choice("SelfReward", agent.SELF_REWARD_MODES)
ObservationRole = _choice("ObservationRole", OBSERVATION_ROLES)
PairFormat = _choice("PairFormat", pairs.FORMATS)
Strategy = _choice("Strategy", pairs.STRATEGIES)
CorrectionFormat = _choice("CorrectionFormat", correction.FORMATS)
LabelFormat = _choice("LabelFormat", labeling.FORMATS)
StepMode = _choice("StepMode", labeling.STEP_MODES)
QEstimate = _choice("QEstimate", labeling.Q_ESTIMATES)

# Options shared by several stages.
InputArg = Annotated[str, typer.Argument(help="Input JSONL path, or '-' for stdin.")]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output JSONL path (written atomically), or '-' for stdout.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Keep the records already in --output (or left by a killed run) and do only the missing ids.")]
SkipInvalidOpt = Annotated[bool, typer.Option("--skip-invalid", help="Count and skip malformed input lines instead of stopping with exit code 2.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Model: a local path, a hub id, or 'tiny' (the embedded tiny model, built once into the cache).")]
BackendOpt = Annotated[Backend, _choose("--backend", Backend, help="Generation backend: vllm, hf (transformers), or openai (OpenAI-compatible servers that already run, e.g. `vllm serve`: see --base-url).")]
BaseUrlOpt = Annotated[list[str] | None, typer.Option("--base-url", help="With --backend openai: a server's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat it for several servers (requests go to the least busy). --model gives the tokenizer and chat template and names the served model (a peft adapter directory: its base model, with the adapter loaded into the servers); --adapter is a peft adapter directory the servers load (vllm serve --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) or the name of a LoRA module they serve.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="With --backend openai: the most requests in flight per server.")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="A peft LoRA adapter directory to generate with.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Most tokens generated per turn.")]
MaxTurnsOpt = Annotated[int, typer.Option("--max-turns", help="H: the most actions (assistant turns) a trajectory may have in all.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; each trajectory's samples are seeded from it and its id.")]
PromptOpt = Annotated[str, typer.Option("--prompt", help="'tool' (python blocks, then \\boxed{}), 'cot' (plain chain of thought), or a file with a {question} placeholder.")]
ObservationRoleOpt = Annotated[ObservationRole, _choose("--observation-role", ObservationRole, refused={"assistant": "observations are not the agent's actions"}, help="Role of observation messages: user (as in the M-DPO data) or tool.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Per-cell wall-clock and CPU limit, in seconds.")]
MemoryOpt = Annotated[int, typer.Option("--memory-mb", help="Memory budget of each trajectory's session (all its processes, memfds and files), in MiB.")]
MaxOutputOpt = Annotated[int, typer.Option("--max-output-chars", help="Observation text beyond this is cut, with a marker saying how much.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Sandbox worker processes (default: the number of cores).")]
ScheduleOpt = Annotated[Schedule, _choose("--schedule", Schedule, help="turns: all live trajectories advance together, one engine call per turn; continuous (vLLM, servers): each goes on as soon as its own observation is back; auto: continuous where the engine does not generate on this machine's CPU (CUDA vLLM, --backend openai), else turns (benchmarks/rollout.py measures both).")]
VerdictRewardOpt = Annotated[float, typer.Option("--verdict-reward", help="w: a self-rewarding trajectory's reward also gets w x the mean of +1 per faithful verdict and -1 per false one (docs/self-rewarding.md). 0: the final answer's reward only.")]
DtypeOpt = Annotated[Dtype, _choose("--dtype", Dtype, help="Model dtype: auto, bfloat16, float16, float32.")]
RewardOpt = Annotated[Reward, _choose("--reward", Reward, help="Reward rule: r1 (DeepSeek-R1's rule: +1 boxed and correct, -0.5 boxed and wrong, -1 no boxed answer) or binary (1/0).")]


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


# The flags of the options whose flag is not "--" + the option's name with dashes (what `UserError.options` name).
FLAGS = {"learning_rate": "--lr", "steps_mode": "--steps", "eta": "--q-eta"}


def _user_errors() -> contextlib.AbstractContextManager[None]:
    return user_errors(FLAGS)


def _engine(model: str, backend: str, adapter: str | None, base_url: list[str] | None, concurrency: int,
            seed: int, dtype: str, max_model_len: int | None) -> EngineOptions:
    return EngineOptions(model=model, backend=backend, adapter=adapter, base_urls=tuple(base_url or ()),
                         concurrency=concurrency, seed=seed, dtype=dtype, max_model_len=max_model_len)


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
    tools: Annotated[bool, typer.Option("--tools/--no-tools", help="Tool-integrated reasoning (python blocks end an action and run); --no-tools: plain reasoning, as DeepSeek-R1-Zero's runs (nothing cut at a python block or executed, no sandbox; one action per trajectory unless --max-tokens cuts it).")] = True,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: take only every N-th input record starting at I (split the input across machines).")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Trajectories advanced together; output is written (and resumable) chunk by chunk.")] = 1024,
    reward: RewardOpt = "r1",
    schedule: ScheduleOpt = "auto",
    self_reward: Annotated[SelfReward | None, _choose("--self-reward", SelfReward, help="Self-rewarding correction (docs/self-rewarding.md): after an answer the model's own verdict ('[VERIFY] correct' ends, '[VERIFY] wrong' leads to a revision). prompted: asked for in user turns; inline: the model's message goes on, as a trained model writes it. Off by default.")] = None,
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
    dtype: DtypeOpt = "auto",
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="vLLM context length (default: the model's).")] = None,
    resume: ResumeOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    job: Annotated[list[str] | None, typer.Option("--job", help="'INPUT -o OUTPUT [--n N] [--temperature T] [--top-p P] [--seed S]': one more input sampled in the same engine start (repeatable), after INPUT; every other option is shared. The loop samples an iteration's held-out evaluations and the next iteration's training samples this way.")] = None,
) -> None:
    """Sample multi-turn tool-integrated trajectories: text + ```python -> run -> ```output -> ... -> \\boxed{}.

    Input: problems {"id","question","answer"?}, or trajectories to continue (ending in an observation, in
    pending code, or in an action cut by --max-tokens). Output: trajectories with status, pred, correct, reward.
    With --job, several inputs (each with its own output, samples, temperature and seed) share one engine start.
    """
    with _user_errors():
        config = agent.AgentConfig(
            max_turns=max_turns, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
            observation_role=observation_role, execute=execute, tools=tools, reward=reward, schedule=schedule,
            self_reward=self_reward, max_revisions=max_revisions, verdict_reward=verdict_reward,
            markers=stages.markers_from_options(verdicts, revision_cue, verify_prompt, revise_prompt))
        first = stages.RolloutJob(RecordIO(input, output, resume, skip_invalid), config, n)
        stages.rollout([first, *(stages.parse_job(spec, first) for spec in job or ())],
                       _engine(model, backend, adapter, base_url, concurrency, seed, dtype, max_model_len),
                       SandboxOptions(workers, timeout, memory_mb, max_output_chars),
                       prompt=prompt, system=system, shard=shard, chunk_size=chunk_size)


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
    with _user_errors():
        stages.execute(RecordIO(input, output, resume, skip_invalid),
                       SandboxOptions(workers, timeout, memory_mb, max_output_chars),
                       observation_role=observation_role, chunk_size=chunk_size)


@app.command()
def evaluate(
    inputs: Annotated[list[str] | None, typer.Argument(help="Input JSONL paths, or '-' for stdin (the default); each input is evaluated on its own.", show_default=False)] = None,
    pass_at: Annotated[str, typer.Option("--pass-at", help="The k of pass@k and maj@k, comma-separated: numbers, 'n' (the most samples a problem of the input has), and '...' up to a last term (1,2,4,...,64 doubles, 1,2,...,8 is every k to 8). A problem with fewer than k samples is left out of that k (problems@k counts those in).")] = "1,2,4,...,n",
    score_field: Annotated[str | None, typer.Option("--score-field", help="Report best-of-n: pick each problem's trajectory with the highest value of this field (e.g. a PRM's score).")] = None,
    answer_modes: Annotated[str, typer.Option("--answer-modes", help="Comma-separated answer forms to extract from the last action, tried in order: boxed, answer_is, gsm8k.")] = "boxed",
    reward: RewardOpt = "r1",
    verdict_reward: VerdictRewardOpt = 0.0,
    percent_scaling: Annotated[bool, typer.Option("--percent-scaling", help="Also accept answers off by a factor of 100 (0.5 for 50); off by default, since it grades wrong answers right.")] = False,
    grading_timeout: Annotated[float, typer.Option("--grading-timeout", help="Seconds allowed for one symbolic comparison; past it the answer grades wrong and is counted.")] = 5.0,
    json_path: Annotated[str | None, typer.Option("--json", help="Write the JSON summary (indented) to this path instead of stdout; one input only.")] = None,
    graded: Annotated[str | None, typer.Option("--graded", help="Write every input record with pred, correct and reward set by this grading (JSONL, atomically).")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Draw pass@n and maj@n against n (log2 axis), one line each per input, labelled by its file name, into this PNG (written atomically).")] = None,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Re-grade trajectories from their messages and report accuracy, pass@k, maj@k, best-of-n and turn statistics.

    Input: trajectories {"id","problem_id","answer","messages","status",...}, several per problem. Stored pred and
    correct are ignored: pred is extracted from the last action again. A table goes to stderr, the JSON summary
    to stdout, one line per input (or, for one input, to --json). Compare policies in the talk's Figure 2:

        mathagent evaluate sft.jsonl mdpo.jsonl --pass-at 1,2,4,8 --plot fig.png
    """
    with _user_errors():
        stages.evaluate([RecordIO(path, skip_invalid=skip_invalid) for path in inputs or ["-"]], pass_at=pass_at,
                        score_field=score_field, answer_modes=answer_modes, reward=reward,
                        verdict_reward=verdict_reward, percent_scaling=percent_scaling,
                        grading_timeout=grading_timeout, json_path=json_path, graded=graded, plot=plot)


@app.command("make-pairs")
def make_pairs(
    input: InputArg = "-",
    output: OutputOpt = "-",
    format: Annotated[PairFormat, _choose("--format", PairFormat, help="pairs: {prompt, chosen, rejected} for M-DPO; kto: each trajectory of the selected pairs once, {prompt, completion, label}; sft: the selected winners as trajectories, for rejection-sampling fine-tuning.")] = "pairs",
    strategy: Annotated[Strategy, _choose("--strategy", Strategy, help="random: up to K (winner, loser) combinations sampled without replacement; max-min: the best-scored winner against the worst-scored loser, then the next best against the next worst, up to K; all: every winner with every loser.")] = "random",
    k: Annotated[int | None, typer.Option("--k", help="Most pairs (for sft: winners) per problem; default 8 for random, 1 for max-min; not allowed with all.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random strategy; each problem's sample depends only on it and the problem id.")] = 0,
    score_field: Annotated[str | None, typer.Option("--score-field", help="max-min ranks by this numeric field (e.g. a PRM's score) instead of the reward.")] = None,
    reward_threshold: Annotated[float | None, typer.Option("--reward-threshold", help="Winners are the trajectories with reward above this, losers the rest, instead of correct / incorrect.")] = None,
    regrade: Annotated[bool, typer.Option("--regrade", help="Grade every trajectory with an answer from its messages; by default stored correct/reward are trusted and only records missing them are graded.")] = False,
    reward: Annotated[Reward, _choose("--reward", Reward, help="Reward rule of the trajectories graded here: r1 (DeepSeek-R1's rule: +1 boxed and correct, -0.5 boxed and wrong, -1 no boxed answer) or binary (1/0).")] = "r1",
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
    with _user_errors():
        if max_length is None and tokenizer is not None:
            max_length = DEFAULT_MAX_LENGTH  # what training would drop anyway
        config = pairs.PairConfig(
            strategy=strategy, k=k, seed=seed, score_field=score_field, reward_threshold=reward_threshold,
            keep_unfinished=keep_unfinished, keep_errors=keep_errors, max_length=max_length, regrade=regrade,
            reward_kind=reward, format=format,
        )
        stages.make_pairs(RecordIO(input, output, skip_invalid=skip_invalid), config, tokenizer=tokenizer,
                          stats_path=stats_path)


# --------------------------------------------------------------------------------------------------------
# Process reward model: mc-label -> train-prm -> score-prm (mathagent/labeling.py, mathagent/prm.py)
# --------------------------------------------------------------------------------------------------------

@app.command("make-corrections")
def make_corrections(
    input: InputArg = "-",
    output: OutputOpt = "-",
    format: Annotated[CorrectionFormat, _choose("--format", CorrectionFormat, help="sft: the demonstrations, trajectories for train-sft; pairs: preference pairs for train-mdpo (the faithful verdict over the false one, the successful correction over the failed one).")] = "sft",
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
    with _user_errors():
        stages.make_corrections(RecordIO(input, output, skip_invalid=skip_invalid), format=format,
                                failed_share=failed_share, seed=seed,
                                markers=stages.markers_from_options(verdicts, revision_cue))


StepsOpt = Annotated[StepMode, _choose("--steps", StepMode, help="What a step is: turns (an action with its observations) or paragraphs (the text of actions split at blank lines, never inside a ``` fence; an action's observations go with its last paragraph).")]


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
    schedule: ScheduleOpt = "auto",
    self_reward: Annotated[SelfReward | None, _choose("--self-reward", SelfReward, help="Continue self-rewarding trajectories in their mode (prompted or inline, as rollout --self-reward): completions are judged and revised, and graded on their final answer.")] = None,
    max_revisions: Annotated[int, typer.Option("--max-revisions", help="R of the completions (with --self-reward).")] = 1,
    verdicts: Annotated[str, typer.Option("--verdicts", help="The two verdict strings, CORRECT|WRONG (with --self-reward).")] = f"{DEFAULT_MARKERS.correct}|{DEFAULT_MARKERS.wrong}",
    q: Annotated[QEstimate, _choose("--q", QEstimate, help="The soft label 'q': mean (Q-hat, the fraction of correct completions) or soft-optimal (Q* = eta log mean exp(u/eta), the talk's KL-regularised value; eta -> infinity gives the mean, eta -> 0 the hard label).")] = "mean",
    q_eta: Annotated[float, typer.Option("--q-eta", help="eta of --q soft-optimal, on the scale of the 0/1 outcome u: 1 weighs the KL term like one correct answer. Not train-mdpo's --beta (the same eta in the talk, but on the scale of the Bradley-Terry reward of its pairs): see docs/prm.md.")] = 1.0,
    format: Annotated[LabelFormat, _choose("--format", LabelFormat, help="records: every input trajectory with 'steps' added; prm: PRM training chats (user = step, assistant = '+'/'-') with 'labels' and soft labels 'q'.")] = "records",
    observation_role: ObservationRoleOpt = "user",
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Trajectories labeled together (their prefixes go to the engine together); output is written, and resumable, chunk by chunk.")] = 1024,
    timeout: TimeoutOpt = 10.0,
    memory_mb: MemoryOpt = 2048,
    max_output_chars: MaxOutputOpt = 2000,
    workers: WorkersOpt = None,
    dtype: DtypeOpt = "auto",
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
    with _user_errors():
        config = agent.AgentConfig(max_turns=max_turns, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                   seed=seed, observation_role=observation_role, schedule=schedule,
                                   self_reward=self_reward, max_revisions=max_revisions,
                                   markers=stages.markers_from_options(verdicts))
        stages.mc_label(RecordIO(input, output, resume, skip_invalid),
                        _engine(model, backend, adapter, base_url, concurrency, seed, dtype, max_model_len),
                        SandboxOptions(workers, timeout, memory_mb, max_output_chars), config,
                        m=m, steps=steps, prompt=prompt, q=q, eta=q_eta, format=format, chunk_size=chunk_size)


@app.command("score-prm")
def score_prm(
    input: InputArg = "-",
    output: OutputOpt = "-",
    model: Annotated[str, typer.Option("--model", help="The PRM: a directory train-prm wrote (full model or LoRA adapter), a hub id, or 'tiny'.")] = "prm",
    steps: Annotated[StepMode | None, _choose("--steps", StepMode, help="What a step is: turns or paragraphs (see mc-label). Default: what the PRM was trained on (its prm.json), else turns.")] = None,
    aggregate: Annotated[str, typer.Option("--aggregate", help="Trajectory score from its step scores: min (Math-Shepherd's), prod (PRM800K's), mean (RLHFlow's) or last; docs/prm.md compares them.")] = "min",
    field: Annotated[str, typer.Option("--field", help="Field the aggregate is written to (for `mathagent evaluate --score-field`).")] = "score",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Trajectories per forward pass.")] = 8,
    implicit: Annotated[bool, typer.Option("--implicit", help="PRIME's implicit process reward instead of a trained PRM: --model is a policy trained with train-mdpo (M-DPO, M-KTO) and --ref-model its reference; step h scores beta x the sum of log pi/pi_ref over action h's tokens. Aggregates: min, mean, last, sum.")] = False,
    ref_model: Annotated[str | None, typer.Option("--ref-model", help="With --implicit: the reference policy pi_ref.")] = None,
    beta: Annotated[float, typer.Option("--beta", help="With --implicit: the beta of the log-ratio (train-mdpo's --beta).")] = 0.1,
    dtype: DtypeOpt = "auto",
    resume: ResumeOpt = False,
    skip_invalid: SkipInvalidOpt = False,
) -> None:
    """Score every step of trajectories with a PRM: one forward pass per trajectory reads P('+') at every step
    (or, with --implicit, the policy's and the reference's log-probs of every action token).

    Writes each input record with "step_scores" (P('+') per step, or the implicit rewards) and the aggregate in
    --field ("score"), in order. Then `mathagent evaluate --score-field score` reports best-of-n.
    """
    with _user_errors():
        stages.score_prm(RecordIO(input, output, resume, skip_invalid), model=model, steps=steps,
                         aggregate=aggregate, field=field, batch_size=batch_size, dtype=dtype, implicit=implicit,
                         ref_model=ref_model, beta=beta)


# --------------------------------------------------------------------------------------------------------
# Training: train-mdpo, train-sft, train-prm, one recipe (mathagent/training.py) and an objective each
# (mathagent/objectives.py)
# --------------------------------------------------------------------------------------------------------

# The options every training command takes, declared here once, with their defaults (a command may set its
# own default: `training_command`). They are fields of train_config.TrainConfig, but for input and skip_invalid.
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


def _train(name: str, options: dict[str, Any], objective: Callable[[Any], Any],
           check: Callable[[dict[str, Any]], str | None], *, required: tuple[str, ...] = ("id",),
           evaluate: Callable[[dict[str, Any]], dict[str, Any]] | None = None, flags: dict[str, str] | None = None,
           **own: Any) -> None:
    """A training command's one call: the shared options and its own make the `train_config.TrainConfig`, from
    which `objective` (an `objectives` class) is built; both go to the recipe. `flags`: the command's own
    flags of config fields (as `FLAGS`)."""
    from mathagent.train_config import TrainConfig

    options = dict(options)
    io = RecordIO(options.pop("input"), skip_invalid=options.pop("skip_invalid"))
    with user_errors({**FLAGS, **(flags or {})}):
        config = TrainConfig(**options, **own)
        stages.train(io, name, config, objective(config), check, required=required, evaluate=evaluate)


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
    from mathagent import objectives

    kto = loss == "kto"
    _train("train-mdpo", options, objectives.KTOObjective if kto else objectives.PairObjective,
           objectives.check_kto if kto else objectives.check_pair, ref_model=ref_model, loss=loss, beta=beta, label_smoothing=label_smoothing,
           nll_weight=nll_weight, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
           mask_observations=mask_observations)


@training_command("train-grpo", output_dir="grpo", learning_rate=1e-6)
def train_grpo(
    options: dict[str, Any],
    loss_type: Annotated[str, typer.Option("--loss-type", help="grpo (each trajectory's token mean, then the mean over trajectories), dapo (the mean over all the step's action tokens) or dr-grpo (their sum over trajectories x --max-completion-length), as TRL's GRPOTrainer loss_type.")] = "dapo",
    scale_rewards: Annotated[str, typer.Option("--scale-rewards", help="group: advantage = (reward - group mean) / (group std + 1e-4); none: reward - group mean (Dr. GRPO).")] = "group",
    epsilon: Annotated[float, typer.Option("--epsilon", help="Clip the importance ratio below at 1 - epsilon (and above at 1 + epsilon unless --epsilon-high).")] = 0.2,
    epsilon_high: Annotated[float | None, typer.Option("--epsilon-high", help="Clip the ratio above at 1 + epsilon-high (DAPO's clip-higher, e.g. 0.28); default: --epsilon.")] = None,
    beta: Annotated[float, typer.Option("--beta", help="Weight of the per-token k3 KL to the reference policy (0: none, and no reference pass).")] = 0.0,
    ref_model: Annotated[str | None, typer.Option("--ref-model", help="The reference policy of --beta (default: the starting policy --model).")] = None,
    num_iterations: Annotated[int, typer.Option("--num-iterations", help="Optimizer passes over the rollout batch (TRL's num_iterations, the mu of GRPO); the same as --epochs.")] = 1,
    max_completion_length: Annotated[int | None, typer.Option("--max-completion-length", help="dr-grpo's length constant (default: the most action tokens of any trajectory of the input).")] = None,
) -> None:
    """Online RL with rule-based rewards: GRPO on multi-turn trajectories, the policy gradient on the agent's
    action tokens only (observations masked, as in M-DPO), the importance ratio against the log-probs rollout
    recorded, clipped.

    Input: rollout trajectories with "reward", grouped by "problem_id" (a group: the --n samples of a
    problem); groups whose rewards are all equal carry no signal and are dropped (counted). One row per optimizer
    step goes to OUTPUT_DIR/metrics.jsonl (loss, advantage, clip_ratio/low and /high, entropy, kl with --beta,
    logprob_diff: |recorded - recomputed| per token, tokens_per_second); a JSON summary to stdout. Same recipe
    as train-mdpo: checkpoints, --resume, LoRA, torchrun / accelerate launch.
    """
    from mathagent import objectives

    if num_iterations < 1:
        raise typer.BadParameter(f"{num_iterations}: must be at least 1", param_hint="--num-iterations")
    if num_iterations != 1:
        if options["epochs"] != 1.0:
            raise typer.BadParameter("give --num-iterations or --epochs, not both (they are the same)",
                                     param_hint="--num-iterations")
        options = {**options, "epochs": float(num_iterations)}
    _train("train-grpo", options, objectives.GRPOObjective, objectives.check_rewarded,
           required=("id", "problem_id", "messages"), ref_model=ref_model, loss=loss_type,
           scale_rewards=scale_rewards, epsilon=epsilon, epsilon_high=epsilon_high, kl_beta=beta,
           max_completion_length=max_completion_length, flags={"loss": "--loss-type", "kl_beta": "--beta"})


@training_command("train-sft", output_dir="sft", learning_rate=1e-5)
def train_sft(options: dict[str, Any], mask_observations: MaskObservationsOpt = True) -> None:
    """Supervised fine-tuning on trajectories (make-pairs --format sft, or any records with "messages"): the
    negative log-likelihood of the action tokens only, averaged over the step's action tokens.

    Same tokenization, checkpoints, --resume, LoRA and multi-device support as train-mdpo.
    """
    from mathagent import objectives

    _train("train-sft", options, objectives.SFTObjective, objectives.check_trajectory,
           mask_observations=mask_observations)


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
    from mathagent import objectives, prm

    check = lambda r: prm.check_training_record(r, steps, labels)  # noqa: E731
    with _user_errors():
        held_out = RecordIO(eval_path).read(("messages",), check=check) if eval_path else []
    _train("train-prm", options, objectives.PRMObjective, check, required=("id", "messages"), labels=labels,
           steps_mode=steps, evaluate=(lambda summary: prm.held_out_accuracy(summary["output_dir"], held_out, steps)) if held_out else None)


def main() -> None:
    # vLLM's info logs would drown the progress bar; users can ask for them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
