"""Evaluation metrics of a policy from its sampled trajectories: accuracy, pass@k, maj@k, best-of-n, turns.

For a problem with n sampled trajectories of which c are correct:

    pass@k = 1 - C(n - c, k) / C(n, k)           (the unbiased estimator of Chen et al., 2021)
           = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)   (the form computed here: no huge binomials)

    maj@k  = 1[ the most frequent answer among the first k trajectories == a* ]
             answers are grouped by mathematical equivalence, not by string; a tie between groups goes to
             the group whose first member came first (trajectories in input order); no answer casts no vote.

    best-of-n = 1[ the trajectory with the highest score (e.g. a PRM's `score`) is correct ]
                ties go to the first trajectory in input order; trajectories without the score are skipped.

    accuracy  = (sum of correct) / (number of trajectories)       (pass@1 averaged over samples)

Each metric is averaged over the problems that have at least k (or one scored) trajectories. Turn statistics
(from `messages`): a tool call is an action followed by an observation; an error observation is one whose
recorded cell outcome is not ok (error, memory, timeout, killed; `records.observation_failed`), or, for an
observation from elsewhere without an outcome, one that reads as a Python traceback or timeout; a cut
observation had its output cut to the sandbox's cap; a max-turn hit has status "max_turns".

The self-rewarding correction metrics (Xiong et al. 2025; `attempts.py`), over the trajectories `accuracy` is
over (those with a reference answer), c_j = 1[y_j is correct]:

    turn-1 accuracy  = mean c_1             final accuracy = mean c_J   (= accuracy)
    improvement      = final - turn-1       = wrong->correct - correct->wrong
    wrong->correct   = mean 1[not c_1 and c_J]          correct->wrong = mean 1[c_1 and not c_J]
    verification     = P(v_j = correct | c_j) and P(v_j = wrong | not c_j), over judged attempts

A trajectory without attempts (no \\boxed{} answer and no verdict anywhere) counts as one answer never judged:
c_1 = c_J = its `correct`, 0 when it gave no answer. Leaving it out would report the accuracy of the answered
trajectories only, above the `accuracy` of the same run.

`evaluate` computes the report from graded records (`rewards.grade_trajectories` re-grades them from their
messages: stored pred/correct are never trusted).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from mathagent.attempts import CORRECT, WRONG
from mathagent.errors import UserError
from mathagent.records import is_observation, observation_failed

Equal = Callable[[str, str], bool]  # equal(pred, gold)


# --------------------------------------------------------------------------------------------------------
# The estimators (pure)
# --------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with n samples, c of them correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): a product of numbers in (0, 1], stable for any n.
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_answer(preds: Sequence[str | None], equal: Equal) -> tuple[str | None, int]:
    """The answer voted most often (by equivalence classes) and its vote count; (None, 0) with no votes.

    Each answer joins the first earlier class whose first member it equals; a tie between classes goes to
    the class that appeared first.
    """
    classes: list[list[str]] = []
    by_string: dict[str, int] = {}
    for pred in preds:
        if pred is None:
            continue
        index = by_string.get(pred)
        if index is None:
            index = next((i for i, members in enumerate(classes) if equal(pred, members[0])), None)
            if index is None:
                classes.append([])
                index = len(classes) - 1
            by_string[pred] = index
        classes[index].append(pred)
    if not classes:
        return None, 0
    # max() keeps the first of equal counts, and classes are in order of first appearance.
    best = max(classes, key=len)
    return best[0], len(best)


def maj_at_k(preds: Sequence[str | None], gold: str, k: int, equal: Equal) -> bool:
    """Whether the majority answer of the first k predictions equals the reference."""
    answer, _ = majority_answer(preds[:k], equal)
    return answer is not None and equal(answer, gold)


def best_of_n(samples: Sequence[dict[str, Any]], score_field: str) -> bool | None:
    """Whether the highest-scoring sample is correct; None when no sample has a numeric `score_field`."""
    best: dict[str, Any] | None = None
    for sample in samples:
        score = sample.get(score_field)
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            if best is None or score > best[score_field]:
                best = sample
    return None if best is None else bool(best.get("correct"))


# --------------------------------------------------------------------------------------------------------
# Turn statistics
# --------------------------------------------------------------------------------------------------------

def turn_statistics(messages: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Actions, tool calls (actions answered by an observation), observations, error observations (a failed
    cell: `records.observation_failed`) and cut observations (output cut to the sandbox's cap)."""
    stats = {"actions": 0, "tool_calls": 0, "observations": 0, "error_observations": 0, "cut_observations": 0}
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            stats["actions"] += 1
            if i + 1 < len(messages) and is_observation(messages, i + 1):
                stats["tool_calls"] += 1
        elif is_observation(messages, i):
            stats["observations"] += 1
            stats["error_observations"] += observation_failed(message)
            outcome = message.get("outcome")
            stats["cut_observations"] += isinstance(outcome, dict) and outcome.get("cut") is True
    return stats


