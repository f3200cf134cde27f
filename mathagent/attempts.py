"""The self-rewarding format (Xiong et al. 2025, "Self-rewarding correction for mathematical reasoning"):
attempts, verdicts, and the loop's next move.

After its answer the model judges it: "[VERIFY] correct" ends the trajectory, "[VERIFY] wrong" (with revisions
left) leads to a revision ("Let's correct it step by step."), a new answer and a new verdict. A trajectory is
then a sequence of attempts j = 1..J, each an answer y_j and a verdict v_j in {correct, wrong} (None for an
attempt not yet judged). The final answer is y_J. Attempts and verdicts are read from the messages, whether each
sits in a turn of its own (a prompted model, asked by a user turn) or all of them in one long assistant message
(a trained model).

y_j is the answer the attempt gave before its self-evaluation began, never one written while judging it (a
self-check may recompute and box another number, as in the talk's Table 1: "\\boxed{7.58} ... So the final
answer is: \\boxed{20.39} ... [VERIFY] wrong" judges 7.58):

- inline (one assistant stream): the attempt's first \\boxed{}. A first attempt starts at the beginning; a
  revision at the end of the revision cue when the model writes one before its next verdict (and before a
  verify turn), else right after the verdict (so a box between a verdict and its cue belongs to no attempt);
- prompted (a user turn `verify_prompt` after the answer): the last \\boxed{} before that turn, the "most
  recent answer" it asks about; the boxes of the verify turn are the self-evaluation's. Without that turn
  (another verify prompt than `markers`'), an attempt is read as inline: its first box, still the answer turn's.

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
        return re.compile(f"(?P<correct>{_flexible(self.correct)})|(?P<wrong>{_flexible(self.wrong)})")

    @functools.cached_property
    def cue_pattern(self) -> re.Pattern | None:
        """The revision cue as a regex (None for an empty cue), whitespace read as in `pattern`."""
        return re.compile(_flexible(self.cue)) if self.cue.strip() else None


def _flexible(text: str) -> str:
    """A marker as a regex that takes any run of whitespace where the marker has a space."""
    return r"\s+".join(re.escape(part) for part in text.split())


DEFAULT_MARKERS = Markers()


@dataclass(frozen=True)
class Attempt:
    index: int  # 0 for the first answer, then one per revision
    answer: str | None  # y_j, the answer the attempt gave before it was judged (module docstring); None: none
    verdict: str | None  # CORRECT, WRONG, or None (not judged)
    # The index, in messages, of the assistant message where the attempt ends: its verdict's, or, for an attempt
    # not yet judged, the last one that holds a box (`next_move` asks whether that is the last action).
    message: int


# Where a box may start: a candidate only, `answers.extract_boxed` decides what is a box.
_BOX_START = re.compile(r"\\(?:boxed|fbox)")


def first_boxed(text: str) -> str | None:
    """The content of the first \\boxed{} of `text`, read as `answers.extract_boxed` reads the last one (so a box
    that never closes, or an empty one, is skipped)."""
    # The last box of the text up to the next box start is the first one, when it is a box at all.
    for end in [m.start() for m in _BOX_START.finditer(text)][1:] + [len(text)]:
        found = extract_boxed(text[:end])
        if found is not None:
            return found
    return None


# A part of an attempt's span: (message index, the model's text there), or (index, None) for a verify turn.
Piece = tuple[int, str | None]


def parse_attempts(messages: Sequence[dict[str, Any]], markers: Markers = DEFAULT_MARKERS) -> list[Attempt]:
    """The attempts of a trajectory, in order, from its assistant messages read as one stream: each verdict
    closes an attempt; an answer after the last verdict opens one not yet judged. Observations (code output)
    and user turns in between are not the model's and are not read, except that a user turn `verify_prompt`
    marks where a prompted attempt's answer ends (module docstring)."""
    attempts: list[Attempt] = []
    span: list[Piece] = []  # the current attempt so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            if message["content"] == markers.verify_prompt:
                span.append((i, None))
            continue
        text, start = message["content"], 0
        for match in markers.pattern.finditer(text):
            span.append((i, text[start : match.start()]))
            verdict = CORRECT if match.group("correct") is not None else WRONG
            attempts.append(Attempt(len(attempts), _answer(_own(span, bool(attempts), markers)), verdict, i))
            span, start = [], match.end()
        span.append((i, text[start:]))
    span = _own(span, bool(attempts), markers)
    answer = _answer(span)
    if answer is not None:
        last = max(i for i, text in span if text is not None and first_boxed(text) is not None)
        attempts.append(Attempt(len(attempts), answer, None, last))
    return attempts


def _own(span: list[Piece], revision: bool, markers: Markers) -> list[Piece]:
    """The attempt's own part of its span: all of a first attempt; a revision's from the end of the first cue
    in it, when the model wrote one (what it wrote between the verdict and the cue is the verdict's). A cue in
    a verify turn is the self-evaluation's: the revision had started before it."""
    if revision and markers.cue_pattern is not None:
        for k, (i, text) in enumerate(span):
            if text is None:
                break
            cue = markers.cue_pattern.search(text)
            if cue is not None:
                return [(i, text[cue.end():]), *span[k + 1:]]
    return span


def _answer(span: list[Piece]) -> str | None:
    """y_j of an attempt's own span: its first box, or, when a verify turn follows that box, the last box
    before the verify turn (module docstring)."""
    first = next((k for k, (_, text) in enumerate(span) if text is not None and first_boxed(text) is not None), None)
    if first is None:
        return None
    asked = next((k for k in range(first + 1, len(span)) if span[k][1] is None), None)
    if asked is None:
        return first_boxed(span[first][1])
    answered = (extract_boxed(text) for _, text in reversed(span[first:asked]) if text is not None)
    return next((found for found in answered if found is not None), first_boxed(span[first][1]))


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
