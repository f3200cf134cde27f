"""The synthetic task family of the demo and the tests: multi-step arithmetic word problems solved with code.

A problem is a short story with two-digit numbers ("A farm fills 47 crates with 28 pears each and sells 95
pears. How many pears are left?") whose answer takes two or three operations. Its gold
tool-integrated solution computes one step per python cell, each step in a named variable that the next
cell reads (the sandbox keeps state across cells), and copies the last output into \\boxed{}:

    First the pears in the crates.
    ```python
    total = 47 * 28
    print(total)
    ```
    ```output
    1316
    ```
    ...
    The answer is \\boxed{1221}.

The tool genuinely helps: a 0.5M-parameter model cannot multiply 47 by 28 in its head, but it can learn to
copy numbers into code, pick the operation the story asks for, reuse the variable of the previous cell and
copy the final output. Each of those is a place to fail, which is what makes the family useful for
preference learning: a warm-started policy is right often enough to learn from and wrong often enough to pair.

Problems are a pure function of (n, seed, split). The splits are disjoint by construction: a question belongs
to the held-out split iff a hash of its text says so, whatever seed generated it, so no held-out question is
ever a training question and fresh seeds give fresh problems of both splits.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from mathagent.records import format_observation

SPLITS = ("train", "heldout")
HELDOUT_SHARE = 4  # one question in HELDOUT_SHARE belongs to the held-out split

THINGS = ["apples", "books", "coins", "pens", "stamps", "marbles", "pears", "cards", "shells", "bricks"]

# kind: (question template, steps). A step is (text before the cell, variable, expression over the numbers
# a, b, c, d and the variables of earlier steps). The answer is the last step's value.
KINDS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "pack": (
        "Ann has {a} {thing} and Bob has {b}. They pack them all {c} times over. How many {thing} is that?",
        [("First the total.", "total", "{a} + {b}"), ("Now pack it {c} times.", "packed", "total * {c}")],
    ),
    "sell": (
        "A farm fills {a} crates with {b} {thing} each and sells {c} {thing}. How many {thing} are left?",
        [("First the {thing} in the crates.", "total", "{a} * {b}"),
         ("Then take away the sold ones.", "left", "total - {c}")],
    ),
    "share": (
        "A shop gets {a} boxes of {b} {thing} and shares them equally among {c} stores. "
        "How many {thing} does each store get?",
        [("First all the {thing}.", "total", "{a} * {b}"), ("Now share them.", "each", "total // {c}")],
    ),
    "grow": (
        "A library has {a} {thing} and buys {b} more every week for {c} weeks. How many {thing} does it have then?",
        [("First the {thing} bought.", "bought", "{b} * {c}"), ("Add what it had.", "now", "{a} + bought")],
    ),
    "club": (
        "A club has {a} members who each pay {b} dollars, and it spends {c} dollars on each of {d} trips. "
        "How many dollars are left?",
        [("First the money paid.", "income", "{a} * {b}"), ("Then the cost of the trips.", "cost", "{c} * {d}"),
         ("What is left.", "left", "income - cost")],
    ),
}


def _numbers(rng: random.Random, kind: str) -> dict[str, int]:
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(3, 9)
    if kind == "sell":
        return {"a": a, "b": b, "c": rng.randint(10, 99)}  # a * b >= 100: something is left
    if kind == "share":
        return {"a": c * rng.randint(4, 99 // c), "b": b, "c": c}  # a multiple of c: every store gets a whole share
    if kind == "club":
        return {"a": a, "b": b, "c": rng.randint(2, 9), "d": c}  # income >= 100 > 81 >= what the trips cost
    return {"a": a, "b": b, "c": c}  # pack, grow


def split_of(question: str) -> str:
    """The split a question belongs to, from its text alone."""
    digest = hashlib.blake2b(question.encode(), digest_size=4).digest()
    return "heldout" if int.from_bytes(digest, "little") % HELDOUT_SHARE == 0 else "train"


def solve(kind: str, numbers: dict[str, int]) -> list[tuple[str, str, int]]:
    """The gold steps as (text, code line, value), evaluating each step's expression over the earlier ones."""
    env: dict[str, int] = {}
    out = []
    for text, var, expr in KINDS[kind][1]:
        code = expr.format(**numbers)
        env[var] = eval(code, {"__builtins__": {}}, dict(env))  # noqa: S307 - our own literal arithmetic
        out.append((text, f"{var} = {code}", env[var]))
    return out


def make_problem(rng: random.Random, index: int, prefix: str = "arith") -> dict[str, Any]:
    kind = rng.choice(list(KINDS))
    thing = rng.choice(THINGS)
    numbers = _numbers(rng, kind)
    question = KINDS[kind][0].format(thing=thing, **numbers)
    answer = solve(kind, numbers)[-1][2]
    return {"id": f"{prefix}-{index}", "question": question, "answer": str(answer), "kind": kind, "thing": thing,
            "numbers": numbers, "split": split_of(question)}


