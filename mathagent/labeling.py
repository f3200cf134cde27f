r"""Monte-Carlo step labels: an estimate of Q*(s_h, a_h) for every step of a graded trajectory.

A trajectory tau = (x, a_1, o_1, ..., a_H, o_H) is cut into steps. For each step h < H, the prefix
s_{h+1} = (x, a_1, o_1, ..., a_h, o_h) is continued M times by the reference policy pi_ref, through the same
multi-turn loop as rollout (`agent.run_agent`: code runs in the sandbox, observations come back), and each
completion tau_j is graded against the reference answer:

    Q-hat(s_h, a_h) = (1/M) * sum_{j=1..M} u_j,   u_j = 1[tau_j is correct]     (the soft label, `--q mean`)
    label_h         = '+'  if Q-hat(s_h, a_h) > 0  else '-'         (the hard label: "some completion succeeds")

The talk's soft-optimal Q (the slide "Q Learning via Monte-Carlo Estimation") is the value of the
KL-regularised target with coefficient eta, estimated from the same M completions (`--q soft-optimal --q-eta`):

    Q*(s_h, a_h) = eta * log( (1/M) * sum_j exp(u_j / eta) )

It tends to Q-hat as eta -> infinity (a KL term so strong that the policy stays pi_ref: the mean) and to
max_j u_j as eta -> 0 (no KL term: the best completion, the hard label).

A completion whose last action is cut by `--max-tokens` has no answer yet; grading it wrong would bias Q-hat
down. Cut actions are continued (another `--max-tokens` each time) for up to H = `--max-turns` rounds; those
still cut after that are left out of the estimate (M above becomes the number that finished) and counted in
the step's `cut` and the report. A step none of whose completions finished gets q = 0 and '-' (no completion
was seen to succeed), with `cut` = M saying why.

The last step is not sampled: its prefix is the whole trajectory, so it is labeled by the trajectory's own
grade (Q-hat = 1.0 if `correct` else 0.0).

A step is, by default, one action a_h together with the observations after it (`turns`). With `paragraphs`,
chain-of-thought text is split further at blank lines (never inside a ``` fence): each paragraph is a step,
and the observations of an action belong to its last paragraph; a prefix that ends inside an action is
continued from there, as rollout continues an action cut by the token limit.

Cost: every prefix of every trajectory goes into one `run_agent` call (M continuations each, one engine call
per turn for all of them), and identical prefixes - trajectories sampled from one problem share their
first steps - are sampled once and their outcomes reused (`LabelCache`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mathagent import agent
from mathagent.errors import UserError
from mathagent.grading import Grader
from mathagent.records import LENGTH, actions
from mathagent.tokens import LOGPROBS, PROMPT_IDS, TOKEN_IDS

PLUS, MINUS = "+", "-"
STEP_MODES = ("turns", "paragraphs")
Q_ESTIMATES = ("mean", "soft-optimal")
FORMATS = ("records", "prm")  # what mc-label writes: the trajectories with "steps", or PRM chats (`prm.prm_example`)


# --------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Step h of a trajectory: `prefix` is s_{h+1}, the state after a_h and its observation."""

    prefix: list[dict[str, str]]  # messages, up to and including this step
    text: str  # what the PRM reads for this step: the action's text (or paragraph), then its observations
    partial: bool  # the prefix ends inside an action (paragraph steps): a continuation continues that action


