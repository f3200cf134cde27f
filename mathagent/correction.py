"""Self-rewarding correction (Xiong et al. 2025, "Self-rewarding correction for mathematical reasoning").

After its answer the model judges it: "[VERIFY] correct" ends the trajectory, "[VERIFY] wrong" (with revisions
left) leads to a revision ("Let's correct it step by step."), a new answer and a new verdict. A trajectory is
then a sequence of attempts j = 1..J, each an answer y_j (the last \\boxed{} before its verdict) and a verdict
v_j in {correct, wrong} (None for an attempt not yet judged). The final answer is y_J. Attempts and verdicts
are read from the messages, whether each sits in a turn of its own (a prompted model, asked by a user turn) or
all of them in one long assistant message (a trained model).

The paper's metrics, over trajectories with a reference answer, c_j = 1[y_j is correct]:

    turn-1 accuracy  = mean c_1             final accuracy = mean c_J
    improvement      = final - turn-1       = wrong->correct - correct->wrong
    wrong->correct   = mean 1[not c_1 and c_J]          correct->wrong = mean 1[c_1 and not c_J]
    verification     = P(v_j = correct | c_j) and P(v_j = wrong | not c_j), over judged attempts
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathagent.errors import UserError
from mathagent.grading import extract_boxed
from mathagent.records import split_prompt

CORRECT = "correct"
WRONG = "wrong"

# The moves of the loop after an action (`next_move`).
VERIFY = "verify"  # an answer without a verdict: ask for the model's self-evaluation
REVISE = "revise"  # a "wrong" verdict with revisions left: ask for a revision
END = "end"  # a "correct" verdict, or "wrong" with no revision left

FORMATS = ("sft", "pairs")  # what make-corrections writes: the demonstrations, or pairs of them


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


def judged(messages: Sequence[dict[str, Any]], markers: Markers = DEFAULT_MARKERS) -> bool:
    """Whether the trajectory holds a verdict of the model's, i.e. is one of this mode."""
    return any(a.verdict is not None for a in parse_attempts(messages, markers))


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


def graded_attempts(attempts: Sequence[Attempt], gold: str | None, is_equivalent) -> list[dict[str, Any]]:
    """The attempts as record data: {"index", "answer", "verdict", "correct"} (correct None without `gold`)."""
    return [{"index": a.index, "answer": a.answer, "verdict": a.verdict,
             "correct": None if gold is None else bool(is_equivalent(a.answer, gold))} for a in attempts]