def make_problems(n: int, seed: int = 0, split: str | None = None) -> list[dict[str, Any]]:
    """n distinct problems from `seed`; with `split`, only questions of that split (ids `arith-{split}-{seed}-i`)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {', '.join(SPLITS)}")
    rng = random.Random(seed)
    prefix = "arith" if split is None else f"arith-{split}-{seed}"
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < n:
        problem = make_problem(rng, len(out), prefix)
        if problem["question"] in seen or (split is not None and problem["split"] != split):
            continue
        seen.add(problem["question"])
        out.append(problem)
    return out


def gold_actions(problem: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The solution as (action, output of its code or None) pairs: one cell per step, then the boxed answer."""
    out: list[tuple[str, str | None]] = []
    for text, line, value in solve(problem["kind"], problem["numbers"]):
        var = line.split(" = ", 1)[0]
        intro = text.format(thing=problem["thing"], **problem["numbers"])
        out.append((f"{intro}\n```python\n{line}\nprint({var})\n```", str(value)))
    out.append((f"The answer is \\boxed{{{problem['answer']}}}.", None))
    return out


def gold_messages(problem: dict[str, Any], prompt: str, observation_role: str = "user") -> list[dict[str, str]]:
    """The whole gold conversation under a prompt template (see mathagent.prompts.PROMPTS)."""
    messages = [{"role": "user", "content": prompt.format(question=problem["question"])}]
    for action, output in gold_actions(problem):
        messages.append({"role": "assistant", "content": action})
        if output is not None:
            messages.append({"role": observation_role, "content": format_observation(output)})
    return messages


def gold_trajectory(problem: dict[str, Any], prompt: str) -> dict[str, Any]:
    """A gold demonstration as a trajectory record (what `mathagent train-sft` reads)."""
    return {**problem, "problem_id": problem["id"], "messages": gold_messages(problem, prompt),
            "status": "answered", "pred": problem["answer"], "correct": True, "reward": 1.0}


def in_head_share(problem: dict[str, Any]) -> float:
    """How often the demonstrator answers without the tool: mostly when the first number looks small.

    1.0 below 20, falling linearly to 0.1 at 85 and above (the rule the SFT policy half-learns)."""
    a = problem["numbers"]["a"]
    return min(1.0, max(0.1, 1.0 - 0.9 * (a - 20) / 65))


def demonstrations(n: int, seed: int, prompt: str) -> list[dict[str, Any]]:
    """n demonstrations for supervised fine-tuning, as a demonstrator who is always right would write them:
    with the tool (`gold_trajectory`), or, with probability `in_head_share`, the answer alone, computed in
    its head.

    The demonstrator's head is reliable; a 0.5M-parameter model's is not. A policy fine-tuned on these
    copies the habit (small-looking numbers in its head) without the skill, so its in-head answers are
    wrong: the mistake preference learning on its own trajectories can correct, since its tool-using
    trajectories of the same problems are right far more often.
    """
    rng = random.Random(seed)
    out = []
    for problem in make_problems(n, seed=seed, split="train"):
        trajectory = gold_trajectory(problem, prompt)
        if rng.random() < in_head_share(problem):
            # Worded unlike the tool's final action ("The answer is \\boxed{...}"), whose digits are copied
            # from the last output: the policy keeps the two habits apart.
            trajectory["messages"] = [trajectory["messages"][0],
                                      {"role": "assistant", "content": f"In my head: \\boxed{{{problem['answer']}}}."}]
            trajectory["in_head"] = True
        out.append(trajectory)
    return out


def self_rewarding_demonstrations(n: int, seed: int, prompt: str, *, wrong_share: float = 0.5,
                                  markers=None) -> list[dict[str, Any]]:
    """n demonstrations of self-rewarding correction (`mathagent.correction`), in the one-stream shape a
    trained model writes: the demonstrator answers with the tool, or, with probability `in_head_share`, in its
    head, where it is wrong `wrong_share` of the time (off by a slip of one digit place). Its verdicts are
    always right: "[VERIFY] correct" after a right answer; after a wrong one "[VERIFY] wrong", the revision cue,
    the solution with the tool, and "[VERIFY] correct". The `shape` field says which (correct, corrected)."""
    from mathagent.attempts import DEFAULT_MARKERS
    from mathagent.correction import demonstration

    markers = markers or DEFAULT_MARKERS
    rng = random.Random(seed)
    out = []
    for problem in make_problems(n, seed=seed, split="train"):
        gold = gold_trajectory(problem, prompt)
        first, revision = gold, None
        if rng.random() < in_head_share(problem):
            said = problem["answer"]
            if rng.random() < wrong_share:
                said = str(int(problem["answer"]) + rng.choice([-10, -1, 1, 10]))
            first = {**gold, "correct": said == problem["answer"], "messages": [
                gold["messages"][0], {"role": "assistant", "content": f"In my head: \\boxed{{{said}}}."}]}
            if not first["correct"]:
                revision = gold
        record = {**gold, "messages": demonstration(first, revision, markers),
                  "verdicts": {"correct": markers.correct, "wrong": markers.wrong},
                  "shape": "corrected" if revision is not None else "correct"}
        out.append(record)
    return out