_FENCE = re.compile(r"^\s*```", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")


def paragraph_ends(text: str) -> list[int]:
    """End offsets of the paragraphs of `text`: it splits at blank lines, except inside ``` fences.

    The last end is len(text) with trailing whitespace removed; text[:end] of any end is an action cut after
    a paragraph, with the blank lines that separate it from the next one left out."""
    fences = [m.start() for m in _FENCE.finditer(text)]

    def inside_fence(offset: int) -> bool:
        return sum(1 for f in fences if f < offset) % 2 == 1

    ends = []
    for match in _BLANK_LINES.finditer(text):
        end = match.start()
        if end > 0 and match.end() < len(text) and not inside_fence(end) and text[:end].strip():
            ends.append(end)
    last = len(text.rstrip())
    if not ends or ends[-1] < last:
        ends.append(last)
    return ends


def split_steps(messages: Sequence[dict[str, str]], mode: str = "turns") -> list[Step]:
    """The steps of a trajectory, in order. Messages before the first action (system, question) belong to no
    step; a trajectory without an action has none."""
    if mode not in STEP_MODES:
        raise UserError(f"unknown step mode {mode!r}: expected one of {', '.join(STEP_MODES)}")
    action_indices = actions(messages)
    steps: list[Step] = []
    for n, i in enumerate(action_indices):
        stop = action_indices[n + 1] if n + 1 < len(action_indices) else len(messages)
        observations = [m["content"] for m in messages[i + 1 : stop]]
        content = messages[i]["content"]
        ends = paragraph_ends(content) if mode == "paragraphs" else [len(content)]
        start = 0
        for k, end in enumerate(ends):
            last_paragraph = k == len(ends) - 1
            piece = content[start:end].strip()
            if last_paragraph:
                prefix = [dict(m) for m in messages[:stop]]
                text = "\n\n".join([content[start:].strip(), *observations])
            else:
                # The cut action's ids are stale: rollout encodes the part kept (`tokens.complete_ids`).
                cut = {k: v for k, v in messages[i].items() if k not in (TOKEN_IDS, LOGPROBS)}
                prefix = [dict(m) for m in messages[:i]] + [{**cut, "content": content[:end]}]
                text = piece
            steps.append(Step(prefix=prefix, text=text, partial=not last_paragraph))
            start = end
    return steps


# --------------------------------------------------------------------------------------------------------
# The label arithmetic
# --------------------------------------------------------------------------------------------------------


def q_hat(outcomes: Sequence[bool]) -> float:
    """Q-hat(s_h, a_h) = (1/M) sum_j 1[completion j is correct]: the fraction of correct completions."""
    if not outcomes:
        raise ValueError("Q-hat of zero completions is undefined")
    return sum(1 for o in outcomes if o) / len(outcomes)


def soft_optimal_q(outcomes: Sequence[bool], eta: float) -> float:
    """Q*(s_h, a_h) = eta * log((1/M) sum_j exp(u_j / eta)), u_j = 1[completion j is correct]: the soft-optimal
    value of the KL-regularised target (eta -> infinity: Q-hat; eta -> 0: max_j u_j).

    The outcomes are binary, so with p = Q-hat (the fraction correct) and x = 1/eta it has a closed form,

        Q* = eta * log(1 - p + p e^x) = log1p(p * expm1(x)) / x                      (x <= 700)
           = 1 + eta * log(p + (1 - p) e^-x) = 1 + log1p((1 - p) * expm1(-x)) / x    (x > 700, 0 < p)

    the second the max-shifted u_max + eta log mean exp((u_j - u_max) / eta), for a small eta where e^x would
    overflow (x > 709.78). expm1 and log1p keep every digit where the naive sum does not: for [T, F, F, F],
    1 + eta log((e^(-1/eta) + 3) / 4) loses digits as eta grows (0.2499999 at 1e9) and is 1.0 at 1e16, when
    e^(-1/eta) rounds to 1; here Q* = p + p(1 - p) x / 2 + O(x^2) to the last digit, 0.25 at eta 1e16 and 1e300.
    All right or all wrong gives exactly 1 or 0."""
    if not outcomes:
        raise ValueError("Q* of zero completions is undefined")
    if not eta > 0 or math.isinf(eta):
        raise ValueError(f"eta must be a positive finite number, got {eta}")
    right = sum(1 for o in outcomes if o)
    if right in (0, len(outcomes)):
        return float(right > 0)
    p = right / len(outcomes)
    x = 1.0 / eta  # inf for a subnormal eta: the second form's limit, 1 + log(p) * 0
    if x <= 700.0:
        return math.log1p(p * math.expm1(x)) / x
    return 1.0 + math.log1p((1.0 - p) * math.expm1(-x)) / x


def check_estimate(estimate: str, eta: float, m: int = 1) -> None:
    """Refuse an M below 1, an unknown soft-label estimate or an eta that is not a positive finite number
    (the stage checks its options with it once, before it reads anything)."""
    if m < 1:
        raise UserError("m must be at least 1", options=("m",))
    if estimate not in Q_ESTIMATES:
        raise UserError(f"q {estimate!r}: choose from {', '.join(Q_ESTIMATES)}", options=("q",))
    if not (eta > 0 and math.isfinite(eta)):
        raise UserError(f"eta {eta}: must be a positive finite number", options=("eta",))


def hard_label(q: float) -> str:
    """'+' iff some completion from the step reached the right answer (Q-hat > 0), as in the paper."""
    return PLUS if q > 0 else MINUS


def sampled_step(outcomes: Sequence[bool | None], estimate: str = "mean", eta: float = 1.0) -> dict[str, Any]:
    """The label of a sampled step from its completions' outcomes (None: cut by the token limit, left out):
    soft (`q`, by `estimate`), hard (`label`), completions sampled (`m`), how many were right, and `cut`
    when some were left out."""
    finished = [o for o in outcomes if o is not None]
    right = sum(1 for o in finished if o)
    if not finished:
        q = 0.0
    elif estimate == "soft-optimal":
        q = soft_optimal_q(finished, eta)
    else:
        q = q_hat(finished)
    # The hard label from the count, not from q: a rounding of Q* never flips it.
    step = {"q": q, "label": PLUS if right else MINUS, "m": len(outcomes), "correct": right}
    if len(finished) < len(outcomes):
        step["cut"] = len(outcomes) - len(finished)
    return step


def outcome_step(correct: bool) -> dict[str, Any]:
    """The last step's label: the trajectory's own grade (nothing is sampled, m = 0)."""
    q = 1.0 if correct else 0.0
    return {"q": q, "label": hard_label(q), "m": 0}


# --------------------------------------------------------------------------------------------------------
# Sampling the completions
# --------------------------------------------------------------------------------------------------------


def prefix_key(step: Step, answer: Any) -> str:
    """Identity of a prefix for deduplication: a 128-bit digest of its messages, whether it is continued inside
    an action, and the answer its completions are graded against."""
    messages = [[m["role"], m["content"]] for m in step.prefix]
    text = json.dumps([messages, step.partial, None if answer is None else str(answer)], ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _root_id(key: str) -> str:
    # Continuation ids (hence sampling seeds, see agent.request_seed) depend on the prefix alone, not on
    # which trajectory brought it or what it was batched with.
    return "mc-" + key[:16]


@dataclass
class LabelCache:
    """Outcomes of prefixes already sampled (key -> per completion: correct, or None when it was still cut by
    the token limit); reused across chunks."""

    outcomes: dict[str, list[bool | None]] = field(default_factory=dict)


@dataclass
class LabelingReport:
    trajectories: int = 0
    steps: int = 0  # steps labeled, last steps included
    sampled_steps: int = 0  # steps labeled by sampling (all but the last of each trajectory)
    prefixes: int = 0  # distinct prefixes sampled in this call
    reused: int = 0  # sampled steps whose prefix was already sampled (in this call or an earlier one)
    completions: int = 0
    continued: int = 0  # completions whose action was cut by --max-tokens and continued
    left_out: int = 0  # completions still cut after the continuation rounds: not in any Q-hat
    tokens: int = 0
    engine_calls: int = 0
    seconds: float = 0.0

    def add(self, other: LabelingReport) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        rate = self.steps / self.seconds if self.seconds else 0.0
        return (
            f"{self.trajectories} trajectories, {self.steps} steps labeled ({self.sampled_steps} sampled from "
            f"{self.prefixes} distinct prefixes, {self.reused} reused), {self.completions} completions "
            f"({self.continued} cut by --max-tokens and continued, {self.left_out} still cut and left out of Q-hat), "
            f"{self.tokens} tokens, {self.engine_calls} engine calls in {self.seconds:.1f} s "
            f"({rate:.1f} labeled steps/s)"
        )


def restate(step: Step, prompt: str, question: str) -> Step:
    """The step with its first user message rendered anew from the question and another prompt template."""
    prefix = [dict(m) for m in step.prefix]
    first = next((i for i, m in enumerate(prefix) if m["role"] == "user"), None)
    if first is None:
        return step
    prefix[first]["content"] = prompt.format(question=question)
    return Step(prefix=prefix, text=step.text, partial=step.partial)


def continuation_root(step: Step, trajectory: dict[str, Any], key: str) -> dict[str, Any]:
    """The trajectory that M continuations branch from: the prefix, the gold answer, and status `length` when
    the prefix ends inside an action (so run_agent continues that action instead of stopping there)."""
    root = {"id": _root_id(key), "messages": [dict(m) for m in step.prefix], "answer": trajectory.get("answer")}
    if PROMPT_IDS in trajectory:  # kept only where the engine's tokenizer renders the root's prompt the same
        root[PROMPT_IDS] = trajectory[PROMPT_IDS]
    if step.partial:
        root["status"] = LENGTH
    return root


def complete(
    completions: list[dict[str, Any]], engine, sandbox, grader: Grader, config: agent.AgentConfig,
    on_turn: Callable[[agent.TurnReport], None] | None = None,
) -> int:
    """Run continuations to their end through the agent loop; an action cut by the token limit has no answer
    yet, so it is continued, up to H = max_turns rounds in all, rather than graded wrong. Returns how many
    were cut and continued at least once."""
    agent.run_agent(completions, engine, sandbox, grader, config, on_turn=on_turn)
    continued: set[str] = set()
    for _ in range(config.max_turns - 1):
        cut = [c for c in completions if c.get("status") == LENGTH]
        if not cut:
            break
        continued.update(c["id"] for c in cut)
        agent.run_agent(cut, engine, sandbox, grader, config, on_turn=on_turn)
    return len(continued)


def outcomes(completions: Sequence[dict[str, Any]]) -> list[bool | None]:
    """Per completion: whether it is correct, or None when its action is still cut (left out of Q-hat)."""
    return [None if c.get("status") == LENGTH else bool(c.get("correct")) for c in completions]


def label_trajectories(
    trajectories: list[dict[str, Any]],
    engine,
    sandbox,
    grader: Grader,
    config: agent.AgentConfig,
    *,
    m: int = 8,
    mode: str = "turns",
    cache: LabelCache | None = None,
    prompt: str | None = None,
    estimate: str = "mean",
    eta: float = 1.0,
    on_turn: Callable[[agent.TurnReport], None] | None = None,
) -> LabelingReport:
    """Set `steps` on every trajectory (in place): one label object per step, in order.

    Each trajectory needs `messages` and `correct` (and `answer` for its prefixes' completions to be graded).
    All distinct, not yet cached prefixes are continued M times in one `run_agent` call. With `prompt` (a
    template with a {question} placeholder), the continuations see the first user message rendered from the
    trajectory's `question` with it instead of the trajectory's own. `estimate` is the soft label: "mean"
    (Q-hat) or "soft-optimal" (Q* with `eta`)."""
    cache = cache if cache is not None else LabelCache()
    start = time.perf_counter()
    report = LabelingReport(trajectories=len(trajectories))
    plan: list[tuple[dict[str, Any], list[str]]] = []  # (trajectory, keys of its sampled steps)
    roots: dict[str, dict[str, Any]] = {}
    for t in trajectories:
        steps = split_steps(t["messages"], mode)
        if prompt is not None:
            if "question" not in t:
                raise UserError(f"trajectory {t.get('id')}: a --prompt needs the field 'question'")
            steps = [restate(step, prompt, t["question"]) for step in steps]
        keys = [prefix_key(step, t.get("answer")) for step in steps[:-1]]
        for step, key in zip(steps[:-1], keys, strict=True):
            if key in cache.outcomes or key in roots:
                report.reused += 1
            else:
                roots[key] = continuation_root(step, t, key)
        plan.append((t, keys))
    continuations = {key: agent.branch(root, m) for key, root in roots.items()}
    batch = [c for group in continuations.values() for c in group]
    if batch:
        calls, tokens = engine.stats.calls, engine.stats.generated_tokens
        report.continued = complete(batch, engine, sandbox, grader, config, on_turn)
        report.engine_calls = engine.stats.calls - calls
        report.tokens = engine.stats.generated_tokens - tokens
    for key, group in continuations.items():
        cache.outcomes[key] = outcomes(group)
        report.left_out += sum(1 for o in cache.outcomes[key] if o is None)
    for t, keys in plan:
        labels = [sampled_step(cache.outcomes[key], estimate, eta) for key in keys]
        if any(message["role"] == "assistant" for message in t["messages"]):
            labels.append(outcome_step(bool(t.get("correct"))))
        t["steps"] = labels
        report.steps += len(labels)
        report.sampled_steps += len(keys)
    report.prefixes = len(roots)
    report.completions = len(batch)
    report.seconds = time.perf_counter() - start
    return report


def check_graded_trajectory(record: dict[str, Any]) -> str | None:
    """What mc-label accepts: a trajectory with its grade (`correct`, a boolean)."""
    if not isinstance(record.get("correct"), bool):
        return "field 'correct' must be true or false (grade the trajectories first: `mathagent evaluate --graded`)"
    return None
