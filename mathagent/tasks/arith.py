"""The synthetic task family of the demo and the tests: small arithmetic word problems solved with code.

Each problem has a gold tool-integrated solution (a trajectory of 2-3 actions: compute with python, read the
output, answer in \\boxed{}), which warms up the tiny model so that it writes the agent's format on its own
(see `mathagent.tiny`). The problems are easy for a tool user and hard for a 2-layer model without one: the
answer must be copied from the observation, so the agent only gets it right by using its tool.
"""

from __future__ import annotations

import random
from typing import Any

from mathagent.records import format_observation

NAMES = ["apples", "books", "coins", "pens", "stamps", "marbles"]


def make_problem(rng: random.Random, index: int) -> dict[str, Any]:
    """One problem: `kind` is "one-step" (a op b) or "two-step" ((a + b) * c, state carried across cells)."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    if rng.random() < 0.5:
        op = rng.choice(["+", "-", "*"])
        question = f"What is {a} {op} {b}?"
        answer = eval(f"{a} {op} {b}")  # noqa: S307 - our own literal arithmetic
        kind = "one-step"
    else:
        thing = rng.choice(NAMES)
        question = f"Ann has {a} {thing} and Bob has {b}. They pack them all {c} times over. How many {thing} is that?"
        answer = (a + b) * c
        kind = "two-step"
    return {"id": f"arith-{index}", "question": question, "answer": str(answer), "kind": kind, "a": a, "b": b, "c": c}


def make_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_problem(rng, i) for i in range(n)]


def gold_actions(problem: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The solution as (action, output of its code or None) pairs."""
    a, b, c = problem["a"], problem["b"], problem["c"]
    if problem["kind"] == "one-step":
        expr = problem["question"][len("What is ") : -1]
        return [
            (f"Let me compute it.\n```python\nprint({expr})\n```", str(problem["answer"])),
            (f"The answer is \\boxed{{{problem['answer']}}}.", None),
        ]
    total = a + b
    return [
        (f"First the total.\n```python\ntotal = {a} + {b}\nprint(total)\n```", str(total)),
        (f"Now multiply.\n```python\nprint(total * {c})\n```", str(problem["answer"])),
        (f"The answer is \\boxed{{{problem['answer']}}}.", None),
    ]


def gold_messages(problem: dict[str, Any], prompt: str, observation_role: str = "user") -> list[dict[str, str]]:
    """The whole gold conversation under a prompt template (see mathagent.agent.PROMPTS)."""
    messages = [{"role": "user", "content": prompt.format(question=problem["question"])}]
    for action, output in gold_actions(problem):
        messages.append({"role": "assistant", "content": action})
        if output is not None:
            messages.append({"role": observation_role, "content": format_observation(output)})
    return messages
