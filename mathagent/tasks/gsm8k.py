"""GSM8K (Cobbe et al., 2021) as problem records.

A GSM8K row is `{"question", "answer"}` where `answer` is a worked solution with calculator notes
(`<<48/2=24>>`) ending in the line `#### N`. The problem record keeps that solution as `solution` and sets
`answer` to N, commas removed (`#### 1,600` -> "1600"):

    {"id": "gsm8k/test/0", "question": ..., "answer": "18", "solution": "Janet sells ... #### 18"}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mathagent.answers import extract_answer
from mathagent.errors import UserError

HUB_DATASET = "openai/gsm8k"
HUB_CONFIG = "main"


def final_answer(solution: str) -> str | None:
    """N of the solution's last "#### N" line (commas and '$' removed), None if there is none."""
    return extract_answer(solution, modes=("gsm8k",))


def to_problem(row: dict[str, Any], index: int, split: str = "test") -> dict[str, Any]:
    """The problem record of one GSM8K row (`index` is its position in the split: the id)."""
    solution = row["answer"]
    answer = final_answer(solution)
    if answer is None:
        raise UserError(f"gsm8k/{split}/{index}: the answer has no '#### N' line")
    extra = {k: v for k, v in row.items() if k not in ("question", "answer", "id")}
    return {
        "id": str(row.get("id", f"gsm8k/{split}/{index}")),
        "question": row["question"],
        "answer": answer,
        "solution": solution,
        **extra,
    }


def load_jsonl(path: str, split: str = "test") -> Iterator[dict[str, Any]]:
    """Problem records from a JSONL file of GSM8K rows."""
    from mathagent.records import read_records

    for index, row in enumerate(read_records(path, required=("question", "answer"))):
        yield to_problem(row, index, split)


def load_hub(split: str = "test", dataset: str = HUB_DATASET) -> Iterator[dict[str, Any]]:
    """Problem records from the Hugging Face hub (`openai/gsm8k`, config `main`)."""
    from mathagent.tasks.hub import hub_rows

    config = HUB_CONFIG if dataset == HUB_DATASET else None
    for index, row in enumerate(hub_rows(dataset, config, split)):
        yield to_problem(row, index, split)
