"""Tool-integrated reasoning as an MDP: the multi-turn agent loop.

The state s_h = (x, a_1, o_1, ..., a_{h-1}, o_{h-1}) is a trajectory's `messages`. At each turn the policy
writes an action a_h (text, at most one ```python block); the code runs in the sandbox and its output comes
back as the observation o_h ("```output ... ```"); the loop goes on until a `\\boxed{}` answer, a turn without
code, or H = max_turns actions.

An action stops at EOS or at the end of its first python block (generation stops at "```output", which
models trained on this format write next, and the text after the block is cut).

Two schedules, same records (`AgentConfig.schedule`). "turns": all live trajectories advance together, one
engine call, then one sandbox call per turn. "continuous", with an engine that batches continuously (vLLM):
each trajectory goes on as soon as its own observation is back, its next request joining the running batch
while others still generate or run code, so no one waits for the slowest action or cell of a turn. Samples
are seeded per request (`request_seed`), so a trajectory's actions do not depend on the schedule, up to the
engine's batch-dependent numerics. "auto" (the default) is continuous where the engine does not generate on
this machine's CPU and turns where it does (`resolve_schedule`), as benchmarks/rollout.py measured.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mathagent import answers, attempts, grading, rewards, tokens
from mathagent.attempts import DEFAULT_MARKERS, Markers
from mathagent.engines import Engine, Request, Sampling
from mathagent.errors import UserError
from mathagent.records import (
    ANSWERED,
    LENGTH,
    MAX_TURNS,
    OBSERVATION_FENCE,
    STOPPED,
    TOOL_CALL,
    actions,
    is_observation,
    observation_message,
)

STEP_WAIT = 0.05  # seconds the continuous loop waits for running cells before stepping a small batch

_CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(action: str) -> str | None:
    """The code of the action's first complete ```python block, or None."""
    match = _CODE_BLOCK.search(action)
    return match.group(1) if match else None


def cut_after_code(text: str) -> str:
    """An action ends with its first python block: what a model writes after it cannot have seen the output."""
    match = _CODE_BLOCK.search(text)
    return text[: match.end()] if match else text


def pending_code(messages: Sequence[dict[str, str]], markers: Markers = DEFAULT_MARKERS) -> str | None:
    """The code of the last action if it still waits for its observation (and is not a final answer). In an
    action that holds a self-evaluation, only the text after its last verdict counts (the revision under way)."""
    last = messages[-1]
    if last["role"] != "assistant":
        return None
    content = attempts.after_last_verdict(last["content"], markers)
    if answers.extract_answer(content) is not None:
        return None
    return extract_code(content)


def executed_cells(messages: Sequence[dict[str, str]]) -> tuple[str, ...]:
    """Code of the actions that already have an observation, in order: the state a new cell runs on."""
    cells = []
    for i in actions(messages):
        code = extract_code(messages[i]["content"])
        if code is not None and i + 1 < len(messages) and is_observation(messages, i + 1):
            cells.append(code)
    return tuple(cells)


