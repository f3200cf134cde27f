"""MATH (Hendrycks et al., 2021) and its 500-problem test subset MATH-500 as problem records.

A MATH row is `{"problem", "solution", "answer"?, "subject"|"type", "level", "unique_id"?}`. The record:

    {"id": unique_id, "question": problem, "answer": answer, "solution", "subject", "level", ...}

The original MATH release has no `answer` field: it is then the last \\boxed{} of the solution. Its `type`
becomes `subject` and its "Level 5" becomes the integer 5, as in MATH-500.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from mathagent.answers import extract_boxed
from mathagent.errors import UserError

HUB_DATASET = "HuggingFaceH4/MATH-500"


def to_problem(row: dict[str, Any], index: int, split: str = "test") -> dict[str, Any]:
    """The problem record of one MATH row (`index`, its position, names it when it has no unique_id)."""
    answer = row.get("answer")
    if answer is None:
        answer = extract_boxed(row.get("solution", ""))
    if answer is None:
        raise UserError(f"math/{split}/{index}: no 'answer' field and no \\boxed{{}} in the solution")
    record = {
        "id": str(row.get("unique_id", row.get("id", f"math/{split}/{index}"))),
        "question": row["problem"],
        "answer": str(answer),
    }
    extra = {k: v for k, v in row.items() if k not in ("problem", "answer", "unique_id", "id", "type")}
    if "type" in row and "subject" not in row:
        extra["subject"] = row["type"]
    level = extra.get("level")
    if isinstance(level, str):
        m = re.fullmatch(r"\s*Level\s+(\d+)\s*", level)
        if m:
            extra["level"] = int(m.group(1))
    return {**record, **extra}


def load_jsonl(path: str, split: str = "test") -> Iterator[dict[str, Any]]:
    """Problem records from a JSONL file of MATH rows."""
    from mathagent.records import read_records

    for index, row in enumerate(read_records(path, required=("problem",))):
        yield to_problem(row, index, split)


def load_hub(split: str = "test", dataset: str = HUB_DATASET) -> Iterator[dict[str, Any]]:
    """Problem records from the Hugging Face hub (default HuggingFaceH4/MATH-500, which has only `test`)."""
    from mathagent.tasks.hub import hub_rows

    for index, row in enumerate(hub_rows(dataset, None, split)):
        yield to_problem(row, index, split)
