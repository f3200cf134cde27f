"""Self-rewarding correction data (Xiong et al. 2025) by sequential rejection sampling: demonstrations of the
self-rewarding format (`attempts.py`) and preference pairs of them, for `make-corrections`.

From graded first attempts (a rollout's trajectories, several per problem) and the grader's verdicts, the
paper's shapes, each one trajectory whose single assistant stream carries its attempts and verdicts:

    correct    y correct -> "[VERIFY] correct"
    corrected  y wrong -> "[VERIFY] wrong" -> cue -> y' correct -> "[VERIFY] correct"
    failed     y wrong -> "[VERIFY] wrong" -> cue -> y' wrong -> "[VERIFY] wrong"   (a set share of the wrong)

and preference pairs with the same first attempt: the faithful verdict over the false one, and the
successful correction over the failed one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mathagent.attempts import DEFAULT_MARKERS, Markers
from mathagent.pairs import pair_record
from mathagent.records import group_by_problem, messages_key, problem_rng, split_prompt
from mathagent.tokens import drop_ids

FORMATS = ("sft", "pairs")  # what make-corrections writes: the demonstrations, or pairs of them

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
            # Its assistant stream joins text from two trajectories and the grader's verdicts: no ids hold it,
            # so training renders it (as any record without ids).
            drop_ids(record)
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