def new_trajectories(problem: dict[str, Any], n: int, prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """n fresh trajectories of a problem: ids `{problem id}-{k}`, every problem field kept."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt.format(question=problem["question"])})
    out = []
    for k in range(n):
        t = {key: value for key, value in problem.items() if key not in ("messages", "status")}
        t.update(id=f"{problem['id']}-{k}", problem_id=problem["id"], messages=[dict(m) for m in messages])
        out.append(t)
    return out


def branch(trajectory: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n continuations of one trajectory (ids `{id}-{k}`); n=1 continues it under its own id."""
    if n == 1:
        return [trajectory]
    return [{**trajectory, "id": f"{trajectory['id']}-{k}", "messages": [dict(m) for m in trajectory["messages"]]}
            for k in range(n)]


def grade(trajectory: dict[str, Any], grader: grading.Grader, reward_kind: str = "r1", verdict_reward: float = 0.0) -> None:
    """Set `pred` (the last boxed answer of the last action) and `correct` and `reward` (None without a gold
    answer), in place, with the command's grader."""
    trajectory.update(rewards.grade_trajectory(trajectory, grader, reward_kind=reward_kind,
                                               verdict_reward=verdict_reward))


@dataclass
class AgentConfig:
    max_turns: int = 6  # H: the most actions a trajectory may have in all, those it came with included
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512  # per turn
    seed: int = 0
    observation_role: str = "user"
    execute: bool = True  # False: stop at a tool call (status tool_call) and leave the code to `execute`
    # False: plain reasoning without the tool (DeepSeek-R1-Zero's runs): an action is not cut after a python
    # block, generation does not stop at "```output", nothing is executed (execute is then False too).
    tools: bool = True
    reward: str = "r1"
    # "turns": all live trajectories advance together, one engine call and one sandbox call per turn.
    # "continuous": each goes on as soon as its own observation is back, on an engine that batches continuously
    # (vLLM, servers; others fall back to turns). "auto": what `benchmarks/rollout.py` measured to win where the
    # engine runs (`resolve_schedule`).
    schedule: str = "auto"
    # Self-rewarding correction (`mathagent.attempts`): after an answer the model's own verdict is asked for,
    # and a "wrong" one leads to a revision, up to `max_revisions`. "prompted": the verdict and the revision are
    # asked for in user turns (markers.verify_prompt / revise_prompt); "inline": the model's message goes on
    # (after the verdict's common prefix, "[VERIFY] ", or the revision cue), as a trained model writes them.
    # None: off. Verdict and revision requests are not counted against max_turns; max_revisions bounds them.
    self_reward: str | None = None
    max_revisions: int = 1
    verdict_reward: float = 0.0  # w: adds w x the faithfulness of the verdicts to the reward (grading)
    markers: Markers = DEFAULT_MARKERS

    def __post_init__(self) -> None:
        if not self.tools:
            self.execute = False
        if self.max_turns < 1 or self.max_tokens < 1:
            raise UserError("n, max_turns, max_tokens and chunk_size must be at least 1",
                            options=("n", "max_turns", "max_tokens", "chunk_size"))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature {self.temperature}: must be 0 (greedy) or positive", options=("temperature",))
        if not (0 < self.top_p <= 1):
            raise UserError(f"top_p {self.top_p}: must be in (0, 1]", options=("top_p",))
        if self.max_revisions < 0:
            raise UserError("max_revisions must be 0 or more", options=("max_revisions",))
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}", options=("schedule",))
        if self.self_reward not in (None, *SELF_REWARD_MODES):
            raise UserError(f"self_reward {self.self_reward!r}: choose from {', '.join(SELF_REWARD_MODES)}",
                            options=("self_reward",))
        if not (math.isfinite(self.verdict_reward) and self.verdict_reward >= 0):
            raise UserError(f"verdict_reward {self.verdict_reward}: must be 0 or positive", options=("verdict_reward",))


SCHEDULES = ("auto", "turns", "continuous")
SELF_REWARD_MODES = ("prompted", "inline")


def resolve_schedule(schedule: str, engine: Engine) -> str:
    """The schedule `run_agent` runs: turns on an engine without continuous batching (no `submit`), whatever
    was asked; for "auto", continuous on one that does not generate on this machine's CPU (a CUDA vLLM,
    servers: `engine.on_cpu` False), where a turn's barrier leaves the accelerator idle while the slowest action
    or cell finishes, and turns on a CPU engine, where every core the cells take is taken from generation and
    one batch per turn used the cores best (benchmarks/rollout.py, both regimes)."""
    if not hasattr(engine, "submit"):
        return "turns"
    if schedule != "auto":
        return schedule
    return "turns" if getattr(engine, "on_cpu", True) else "continuous"


@dataclass
class TurnReport:
    turn: int
    generated: int  # actions generated this turn
    executed: int  # cells run this turn
    finished: int  # trajectories that ended this turn
    tokens: int  # tokens generated this turn
    seconds: float  # engine time this turn
    ended: tuple[str, ...] = ()  # ids of the trajectories that ended this turn


def request_seed(seed: int, trajectory_id: str, turn: int) -> int:
    """A per-request sampling seed: a trajectory's sample does not depend on what it was batched with."""
    digest = hashlib.blake2b(f"{seed}/{trajectory_id}/{turn}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def execute_pending(
    trajectories: Sequence[dict[str, Any]], sandbox, observation_role: str = "user", *, release: bool = False,
    markers: Markers = DEFAULT_MARKERS, tokenizer=None,
) -> int:
    """Run the pending code of every trajectory that has some, in one sandbox call, and append each output as
    an observation, with the cell's outcome (`records.observation_message`) and, given the policy's
    `tokenizer`, its token ids (`observe`). Returns the number of cells run. With `release` (`mathagent
    execute`: each record gets one cell) the sessions end right after their cell, so a chunk never holds more
    sessions (and their tmpfs) than it runs at once; `execute` has no tokenizer, and the next stage that has
    one computes the ids (`tokens.complete_ids`)."""
    from mathagent.sandbox import Cell

    todo = [(t, code) for t in trajectories if (code := pending_code(t["messages"], markers)) is not None]
    if not todo:
        return 0
    cells = [Cell(session=str(t["id"]), history=executed_cells(t["messages"]), code=code) for t, code in todo]
    for (t, _), result in zip(todo, sandbox.run(cells), strict=True):
        observe(t, result, observation_role, tokenizer)
        if release:
            sandbox.forget(str(t["id"]))
    return len(todo)


