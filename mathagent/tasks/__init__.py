"""Data sets as problem records: the problems x the agent is asked to solve, with reference answers a*.

Every task turns its rows into the record `{"id", "question", "answer", ...}` that rollout reads; the fields
a task does not rename (subject, level, the worked solution) are kept. Rows come from a local JSONL file or
from the Hugging Face hub by name (`datasets` is imported only then).

    load_problems("gsm8k", "data/gsm8k_test.jsonl")     # a local file
    load_problems("math", split="test")                 # HuggingFaceH4/MATH-500 from the hub
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from mathagent.errors import UserError
from mathagent.tasks import gsm8k, math

TASKS = {"gsm8k": gsm8k, "math": math}


def load_problems(
    task: str,
    path: str | None = None,
    *,
    split: str = "test",
    dataset: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The problem records of `task` ("gsm8k" or "math").

    From `path` (a JSONL file of the data set's own rows, '-' for stdin) when given, else from the hub
    (`dataset` overrides the task's default hub name). `limit` keeps the first N.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    module = TASKS[task]
    if path is not None:
        problems = module.load_jsonl(path, split=split)
    else:
        problems = module.load_hub(split=split, dataset=dataset or module.HUB_DATASET)
    return list(_take(problems, limit))


def _take(records: Iterable[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    for i, record in enumerate(records):
        if limit is not None and i >= limit:
            return
        yield record
