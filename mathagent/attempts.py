"""The self-rewarding format (Xiong et al. 2025, "Self-rewarding correction for mathematical reasoning"):
attempts, verdicts, and the loop's next move.

After its answer the model judges it: "[VERIFY] correct" ends the trajectory, "[VERIFY] wrong" (with revisions
left) leads to a revision ("Let's correct it step by step."), a new answer and a new verdict. A trajectory is
then a sequence of attempts j = 1..J, each an answer y_j (the last \\boxed{} before its verdict) and a verdict
v_j in {correct, wrong} (None for an attempt not yet judged). The final answer is y_J. Attempts and verdicts
are read from the messages, whether each sits in a turn of its own (a prompted model, asked by a user turn) or
all of them in one long assistant message (a trained model).

The strings of the format are `Markers` (the paper's by default); `next_move` is what the agent's loop does
after an action (VERIFY, REVISE or END). The reward of such a trajectory is `rewards.py`'s, the paper's
correction metrics are `metrics.correction_metrics`, and its training data is `correction.py`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mathagent.answers import extract_boxed

CORRECT = "correct"
WRONG = "wrong"

# The moves of the loop after an action (`next_move`).
VERIFY = "verify"  # an answer without a verdict: ask for the model's self-evaluation
REVISE = "revise"  # a "wrong" verdict with revisions left: ask for a revision
END = "end"  # a "correct" verdict, or "wrong" with no revision left


@dataclass(frozen=True)
class Markers:
    """The strings of the format, with the paper's defaults. `verify_prompt` and `revise_prompt` are the user
    turns that ask a prompted model for a verdict and for a revision; a trained model writes the verdict and the
    cue itself, within its response."""

    correct: str = "[VERIFY] correct"
    wrong: str = "[VERIFY] wrong"
    cue: str = "Let's correct it step by step."
    verify_prompt: str = (
        "Perform a self-evaluation of your most recent answer: you may reason to check it, but end with exactly "
        "one of these two lines:\n[VERIFY] correct.\n[VERIFY] wrong."
    )
    revise_prompt: str = (
        "Since your most recent answer is self-evaluated as wrong, there may be an error in the solution above. "
        "Let's correct it step by step: rewrite the solution and put your final answer within \\boxed{}."
    )

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        """The two verdicts as one regex (groups `correct`, `wrong`), built once per Markers: every action of
        every rollout is read with it (`agent.pending_code`)."""
        def flexible(text: str) -> str:  # any run of whitespace where the marker has a space
            return r"\s+".join(re.escape(part) for part in text.split())

        return re.compile(f"(?P<correct>{flexible(self.correct)})|(?P<wrong>{flexible(self.wrong)})")


DEFAULT_MARKERS = Markers()


@dataclass(frozen=True)
class Attempt:
    index: int  # 0 for the first answer, then one per revision
    answer: str | None  # the last \boxed{} before the verdict (None: the attempt gave no answer)
    verdict: str | None  # CORRECT, WRONG, or None (not judged)
    message: int  # the index, in messages, of the assistant message where the attempt ends


def parse_attempts(messages: Sequence[dict[str, Any]], markers: Markers = DEFAULT_MARKERS) -> list[Attempt]:
    """The attempts of a trajectory, in order, from its assistant messages read as one stream: each verdict
    closes an attempt; an answer after the last verdict opens one not yet judged. Observations (code output)
    and user turns in between are not the model's and are not read."""
    pattern = markers.pattern
    attempts: list[Attempt] = []
    answer: str | None = None
    last = -1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        text, start = message["content"], 0
        for match in pattern.finditer(text):
            found = extract_boxed(text[start : match.start()])
            if found is not None:
                answer = found
            verdict = CORRECT if match.group("correct") is not None else WRONG
            attempts.append(Attempt(len(attempts), answer, verdict, i))
            answer, start = None, match.end()
        found = extract_boxed(text[start:])
        if found is not None:
            answer, last = found, i
    if answer is not None:
        attempts.append(Attempt(len(attempts), answer, None, last))
    return attempts


def after_last_verdict(content: str, markers: Markers = DEFAULT_MARKERS) -> str:
    """The part of an action after its last verdict (all of it when it has none): in a trained model's one
    long message, the revision under way, whose code runs and whose answer counts, unlike the earlier ones."""
    return markers.pattern.split(content)[-1]


def next_move(messages: Sequence[dict[str, Any]], max_revisions: int,
              markers: Markers = DEFAULT_MARKERS) -> str | None:
    """What the loop does after the model's last action: VERIFY (an answer awaits its verdict), REVISE (a
    "wrong" verdict and fewer than `max_revisions` revisions so far), END, or None when the last action holds
    neither an answer nor a verdict (the agent's own rules apply: run its code, or stop)."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    attempts = parse_attempts(messages, markers)
    if not attempts or attempts[-1].message != len(messages) - 1:
        return None
    last = attempts[-1]
    if last.verdict is None:
        return VERIFY
    if last.verdict == WRONG and last.index < max_revisions:
        # A trained model goes on with its revision in the same message: then the agent's rules apply.
        tail = markers.pattern.split(messages[-1]["content"])[-1]
        return None if re.search(r"\w", tail) else REVISE
    return END