def verdict_term(attempts: Sequence[dict[str, Any]]) -> float:
    """The faithfulness of a trajectory's verdicts: the mean over its judged, graded attempts of +1 (the
    verdict matches the grade) or -1 (it does not); 0 when none is judged."""
    signs = [1.0 if (a["verdict"] == CORRECT) == a["correct"] else -1.0
             for a in attempts if a["verdict"] is not None and a["correct"] is not None]
    return sum(signs) / len(signs) if signs else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def correction_metrics(trajectories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paper's correction metrics (module docstring) over graded trajectories that carry `attempts` with
    `correct` set (`grading.grade_trajectory` adds them to trajectories of this mode)."""
    rows = [t["attempts"] for t in trajectories if t.get("attempts") and t["attempts"][0]["correct"] is not None]
    first = [bool(a[0]["correct"]) for a in rows]
    final = [bool(a[-1]["correct"]) for a in rows]
    judged_attempts = [a for attempts in rows for a in attempts if a["verdict"] is not None]
    right = [a for a in judged_attempts if a["correct"]]
    wrong = [a for a in judged_attempts if not a["correct"]]
    first_judged = [a[0] for a in rows if a[0]["verdict"] is not None]
    return {
        "trajectories": len(rows),
        "turn1_accuracy": _mean([float(c) for c in first]),
        "final_accuracy": _mean([float(c) for c in final]),
        "improvement": (_mean([float(c) for c in final]) - _mean([float(c) for c in first])) if rows else None,
        "wrong_to_correct": _mean([float(not a and b) for a, b in zip(first, final, strict=True)]),
        "correct_to_wrong": _mean([float(a and not b) for a, b in zip(first, final, strict=True)]),
        "revisions_mean": _mean([float(len(a) - 1) for a in rows]),
        "verification": {
            "attempts": len(judged_attempts),
            "accuracy": _mean([float((a["verdict"] == CORRECT) == a["correct"]) for a in judged_attempts]),
            "correct_given_correct": _mean([float(a["verdict"] == CORRECT) for a in right]),
            "wrong_given_wrong": _mean([float(a["verdict"] == WRONG) for a in wrong]),
            "turn1_accuracy": _mean([float((a["verdict"] == CORRECT) == a["correct"]) for a in first_judged]),
        },
    }


# ---- training data by sequential rejection sampling ----------------------------------------------------------
#
# From graded first attempts (a rollout's trajectories, several per problem) and the grader's verdicts, the
# paper's shapes, each one trajectory whose single assistant stream carries its attempts and verdicts:
#   correct    y correct -> "[VERIFY] correct"
#   corrected  y wrong -> "[VERIFY] wrong" -> cue -> y' correct -> "[VERIFY] correct"
#   failed     y wrong -> "[VERIFY] wrong" -> cue -> y' wrong -> "[VERIFY] wrong"   (a set share of the wrong)
# and preference pairs with the same first attempt: the faithful verdict over the false one, and the
# successful correction over the failed one.

SHAPES = ("correct", "corrected", "failed")


def _continue_with(response: list[dict[str, Any]], text: str, then: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """`response` (actions and observations) with `text` written at the end of its last action, then the
    messages of `then`, whose first action goes on in that same assistant message."""
    out = [dict(m) for m in response]
    out[-1]["content"] = out[-1]["content"].rstrip() + text
    rest = [dict(m) for m in then]
    if rest:
        out[-1]["content"] += rest[0]["content"]
        out.extend(rest[1:])
    return out


def _verdict(markers: Markers, correct: bool) -> str:
    return f"\n\n{markers.correct if correct else markers.wrong}."


def demonstration(first: dict[str, Any], revision: dict[str, Any] | None, markers: Markers) -> list[dict[str, Any]]:
    """The messages of one demonstration: `first`'s prompt and attempt with its grader's verdict, and, after
    a wrong one, the cue, `revision`'s attempt and its verdict."""

    prompt, response = split_prompt(first["messages"])
    if revision is None:
        return prompt + _continue_with(response, _verdict(markers, bool(first["correct"])))
    _, second = split_prompt(revision["messages"])
    text = _verdict(markers, False) + " " + markers.cue + "\n"
    second = _continue_with(second, _verdict(markers, bool(revision["correct"])))
    return prompt + _continue_with(response, text, second)


@dataclass
class DemonstrationStats:
    problems: int = 0
    skipped: int = 0  # problems without a trajectory that has an answer, or without the attempts a shape needs
    shapes: dict[str, int] | None = None


def build_demonstrations(trajectories: Sequence[dict[str, Any]], *, failed_share: float = 0.2, seed: int = 0,
                         markers: Markers = DEFAULT_MARKERS) -> tuple[list[dict[str, Any]], DemonstrationStats]:
    """The demonstrations of every problem (see above), from graded trajectories with an answer: every correct
    one as `correct`; every wrong one once, round(failed_share * wrong) of them (chosen at random, per problem)
    as `failed` with another wrong attempt as the revision, the others as `corrected` with a correct one.
    A shape that needs an attempt the problem does not have is not made (counted in `skipped` when nothing is).
    """
    import random

    from mathagent.pairs import group_by_problem, messages_key, problem_rng

    if not 0 <= failed_share <= 1:
        raise ValueError(f"failed_share {failed_share}: must be in [0, 1]")
    stats = DemonstrationStats(shapes=dict.fromkeys(SHAPES, 0))
    out = []
    for problem_id, group in group_by_problem(trajectories).items():
        stats.problems += 1
        answered = [t for t in group if t.get("pred") is not None and t.get("correct") is not None]
        prompt_of = {id(t): messages_key(split_prompt(t["messages"])[0]) for t in answered}
        right = [t for t in answered if t["correct"]]
        wrong = [t for t in answered if not t["correct"]]
        rng: random.Random = problem_rng(seed, problem_id)
        failing = set(rng.sample(range(len(wrong)), round(failed_share * len(wrong))))
        made = 0

        def emit(shape: str, first: dict[str, Any], revision: dict[str, Any] | None) -> None:
            nonlocal made
            record = {k: v for k, v in first.items() if k not in ("messages", "status", "attempts", "id")}
            record.update(id=f"{first['id']}-{shape}", messages=demonstration(first, revision, markers),
                          verdicts={"correct": markers.correct, "wrong": markers.wrong}, shape=shape)
            out.append(record)
            stats.shapes[shape] += 1
            made += 1

        for t in right:
            emit("correct", t, None)
        for i, t in enumerate(wrong):
            shape = "failed" if i in failing else "corrected"
            pool = [u for u in (wrong if shape == "failed" else right)
                    if u is not t and prompt_of[id(u)] == prompt_of[id(t)]]
            if pool:
                emit(shape, t, rng.choice(pool))
        stats.skipped += made == 0
    return out, stats


def build_pairs(demonstrations: Sequence[dict[str, Any]], *, markers: Markers = DEFAULT_MARKERS) -> list[dict[str, Any]]:
    """Preference pairs for train-mdpo from `build_demonstrations`' records: each demonstration's first attempt
    with its faithful verdict over the same attempt with the false one (kind "verdict"); and each `corrected`
    demonstration over each `failed` one of the same problem and prompt (kind "correction")."""
    from mathagent.pairs import messages_key, pair_record

    pairs = []
    by_prompt: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in demonstrations:
        prompt, response = split_prompt(d["messages"])
        by_prompt.setdefault((str(d["problem_id"]), messages_key(prompt)), []).append(d)
        for k, m in enumerate(response):  # the first attempt ends where its verdict starts
            found = markers.pattern.search(m["content"]) if m["role"] == "assistant" else None
            if found:
                head = response[:k] + [{**m, "content": m["content"][: found.start()].rstrip()}]
                break
        else:
            continue
        faithful = d["shape"] == "correct"
        chosen = {**d, "messages": prompt + _continue_with(head, _verdict(markers, faithful)), "reward": 1.0}
        false = {**d, "id": d["id"] + "-false", "reward": -1.0,
                 "messages": prompt + _continue_with(head, _verdict(markers, not faithful))}
        pairs.append({**pair_record(chosen, false), "kind": "verdict"})
    for group in by_prompt.values():
        for good in (d for d in group if d["shape"] == "corrected"):
            for bad in (d for d in group if d["shape"] == "failed"):
                pairs.append({**pair_record({**good, "reward": 1.0}, {**bad, "reward": -1.0}), "kind": "correction"})
    return pairs
