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


def hub_rows(dataset: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    """The rows of a Hugging Face hub data set (downloads on first use; needs the `datasets` package)."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise UserError(f"loading {dataset} from the hub needs the `datasets` package: pip install datasets") from e
    try:
        rows = load_dataset(dataset, config, split=split) if config else load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth, unknown split: the user's to fix, in one line
        raise UserError(f"cannot load {dataset} (split {split!r}) from the hub: {e}") from e
    for row in rows:
        yield dict(row)
