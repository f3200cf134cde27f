r"""Preference data from sampled trajectories: pairs for M-DPO, labelled completions for M-KTO, winners for SFT.

A trajectory tau = (x, a_1, o_1, ..., a_H) of problem x splits into its prompt (the messages before the first
action a_1: an optional system message and the user turn with the question) and its response (a_1, o_1, ...,
a_H, observations included: the M-DPO loss masks them, `chat.py` renders that). For each problem, the
trajectories that pass the filters and the deduplication are split into

    winners W = {tau : correct(tau)}          losers L = {tau : not correct(tau)}
    (with a reward threshold t:  W = {tau : r(tau) > t},  L = {tau : r(tau) <= t})

and a strategy picks pairs (w, l) in W x L, w the chosen response and l the rejected one:

    all       every w in W with every l in L, |W| * |L| pairs (winners in input order, then losers in input order).
    random    a uniform sample without replacement of min(K, |W| * |L|) elements of W x L, drawn with
              random.Random(f"{seed}:{problem_id}") (a problem's pairs do not depend on the rest of the file),
              listed in the order of `all`.
    max-min   w_(1), w_(2), ... the winners by score s descending, l_(1), l_(2), ... the losers by score
              ascending (ties in a random order from the same per-problem generator: with outcome rewards
              all winners tie and all losers tie, so this is a random pair, never the first against the
              first), and the pairs (w_(j), l_(j)) for j = 1 .. min(K, |W|, |L|):
              K = 1 is (argmax_W s, argmin_L s), the best winner against the worst loser; a larger K takes the
              next best against the next worst, so no trajectory is in two pairs. s is the reward r(tau), or a
              score field such as a PRM's `score` (--score-field).

K is 8 for random and 1 for max-min unless given. `--format sft` applies the same strategy to the winners
alone (all: every winner; random: a sample of min(K, |W|); max-min: the K best by s) and writes them as they
are, for rejection-sampling fine-tuning. `--format kto` writes each trajectory of the selected pairs once,
with `label` true for a winner and false for a loser, so the desirable and undesirable sets stay balanced.

Where the grade comes from: a trajectory whose stored fields hold what the selection needs (`correct`; with a
threshold `reward`; for max-min by reward `reward` too) is trusted as it is. Otherwise, when it has a
reference `answer`, it is graded from its messages exactly as `evaluate` does (the last \boxed{} of the last
action against the answer, with `mathagent.rewards`), which sets `pred`, `correct` and `reward`. `regrade=True`
grades every trajectory that has an answer. Without an answer and without the fields, it is `ungraded`.

Filters are named rules applied to each trajectory in this order; a trajectory is dropped by the first rule
it hits and counted under that name:

    no_action          no assistant message: there is no response
    unfinished         status is not "answered" (stopped, max_turns, length, tool_call)   [keep_unfinished]
    no_answer          pred is None: no \boxed{} answer                                    [keep_unfinished]
    error_observation  the last observation reports a failed cell: its recorded outcome is error, memory,
                       timeout or killed (without an outcome: a traceback or timeout in its text) [keep_errors]
    too_long           more than max_length tokens for the whole conversation under the chat template
    ungraded           no label: no stored grade and no answer to grade against
    no_score           max-min only: no numeric score (the score field, or the reward)
    prompt_mismatch    its prompt differs from the problem's prompt (the most common prompt among the
                       problem's remaining trajectories, ties to the first seen): a pair needs one prompt

Then identical responses of a problem (the same roles and contents after the prompt) are deduplicated, the
first in input order kept, and counted (`duplicates`; `duplicate_label_conflicts` counts those whose dropped
copy had the other label, a sign of a non-deterministic grade).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from mathagent.answers import extract_answer
from mathagent.errors import UserError
from mathagent.records import (
    ANSWERED,
    first_action,
    group_by_problem,
    is_observation,
    last_action,
    messages_key,
    observation_failed,
    problem_rng,
    split_prompt,
)
from mathagent.rewards import REWARD_KINDS, grade_trajectories
from mathagent.tokens import PROMPT_IDS, TOKEN_IDS, has_ids

STRATEGIES = ("random", "max-min", "all")
FORMATS = ("pairs", "kto", "sft")
DEFAULT_K = {"random": 8, "max-min": 1}

# Fields that belong to one trajectory, never copied into a pair as if they were the problem's.
_TRAJECTORY_FIELDS = ("id", "messages", "status", "pred", "correct", "reward")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------
# Prompt and response
# --------------------------------------------------------------------------------------------------------


def response_key(trajectory: dict[str, Any]) -> str:
    """What makes two responses identical: the roles and contents of the messages after the prompt."""
    return messages_key(split_prompt(trajectory["messages"])[1])


def prompt_key(trajectory: dict[str, Any]) -> str:
    return messages_key(split_prompt(trajectory["messages"])[0])


# --------------------------------------------------------------------------------------------------------
# Labels and scores
# --------------------------------------------------------------------------------------------------------


@dataclass
class PairConfig:
    strategy: str = "random"
    k: int | None = None  # None: DEFAULT_K of the strategy (all pairs for `all`)
    seed: int = 0
    score_field: str | None = None  # max-min: rank by this field instead of the reward
    reward_threshold: float | None = None  # winners: reward > threshold, instead of correct
    keep_unfinished: bool = False  # turns off `unfinished` and `no_answer`
    keep_errors: bool = False  # turns off `error_observation`
    max_length: int | None = None  # `too_long` (needs a tokenizer)
    regrade: bool = False  # grade every trajectory that has an answer, ignoring stored grades
    reward_kind: str = "r1"  # the reward of the trajectories graded here
    format: str = "pairs"

    def __post_init__(self) -> None:
        """Refuse impossible options with a `UserError` naming the make-pairs option, before any work."""
        if self.format not in FORMATS:
            raise UserError(f"format {self.format!r}: choose from {', '.join(FORMATS)}", options=("format",))
        if self.strategy not in STRATEGIES:
            raise UserError(f"strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}", options=("strategy",))
        if self.k is not None and self.k < 1:
            raise UserError("k must be at least 1", options=("k",))
        if self.k is not None and self.strategy == "all":
            raise UserError("k does not apply to strategy all (every winner with every loser)", options=("k", "strategy"))
        if self.reward_kind not in REWARD_KINDS:
            raise UserError(f"reward {self.reward_kind!r}: choose from {', '.join(REWARD_KINDS)}", options=("reward",))
        if self.score_field is not None and self.strategy != "max-min":
            raise UserError("score_field applies to strategy max-min only", options=("score_field", "strategy"))
        if self.max_length is not None and self.max_length < 1:
            raise UserError("max_length needs a positive length and tokenizer (or model)",
                            options=("max_length", "tokenizer", "model"))

    @property
    def pairs_per_problem(self) -> int | None:
        """K, or None for no limit (the `all` strategy)."""
        return self.k if self.k is not None else DEFAULT_K.get(self.strategy)

    @property
    def scores_by_reward(self) -> bool:
        return self.strategy == "max-min" and self.score_field is None

    def outcome_fields(self) -> tuple[str, ...]:
        """The stored fields a trajectory needs to be trusted without grading."""
        fields = ["reward" if self.reward_threshold is not None else "correct"]
        if self.scores_by_reward and "reward" not in fields:
            fields.append("reward")
        return tuple(fields)


def needs_grading(trajectory: dict[str, Any], config: PairConfig) -> bool:
    """Whether the trajectory is graded here: it has an answer, and a needed field is missing (or regrade)."""
    if trajectory.get("answer") is None:
        return False
    return config.regrade or any(trajectory.get(name) is None for name in config.outcome_fields())


def label(trajectory: dict[str, Any], reward_threshold: float | None = None) -> bool | None:
    """True for a winner, False for a loser, None when there is no grade to decide by."""
    if reward_threshold is None:
        correct = trajectory.get("correct")
        return None if correct is None else bool(correct)
    reward = trajectory.get("reward")
    return None if reward is None else reward > reward_threshold


def score(trajectory: dict[str, Any], score_field: str | None = None) -> float | None:
    """s(tau) for max-min: the score field, or the reward; None when it is not a number."""
    value = trajectory.get(score_field or "reward")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def pred(trajectory: dict[str, Any]) -> str | None:
    """The stored answer, or the one extracted from the last action when the record has no `pred` field."""
    if "pred" in trajectory:
        return trajectory["pred"]
    content = last_action(trajectory["messages"])
    return extract_answer(content) if content is not None else None


def check_outcome_fields(record: dict[str, Any], score_field: str | None = None) -> str | None:
    """For read_records: what is wrong with a trajectory's grade fields, or None."""
    if record.get("problem_id") is None:
        return "field 'problem_id' must not be null"
    if record.get("correct") is not None and not isinstance(record["correct"], bool):
        return "field 'correct' must be true, false or null"
    for name in ("reward", score_field):
        if name is None or record.get(name) is None:
            continue
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"field '{name}' must be a number or null"
    return None


