r"""The outcome reward r(tau) of a trajectory: its final answer a_hat graded against the reference a*.

A trajectory tau is scored only by its final answer (an outcome reward). The rule-based reward `r1` is
DeepSeek-R1's (Guo et al., 2025; the rule as the talk's slide states it), which rewards the format as well as
the answer:

    r1(tau)     = +1    if the last action gives its answer in \boxed{} and a_hat == a*
                  -0.5  if the last action gives its answer in \boxed{} and a_hat != a*
                  -1    if the last action has no \boxed{} answer (whatever else it states; a last box that
                        never closes is none, not the box before it: `answers.extract_boxed`)
    binary(tau) = 1[a_hat == a*]

where a* is the reference answer and "==" is mathematical equivalence (`grading.Grader.is_equivalent`). The
M-DPO paper itself trains on the correct / incorrect split alone (binary). With answer modes that also read an
unboxed "The answer is 5" (`answers.py`), `correct` grades that answer, but r1 still gives -1: the format is
part of the reward.

A self-rewarding trajectory (`attempts.py`) is graded on its final attempt's answer, and with a verdict
weight w > 0 its verdicts' faithfulness is added:

    r(tau) = r1(y_J) + w * mean_{judged j} (+1 if 1[v_j = correct] == c_j else -1)

`grade_trajectory` sets `pred`, `correct`, `reward` (and `attempts`) of one record from its messages, never
from its stored fields; `grade_trajectories` does it for many, in threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mathagent.answers import extract_answer, extract_boxed
from mathagent.attempts import CORRECT, DEFAULT_MARKERS, Attempt, Markers, parse_attempts
from mathagent.grading import Grader
from mathagent.records import last_action

REWARD_KINDS = ("r1", "binary")


def outcome_reward(boxed: bool, correct: bool, kind: str = "r1") -> float:
    """The reward of an answer already graded: r1 (DeepSeek-R1's rule) is +1 boxed and correct, -0.5 boxed and
    wrong, -1 without a boxed answer (even when another answer form was read and graded); binary is
    1[correct]."""
    if kind == "binary":
        return 1.0 if correct else 0.0
    if not boxed:
        return -1.0
    return 1.0 if correct else -0.5


def answer_reward(grader: Grader, pred: str | None, gold: str, kind: str = "r1") -> float:
    """The reward of a boxed answer `pred` (None: no boxed answer). r1: +1 correct, -0.5 wrong, -1 none;
    binary: 1 or 0."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; choose from {REWARD_KINDS}")
    return outcome_reward(pred is not None, grader.is_equivalent(pred, gold), kind)


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


def grade_trajectory(
    trajectory: dict[str, Any],
    grader: Grader,
    *,
    answer_modes: Sequence[str] = ("boxed",),
    reward_kind: str = "r1",
    verdict_reward: float = 0.0,
) -> dict[str, Any]:
    """A copy of the trajectory with `pred`, `correct`, `reward` set from its messages (never from its stored
    fields): pred is the answer of the last action. Without a reference `answer`, `correct` and `reward` are
    None.

    A trajectory of self-rewarding correction (one that holds the model's own verdicts, or the `verdicts` a
    self-rewarding rollout asked for; `attempts.py`) is graded on its final attempt's answer instead, and gets
    `attempts`: each attempt's answer, verdict and correctness. Its reward is that of the final answer, plus,
    with `verdict_reward` w > 0, w times the mean over its judged attempts of +1 for a faithful verdict
    ("correct" of a right answer, "wrong" of a wrong one) and -1 for a false one (`verdict_term`)."""
    content = last_action(trajectory["messages"])
    pred = extract_answer(content, answer_modes) if content is not None else None
    boxed = content is not None and extract_boxed(content) is not None
    graded = dict(trajectory)
    gold = trajectory.get("answer")
    verdicts = trajectory.get("verdicts")  # the verdict strings a self-rewarding rollout asked for
    markers = DEFAULT_MARKERS
    if isinstance(verdicts, dict) and all(isinstance(verdicts.get(k), str) and verdicts[k].strip()
                                          for k in ("correct", "wrong")):
        markers = Markers(correct=verdicts["correct"], wrong=verdicts["wrong"])
    attempts = parse_attempts(trajectory["messages"], markers)
    if attempts and (verdicts is not None or any(a.verdict is not None for a in attempts)):
        pred = attempts[-1].answer
        boxed = pred is not None
        graded["attempts"] = graded_attempts(attempts, None if gold is None else str(gold),
                                             grader.is_equivalent)
    graded["pred"] = pred
    if gold is None:
        graded["correct"] = None
        graded["reward"] = None
    else:
        graded["correct"] = grader.is_equivalent(pred, str(gold))
        graded["reward"] = outcome_reward(boxed, graded["correct"], reward_kind)
        if verdict_reward and "attempts" in graded:
            graded["reward"] += verdict_reward * verdict_term(graded["attempts"])
    return graded


def grade_trajectories(
    trajectories: Iterable[dict[str, Any]],
    grader: Grader,
    *,
    answer_modes: Sequence[str] = ("boxed",),
    reward_kind: str = "r1",
    verdict_reward: float = 0.0,
    threads: int = 4,
) -> list[dict[str, Any]]:
    """Grade many trajectories, `threads` at a time (the grader's sympy workers run in parallel)."""
    items = list(trajectories)

    def grade(t: dict[str, Any]) -> dict[str, Any]:
        return grade_trajectory(t, grader, answer_modes=answer_modes, reward_kind=reward_kind,
                                verdict_reward=verdict_reward)

    if threads <= 1 or len(items) < 2:
        return [grade(t) for t in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(grade, items))