# --------------------------------------------------------------------------------------------------------
# Self-rewarding correction
# --------------------------------------------------------------------------------------------------------


def correction_metrics(trajectories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paper's correction metrics (module docstring) over graded trajectories (`correct` set): their
    `attempts`, with `correct` set (`rewards.grade_trajectory` adds them to self-rewarding trajectories); one
    without attempts counts as a single unjudged answer graded `correct` (wrong when it gave none)."""
    graded = [t for t in trajectories if t.get("correct") is not None]
    rows = [t.get("attempts") or [{"verdict": None, "correct": t["correct"]}] for t in graded]
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


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------


def parse_pass_at(text: str, samples: int) -> list[int]:
    """--pass-at: the k of pass@k and maj@k, sorted, each once.

    `text` is comma-separated: positive integers; `n`, the most samples a problem has (`samples`); and `...`
    between the start of a progression and its last term. Three terms before `...` in an integer ratio set
    that ratio (1,2,4,...,64 doubles), otherwise the last two set a step (1,2,...,8 is every k from 1 to 8).
    A progression stops at its last term, which it includes: 1,2,4,...,n is the powers of two below n and n
    itself, and 1 alone where every problem has one sample.
    """
    def error(why: str) -> UserError:
        return UserError(f"pass_at {text!r}: {why}; expected e.g. 1,4,8 or 1,2,4,...,n", options=("pass_at",))

    def term(item: str) -> int:
        if item == "n":
            return samples
        if not item.isdigit() or int(item) < 1:
            raise error(f"{item!r} is not a positive integer, n or ...")
        return int(item)

    items = [item.strip() for item in text.split(",") if item.strip()]
    ks: list[int] = []
    run: list[int] = []  # the terms since the last progression: a `...` continues them
    i = 0
    while i < len(items):
        if items[i] != "...":
            run.append(term(items[i]))
            i += 1
            continue
        if len(run) < 2 or i + 1 == len(items) or items[i + 1] == "...":
            raise error("... goes between two or more terms and the last one")
        end = term(items[i + 1])
        a, b = run[-2], run[-1]
        if b <= a:
            raise error(f"the terms before ... must increase, not {a}, {b}")
        ratio = a // run[-3] if len(run) >= 3 and a % run[-3] == 0 else 0
        geometric = ratio >= 2 and b == a * ratio
        start = run[-3:] if geometric else run[-2:]
        ks += run[: len(run) - len(start)]  # terms listed before the progression stay as they are
        progression = start
        while progression[-1] < end:
            if len(progression) > 10_000:
                raise error("more than 10000 values of k")
            progression.append(progression[-1] * ratio if geometric else progression[-1] + b - a)
        ks += [k for k in progression if k < end] + [end]
        run = [end]
        i += 2
    ks += run
    if not ks:
        raise error("no k given")
    return sorted(set(ks))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group_metrics(groups: dict[str, list[dict[str, Any]]], ks: Sequence[int], equal: Equal) -> dict[str, Any]:
    samples = [t for ts in groups.values() for t in ts]
    report: dict[str, Any] = {
        "problems": len(groups),
        "trajectories": len(samples),
        "accuracy": _mean([1.0 if t["correct"] else 0.0 for t in samples]),
        "pass@k": {},
        "maj@k": {},
        "problems@k": {},  # the problems with at least k samples, over which pass@k and maj@k are averaged
    }
    # Self-rewarding correction (the paper's table): trajectories with attempts, or that a self-rewarding rollout
    # asked for verdicts (`verdicts`), though none of them gave an answer.
    if any(t.get("attempts") or t.get("verdicts") is not None for t in samples):
        report["correction"] = correction_metrics(samples)
    for k in ks:
        eligible = [ts for ts in groups.values() if len(ts) >= k]
        report["problems@k"][str(k)] = len(eligible)
        report["pass@k"][str(k)] = _mean([pass_at_k(len(ts), sum(bool(t["correct"]) for t in ts), k) for ts in eligible])
        report["maj@k"][str(k)] = _mean(
            [1.0 if maj_at_k([t["pred"] for t in ts], str(ts[0]["answer"]), k, equal) else 0.0 for ts in eligible]
        )
    return report


def evaluate(
    graded: Sequence[dict[str, Any]],
    *,
    ks: Sequence[int] = (1,),
    score_field: str | None = None,
    equal: Equal,
) -> dict[str, Any]:
    """The evaluation report of graded trajectories (records with `pred` and `correct`, see
    `rewards.grade_trajectories`), grouped into problems by `problem_id`.

    `equal(pred, gold)` groups answers for maj@k (the command's `Grader.is_equivalent`). Trajectories
    without a reference answer count in the turn statistics only.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be positive, got {list(ks)}")
    with_answer = [t for t in graded if t.get("correct") is not None]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in with_answer:
        groups[str(t["problem_id"])].append(t)
    report: dict[str, Any] = {"ungraded": len(graded) - len(with_answer)}
    report.update(_group_metrics(groups, ks, equal))

    if score_field is not None:
        outcomes = [best_of_n(ts, score_field) for ts in groups.values()]
        scored = [o for o in outcomes if o is not None]
        report["best_of_n"] = {
            "score_field": score_field,
            "problems": len(scored),
            "accuracy": _mean([1.0 if o else 0.0 for o in scored]),
        }

    for field_name in ("subject", "level"):
        values = {str(ts[0][field_name]) for ts in groups.values() if ts[0].get(field_name) is not None}
        if values:
            report[f"by_{field_name}"] = {
                value: _group_metrics(
                    {p: ts for p, ts in groups.items() if str(ts[0].get(field_name)) == value}, ks, equal
                )
                for value in sorted(values, key=_natural_key)
            }

    report["turns"] = _turn_report(graded)
    return report


def _natural_key(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.isdigit() else (1, value)


def _turn_report(trajectories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    per = [turn_statistics(t["messages"]) for t in trajectories]
    observations = sum(s["observations"] for s in per)
    errors = sum(s["error_observations"] for s in per)
    cut = sum(s["cut_observations"] for s in per)
    n = len(trajectories)
    statuses = Counter(str(t.get("status")) for t in trajectories)
    return {
        "trajectories": n,
        "actions_mean": _mean([s["actions"] for s in per]),
        "tool_calls_mean": _mean([s["tool_calls"] for s in per]),
        "tool_calls_max": max((s["tool_calls"] for s in per), default=None),
        "observations": observations,
        "error_observations": errors,
        "error_observation_rate": errors / observations if observations else None,
        "cut_observations": cut,
        "max_turns_rate": statuses.get("max_turns", 0) / n if n else None,
        "no_answer_rate": sum(t.get("pred") is None for t in trajectories) / n if n else None,
        "statuses": dict(sorted(statuses.items())),
    }


def format_report(report: dict[str, Any]):
    """The report as a rich table (for stderr): overall, then one row per subject and per level."""
    from rich.table import Table

    ks = list(report.get("pass@k", {}))
    table = Table(title=f"evaluate: {report['trajectories']} trajectories, {report['problems']} problems")
    table.add_column("group")
    for column in ("problems", "trajectories", "accuracy", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)):
        table.add_column(column, justify="right")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    def row(name: str, r: dict[str, Any]) -> None:
        table.add_row(name, str(r["problems"]), str(r["trajectories"]), pct(r["accuracy"]),
                      *(pct(r["pass@k"][k]) for k in ks), *(pct(r["maj@k"][k]) for k in ks))

    row("all", report)
    for field_name in ("by_subject", "by_level"):
        for value, r in report.get(field_name, {}).items():
            row(f"{field_name[3:]} {value}", r)
    lines = [table]
    for name, r in (("all", report), *((f"{f[3:]} {v}", r) for f in ("by_subject", "by_level")
                                        for v, r in report.get(f, {}).items())):
        if "correction" in r:
            c, v = r["correction"], r["correction"]["verification"]
            lines.append(
                f"self-correction ({name}, {c['trajectories']} trajectories): turn 1 {pct(c['turn1_accuracy'])} %, "
                f"final {pct(c['final_accuracy'])} %, improvement {pct(c['improvement'])}, wrong->correct "
                f"{pct(c['wrong_to_correct'])} %, correct->wrong {pct(c['correct_to_wrong'])} %; verdicts right "
                f"{pct(v['accuracy'])} % ({pct(v['correct_given_correct'])} % 'correct' of correct answers, "
                f"{pct(v['wrong_given_wrong'])} % 'wrong' of wrong ones)")
    if "best_of_n" in report:
        b = report["best_of_n"]
        lines.append(f"best-of-n by {b['score_field']}: {pct(b['accuracy'])} % over {b['problems']} problems")
    short = {k: n for k, n in report.get("problems@k", {}).items() if n < report["problems"]}
    if short:  # pass@k needs n >= k
        lines.append(f"pass@k and maj@k over the problems with at least k samples: "
                     f"{', '.join(f'k={k}: {n}' for k, n in short.items())} of {report['problems']} problems")
    t = report["turns"]
    lines.append(
        f"turns: {t['actions_mean'] or 0:.2f} actions and {t['tool_calls_mean'] or 0:.2f} tool calls per trajectory; "
        f"{t['error_observations']} of {t['observations']} observations are errors; "
        f"max-turn hits {pct(t['max_turns_rate'])} %, no answer {pct(t['no_answer_rate'])} %"
    )
    if "grading" in report:
        g = report["grading"]
        lines.append(
            f"grading: {g['comparisons']} comparisons, {g['symbolic']} symbolic, failures {g['failures']} "
            f"(timeouts {g['timeouts']}, errors {g['errors']}, oversize {g['oversize']}), unparsed {g['unparsed']}"
        )
    if report.get("ungraded"):
        lines.append(f"{report['ungraded']} trajectories have no reference answer: counted in turns only")
    return lines