# --------------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------------


class Filter(NamedTuple):
    """A named rule: `hit(trajectory)` is True when the trajectory is dropped."""

    name: str
    hit: Callable[[dict[str, Any]], bool]


def no_action(trajectory: dict[str, Any]) -> bool:
    return first_action(trajectory["messages"]) is None


def unfinished(trajectory: dict[str, Any]) -> bool:
    return trajectory.get("status") != ANSWERED


def no_answer(trajectory: dict[str, Any]) -> bool:
    return pred(trajectory) is None


def last_observation(messages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The last observation (a non-assistant message after the first action), or None."""
    return next((messages[i] for i in reversed(range(len(messages))) if is_observation(messages, i)), None)


def error_observation(trajectory: dict[str, Any]) -> bool:
    """The last observation reports a failed cell: its recorded outcome, or the traceback heuristic for
    trajectories from elsewhere (`records.observation_failed`)."""
    observation = last_observation(trajectory["messages"])
    return observation is not None and observation_failed(observation)


def conversation_length(tokenizer, messages: Sequence[dict[str, str]], prompt_ids: Sequence[int] | None = None) -> int:
    """Tokens of the whole conversation as training reads it: its recorded ids where it has them
    (`prompt_ids` and every message's `token_ids`), else its rendering under the tokenizer's chat template
    (special tokens included)."""
    from mathagent.chat import token_ids

    _, response = split_prompt(messages)
    if has_ids(prompt_ids, response):
        return len(prompt_ids) + sum(len(m[TOKEN_IDS]) for m in response)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    # The template already wrote any BOS it wants (as in prompt_ids); special tokens spelled inside a
    # message are plain text, as training tokenizes them.
    return len(token_ids(tokenizer, messages, text))


def too_long(tokenizer, max_length: int) -> Filter:
    return Filter("too_long", lambda t: conversation_length(tokenizer, t["messages"], t.get(PROMPT_IDS)) > max_length)


def ungraded(reward_threshold: float | None) -> Filter:
    return Filter("ungraded", lambda t: label(t, reward_threshold) is None)


def no_score(score_field: str | None) -> Filter:
    return Filter("no_score", lambda t: score(t, score_field) is None)


def trajectory_filters(config: PairConfig, tokenizer=None) -> list[Filter]:
    """The filters a configuration turns on, in the order they are applied."""
    filters = [Filter("no_action", no_action)]
    if not config.keep_unfinished:
        filters += [Filter("unfinished", unfinished), Filter("no_answer", no_answer)]
    if not config.keep_errors:
        filters.append(Filter("error_observation", error_observation))
    if config.max_length is not None:
        if tokenizer is None:
            raise ValueError("max_length needs a tokenizer")
        filters.append(too_long(tokenizer, config.max_length))
    filters.append(ungraded(config.reward_threshold))
    if config.strategy == "max-min":
        filters.append(no_score(config.score_field))
    return filters


def apply_filters(
    trajectories: Iterable[dict[str, Any]], filters: Sequence[Filter], hits: Counter
) -> list[dict[str, Any]]:
    """The trajectories no filter hits; each dropped one counted in `hits` under the first filter it hits."""
    kept = []
    for t in trajectories:
        rule = next((f.name for f in filters if f.hit(t)), None)
        if rule is None:
            kept.append(t)
        else:
            hits[rule] += 1
    return kept


def drop_prompt_mismatches(group: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The trajectories of one problem whose prompt is the problem's prompt (the most common one, ties to
    the first seen), and how many were dropped."""
    if not group:
        return [], 0
    keys = [prompt_key(t) for t in group]
    counts = Counter(keys)
    first_seen = {key: keys.index(key) for key in counts}
    reference = max(counts, key=lambda key: (counts[key], -first_seen[key]))
    kept = [t for t, key in zip(group, keys) if key == reference]
    return kept, len(group) - len(kept)


def deduplicate(
    group: Sequence[dict[str, Any]], reward_threshold: float | None = None
) -> tuple[list[dict[str, Any]], int, int]:
    """The first trajectory of each distinct response, the number dropped, and how many of the dropped had
    a label different from the kept copy's."""
    kept: dict[str, dict[str, Any]] = {}
    dropped = conflicts = 0
    for t in group:
        key = response_key(t)
        if key in kept:
            dropped += 1
            conflicts += label(t, reward_threshold) != label(kept[key], reward_threshold)
        else:
            kept[key] = t
    return list(kept.values()), dropped, conflicts


# --------------------------------------------------------------------------------------------------------
# Selection (pure: lists in, pairs out)
# --------------------------------------------------------------------------------------------------------


def all_pairs(winners: Sequence[T], losers: Sequence[T]) -> list[tuple[T, T]]:
    """W x L, winner-major, both in input order."""
    return [(w, l) for w in winners for l in losers]


def random_pairs(winners: Sequence[T], losers: Sequence[T], k: int, rng: random.Random) -> list[tuple[T, T]]:
    """A uniform sample without replacement of min(k, |W||L|) elements of W x L, in the order of all_pairs."""
    total = len(winners) * len(losers)
    chosen = sorted(rng.sample(range(total), min(k, total)))
    return [(winners[i // len(losers)], losers[i % len(losers)]) for i in chosen]


def _shuffled(items: Sequence[T], rng: random.Random) -> list[T]:
    out = list(items)
    rng.shuffle(out)
    return out


def max_min_pairs(
    winners: Sequence[T], losers: Sequence[T], k: int, score_of: Callable[[T], float], rng: random.Random
) -> list[tuple[T, T]]:
    """(w_(j), l_(j)) for j < min(k, |W|, |L|): winners by score descending against losers by score
    ascending, ties in a random order drawn from `rng` (a shuffle, then a stable sort): with outcome rewards
    every winner ties, and input order would always pair the first winner with the first loser."""
    best = sorted(_shuffled(winners, rng), key=lambda w: -score_of(w))
    worst = sorted(_shuffled(losers, rng), key=score_of)
    return list(zip(best, worst))[:k]


def select_pairs(
    winners: Sequence[T],
    losers: Sequence[T],
    strategy: str,
    k: int | None,
    rng: random.Random,
    score_of: Callable[[T], float],
) -> list[tuple[T, T]]:
    if not winners or not losers:
        return []
    if strategy == "all":
        return all_pairs(winners, losers)
    if strategy == "random":
        return random_pairs(winners, losers, k, rng)
    return max_min_pairs(winners, losers, k, score_of, rng)


def select_winners(
    winners: Sequence[T], strategy: str, k: int | None, rng: random.Random, score_of: Callable[[T], float]
) -> list[T]:
    """The winners kept for SFT: all; a uniform sample of min(k, |W|) (in input order); or the k best (ties at
    random, as in max_min_pairs)."""
    if strategy == "all":
        return list(winners)
    if strategy == "random":
        return [winners[i] for i in sorted(rng.sample(range(len(winners)), min(k, len(winners))))]
    return sorted(_shuffled(winners, rng), key=lambda w: -score_of(w))[:k]


# --------------------------------------------------------------------------------------------------------
# Output records
# --------------------------------------------------------------------------------------------------------


def pair_record(chosen: dict[str, Any], rejected: dict[str, Any], score_field: str | None = None) -> dict[str, Any]:
    """One preference pair. Fields the two trajectories share with equal values (the problem's: question,
    answer, subject, ...) are kept; their own fields become chosen_* and rejected_*."""
    prompt, chosen_response = split_prompt(chosen["messages"])
    rejected_prompt, rejected_response = split_prompt(rejected["messages"])
    if messages_key(prompt) != messages_key(rejected_prompt):
        raise ValueError(f"pair of {chosen['id']} and {rejected['id']}: the prompts differ")
    own = set(_TRAJECTORY_FIELDS) | ({score_field} if score_field else set())
    record = {
        name: value
        for name, value in chosen.items()
        if name not in own and name in rejected and rejected[name] == value
    }
    record.update(
        id=f"{chosen['problem_id']}:{chosen['id']}>{rejected['id']}",
        problem_id=chosen["problem_id"],
        prompt=prompt,
        chosen=chosen_response,
        rejected=rejected_response,
        chosen_id=chosen["id"],
        rejected_id=rejected["id"],
        chosen_reward=chosen.get("reward"),
        rejected_reward=rejected.get("reward"),
    )
    if score_field:
        record[f"chosen_{score_field}"] = chosen.get(score_field)
        record[f"rejected_{score_field}"] = rejected.get(score_field)
    return record


def kto_record(trajectory: dict[str, Any], desirable: bool) -> dict[str, Any]:
    """One labelled completion: the trajectory's fields, its messages split into prompt and completion."""
    prompt, completion = split_prompt(trajectory["messages"])
    record = {name: value for name, value in trajectory.items() if name != "messages"}
    record.update(prompt=prompt, completion=completion, label=desirable)
    return record


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


@dataclass
class PairStats:
    trajectories: int = 0
    problems: int = 0
    graded: int = 0  # trajectories graded here (the rest kept their stored grade)
    filtered: dict[str, int] = field(default_factory=dict)  # filter name -> trajectories it dropped
    duplicates: int = 0
    duplicate_label_conflicts: int = 0
    winners: int = 0
    losers: int = 0
    problems_with_both: int = 0
    problems_without_winner: int = 0
    problems_without_loser: int = 0
    written: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def make_pairs(
    trajectories: Sequence[dict[str, Any]], config: PairConfig, *, grader=None, tokenizer=None
) -> tuple[list[dict[str, Any]], PairStats]:
    """The output records of `config.format` and the counts of every step.

    `grader` (a `grading.Grader`) is needed when some trajectory `needs_grading`; `tokenizer` when
    `config.max_length` is set. Problems come out in order of first appearance.
    """
    stats = PairStats(trajectories=len(trajectories))
    ids = Counter(t["id"] for t in trajectories)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        # Pair ids and kto records are keyed by trajectory id: two trajectories under one id would collide.
        raise UserError(f"trajectory id {repeated[0]!r} appears {ids[repeated[0]]} times "
                        f"({len(repeated)} ids repeat); ids must be unique")
    to_grade = [i for i, t in enumerate(trajectories) if needs_grading(t, config)]
    trajectories = list(trajectories)
    if to_grade:
        if grader is None:
            raise ValueError(f"{len(to_grade)} trajectories need grading, and no grader was given")
        graded = grade_trajectories([trajectories[i] for i in to_grade], grader, reward_kind=config.reward_kind)
        for i, t in zip(to_grade, graded):
            trajectories[i] = t
        stats.graded = len(to_grade)

    filters = trajectory_filters(config, tokenizer)
    hits: Counter = Counter()
    groups = group_by_problem(trajectories)
    stats.problems = len(groups)
    k = config.pairs_per_problem

    def score_of(t: dict[str, Any]) -> float:
        return score(t, config.score_field)

    out: list[dict[str, Any]] = []
    for problem_id, group in groups.items():
        kept = apply_filters(group, filters, hits)
        kept, mismatched = drop_prompt_mismatches(kept)
        hits["prompt_mismatch"] += mismatched
        kept, dropped, conflicts = deduplicate(kept, config.reward_threshold)
        stats.duplicates += dropped
        stats.duplicate_label_conflicts += conflicts
        winners = [t for t in kept if label(t, config.reward_threshold)]
        losers = [t for t in kept if not label(t, config.reward_threshold)]
        stats.winners += len(winners)
        stats.losers += len(losers)
        stats.problems_with_both += bool(winners and losers)
        stats.problems_without_winner += bool(losers and not winners)
        stats.problems_without_loser += bool(winners and not losers)

        rng = problem_rng(config.seed, problem_id)
        if config.format == "sft":
            if winners:
                out.extend(select_winners(winners, config.strategy, k, rng, score_of))
            continue
        pairs = select_pairs(winners, losers, config.strategy, k, rng, score_of)
        if config.format == "pairs":
            out.extend(pair_record(w, l, config.score_field) for w, l in pairs)
            continue
        written: set[str] = set()  # kto: each trajectory of the pairs once, in order of first appearance
        for w, l in pairs:
            for t, desirable in ((w, True), (l, False)):
                if t["id"] not in written:
                    written.add(t["id"])
                    out.append(kto_record(t, desirable))
    stats.filtered = {f.name: hits[f.name] for f in filters}
    stats.filtered["prompt_mismatch"] = hits["prompt_mismatch"]
    stats.written = len(out)
    return out, stats


def format_stats(stats: PairStats, config: PairConfig) -> list[str]:
    """The report of a run, for stderr."""
    k = config.pairs_per_problem
    what = {"pairs": "pairs", "kto": "labelled completions", "sft": "winners"}[config.format]
    return [
        f"make-pairs: {stats.trajectories} trajectories of {stats.problems} problems, {stats.graded} graded here",
        "  filtered: " + ", ".join(f"{name} {n}" for name, n in stats.filtered.items()),
        f"  duplicates removed: {stats.duplicates} ({stats.duplicate_label_conflicts} with a conflicting label)",
        f"  kept: {stats.winners} winners, {stats.losers} losers; {stats.problems_with_both} problems with both, "
        f"{stats.problems_without_loser} without a loser, {stats.problems_without_winner} without a winner",
        f"  wrote {stats.written} {what} ({config.strategy}" + (f", k={k})" if k is not None else ")"),
    ]