def observe(t: dict[str, Any], result, observation_role: str, tokenizer=None) -> None:
    """Append a cell's result to the trajectory as its observation; with the `tokenizer`, and where the
    trajectory carries ids, the observation's ids too (`tokens.observation_ids`)."""
    messages = t["messages"]
    messages.append(observation_message(result.output, result.status, result.cut, observation_role, result.escaped))
    if tokenizer is not None and tokens.PROMPT_IDS in t:
        messages[-1][tokens.TOKEN_IDS] = tokens.observation_ids(tokenizer, messages, len(messages) - 1)


@contextlib.contextmanager
def _collector_out_of_the_way():
    """The objects alive when the loop starts (the modules, the tokenizer, an in-process engine, the records)
    frozen out of the cyclic collector's full passes while it runs. Each such pass holds the interpreter for
    all of them (0.28 s over the ~360,000 of benchmarks/rollout.py's process with transformers imported), and
    in that time no cell result is taken, no cell submitted and no request sent; what the loop allocates is
    still collected. Unfrozen at the end, unless someone froze the heap before (vLLM's engine core does),
    whose freeze is then left as it is."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


@_collector_out_of_the_way()
def run_agent(
    trajectories: list[dict[str, Any]],
    engine: Engine,
    sandbox,
    grader: grading.Grader,
    config: AgentConfig,
    on_turn: Callable[[TurnReport], None] | None = None,
) -> list[dict[str, Any]]:
    """Advance every trajectory until it ends; set `status`, then `pred`, `correct`, `reward` (by `grader`, once
    all have ended). Mutates and returns the list, in order.

    A trajectory that comes in ending in an observation is continued; one whose last action was cut by the
    token limit (status `length`) gets that action continued; pending code is executed first. Every trajectory
    carries its token ids (`mathagent.tokens`): those it lacks are computed first, and each request's prompt
    is its ids so far, never a new rendering of its messages.
    """
    H = config.max_turns
    sampling = Sampling(config.temperature, config.top_p, config.max_tokens,
                        stop=(OBSERVATION_FENCE,) if config.tools else ())
    live = list(trajectories)
    for t in live:  # a cut action is continued once per run; other statuses are re-derived from messages
        if t.get("status") != LENGTH:
            t.pop("status", None)
        tokens.complete_ids(engine.tokenizer, t, continuing=t.get("status") == LENGTH)
    _reserve_sessions(live, sandbox, config)
    if resolve_schedule(config.schedule, engine) == "continuous":
        return _graded(_run_continuously(trajectories, engine, sandbox, config, sampling, on_turn), grader, config)
    turn = 0
    while live:
        turn += 1
        report = TurnReport(turn, 0, 0, 0, 0, 0.0)
        ended: list[dict[str, Any]] = []
        # 1. observations for the code of the last turn (or of the input)
        if config.execute:
            report.executed = execute_pending(live, sandbox, config.observation_role, markers=config.markers,
                                              tokenizer=engine.tokenizer)
            if turn == 2 and sandbox is not None:
                sandbox.reserve(0)  # the first actions' cells have their sessions: start no more ahead
        # 2. which trajectories act now
        acting = []
        for t in live:
            if _ends(t, H, config, engine.tokenizer):
                ended.append(t)
            else:
                acting.append(t)
        # 3. one engine call for all of them
        if acting:
            tokens_before, seconds_before = engine.stats.generated_tokens, engine.stats.seconds
            completions = engine.generate([_request(t, engine, config) for t in acting], sampling)
            report.tokens = engine.stats.generated_tokens - tokens_before
            report.seconds = engine.stats.seconds - seconds_before
            report.generated = len(acting)
            for t, completion in zip(acting, completions, strict=True):
                if _take_action(t, completion, engine.tokenizer, config.markers, tools=config.tools):
                    ended.append(t)
        for t in ended:
            _finish(t, sandbox, config)
        report.finished = len(ended)
        report.ended = tuple(str(t["id"]) for t in ended)
        done = {id(t) for t in ended}
        live = [t for t in live if id(t) not in done]
        if on_turn is not None:
            on_turn(report)
    return _graded(trajectories, grader, config)


def _graded(trajectories: list[dict[str, Any]], grader: grading.Grader, config: AgentConfig) -> list[dict[str, Any]]:
    for t in trajectories:
        grade(t, grader, config.reward, config.verdict_reward)
    return trajectories


def _reserve_sessions(trajectories: Sequence[dict[str, Any]], sandbox, config: AgentConfig) -> None:
    """Have the sandbox start the sessions of the trajectories that have run no cell yet while the engine
    writes their first actions (a session's start costs more than a math cell), not as each first cell comes."""
    if config.execute and sandbox is not None:
        sandbox.reserve(sum(1 for t in trajectories if not executed_cells(t["messages"])))


def _ends(t: dict[str, Any], H: int, config: AgentConfig | None = None, tokenizer=None) -> bool:
    """Whether the trajectory ends before acting again (its status set), from its messages alone. In
    self-rewarding mode an answer is first judged by the model and a "wrong" one revised (`_self_reward`)."""
    msgs = t["messages"]
    last = msgs[-1]
    content = last["content"]
    if config is not None and config.self_reward is not None and last["role"] == "assistant":
        move = _self_reward(t, config, tokenizer)
        if move == attempts.END:
            t["status"] = ANSWERED
            return True
        if move is not None:
            t.pop("status", None)
            return False
        content = attempts.after_last_verdict(content, config.markers)  # a revision under way
    if last["role"] != "assistant":
        if len(actions(msgs)) >= H:
            t["status"] = MAX_TURNS
            return True
    elif answers.extract_answer(content) is not None:
        t["status"] = ANSWERED
        return True
    elif (config is None or config.tools) and extract_code(content) is not None:  # pending code, for `execute`
        t["status"] = TOOL_CALL
        return True
    elif t.get("status") != LENGTH:
        t["status"] = STOPPED
        return True
    t.pop("status", None)
    return False


def _self_reward(t: dict[str, Any], config: AgentConfig, tokenizer=None) -> str | None:
    """The self-rewarding move after the last action (`attempts.next_move`), with the verdict or revision
    request it needs appended to the messages; the trajectory records the verdict strings it was asked for."""
    markers = config.markers
    t["verdicts"] = {"correct": markers.correct, "wrong": markers.wrong}
    move = attempts.next_move(t["messages"], config.max_revisions, markers)
    if move not in (attempts.VERIFY, attempts.REVISE):
        return move
    msgs = t["messages"]
    prefix = os.path.commonprefix([markers.correct, markers.wrong])
    if move == attempts.VERIFY:
        # A verdict is asked for once per attempt: more requests than verdicts means the model was asked and
        # wrote none (or wrote another answer instead), and the attempt stays unjudged.
        if config.self_reward == "prompted":
            asked = sum(m["role"] != "assistant" and m["content"] == markers.verify_prompt for m in msgs)
        else:
            asked = sum(m["content"].count(prefix.strip()) for m in msgs if m["role"] == "assistant")
        judged = sum(a.verdict is not None for a in attempts.parse_attempts(msgs, markers))
        if asked > judged or (config.self_reward == "inline" and not prefix.strip()):
            return attempts.END
    if config.self_reward == "prompted":
        prompt = markers.verify_prompt if move == attempts.VERIFY else markers.revise_prompt
        msgs.append({"role": "user", "content": prompt})
        if tokenizer is not None and tokens.PROMPT_IDS in t:
            msgs[-1][tokens.TOKEN_IDS] = tokens.observation_ids(tokenizer, msgs, len(msgs) - 1)
        return move
    if move == attempts.VERIFY:  # the model completes the verdict after its common prefix
        content = msgs[-1]["content"].rstrip() + "\n\n" + prefix
    else:
        content = msgs[-1]["content"].rstrip() + " " + markers.cue + "\n"
    if tokenizer is not None and tokens.TOKEN_IDS in msgs[-1]:
        tokens.retext_action(tokenizer, msgs[-1], content)
    else:
        msgs[-1]["content"] = content
    return move


def _request(t: dict[str, Any], engine: Engine, config: AgentConfig) -> Request:
    msgs = t["messages"]
    return Request(tokens.context_ids(t), seed=request_seed(config.seed, t["id"], len(actions(msgs))))


def _take_action(t: dict[str, Any], completion, tokenizer, markers: Markers = DEFAULT_MARKERS, *,
                 tools: bool = True) -> bool:
    """Append the completion as the next action (or the rest of a cut one), with the ids of the text kept
    (`tokens.keep_sampled`; without `tools` the whole text); True if that ends the trajectory for this run (cut
    by max_tokens with neither code nor answer: status `length`)."""
    msgs = t["messages"]
    continuing = msgs[-1]["role"] == "assistant"  # a cut action, or a self-evaluation within the action
    if not tools:
        kept = completion.text
    elif continuing:
        old = msgs[-1]["content"]
        # Only the new text is cut after its code: a block the action already holds (before an answer that
        # is now being judged) must not cut off what comes after it.
        kept = cut_after_code(completion.text) if extract_code(old) else cut_after_code(old + completion.text)[len(old):]
    else:
        kept = cut_after_code(completion.text)
    if not continuing:
        msgs.append({"role": "assistant", "content": "", tokens.TOKEN_IDS: []})
    tokens.extend_action(msgs[-1], tokens.keep_sampled(tokenizer, completion.token_ids, completion.logprobs, kept))
    content = attempts.after_last_verdict(msgs[-1]["content"], markers)
    has_code = tools and extract_code(content) is not None
    if answers.extract_answer(content) is None and not has_code and completion.finish_reason == "length":
        t["status"] = LENGTH  # ends this run; the next rollout continues the action
        return True
    return False


def _finish(t: dict[str, Any], sandbox, config: AgentConfig) -> None:
    if sandbox is not None:
        sandbox.forget(str(t["id"]))


def _run_continuously(trajectories, engine, sandbox, config: AgentConfig, sampling: Sampling, on_turn) -> list:
    """`run_agent` on an engine that batches continuously: a trajectory whose observation is back is submitted
    again at once, and a finished action's cell runs while the engine goes on with the others."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from mathagent.sandbox import Cell

    keyed = {str(i): t for i, t in enumerate(trajectories)}
    ready = list(keyed)  # trajectories to look at: end, run their pending code, or act
    cells: dict = {}  # future of a CellResult -> key
    generating = 0
    on_cpu = getattr(engine, "on_cpu", True)
    turn = max((len(actions(t["messages"])) for t in trajectories), default=0)  # the most actions any has
    while ready or generating or cells:
        report = TurnReport(0, 0, 0, 0, 0, 0.0)
        ended = []
        for key in ready:
            t = keyed[key]
            code = pending_code(t["messages"], config.markers) if config.execute and sandbox is not None else None
            if code is not None:
                cell = Cell(session=str(t["id"]), history=executed_cells(t["messages"]), code=code)
                cells[sandbox.submit(cell)] = key
            elif _ends(t, config.max_turns, config, engine.tokenizer):
                ended.append(t)
            else:
                engine.submit(key, _request(t, engine, config), sampling)
                generating += 1
        ready = []
        # On this CPU, step the engine when its batch is at least as large as the cells still running; otherwise
        # give those cells a moment (STEP_WAIT) first, so that their trajectories join one larger batch instead
        # of the engine stepping a handful of requests at a time while the cells fight it for the cores. Off
        # the CPU a step takes nothing from the cells, and the engine has gone on meanwhile: what it finished
        # is taken at once (each action's cell starts), whether or not cells keep finishing.
        step = bool(generating)
        if cells and not generating:
            wait(cells, return_when=FIRST_COMPLETED)
        elif cells and on_cpu and generating < len(cells):
            done, _ = wait(cells, timeout=STEP_WAIT, return_when=FIRST_COMPLETED)
            step = not done
        if step:
            tokens_before, seconds_before = engine.stats.generated_tokens, engine.stats.seconds
            for key, completion in engine.step():
                generating -= 1
                report.generated += 1
                ends = _take_action(keyed[key], completion, engine.tokenizer, config.markers, tools=config.tools)
                turn = max(turn, len(actions(keyed[key]["messages"])))
                if ends:
                    ended.append(keyed[key])
                else:
                    ready.append(key)
            report.tokens = engine.stats.generated_tokens - tokens_before
            report.seconds = engine.stats.seconds - seconds_before
        for future in [f for f in cells if f.done()]:
            key = cells.pop(future)
            observe(keyed[key], future.result(), config.observation_role, engine.tokenizer)
            report.executed += 1
            ready.append(key)
        for t in ended:
            _finish(t, sandbox, config)
        if on_turn is not None and (report.generated or report.executed or ended):
            report.turn = turn
            report.finished = len(ended)
            report.ended = tuple(str(t["id"]) for t in ended)
            on_turn(report)
    return trajectories
