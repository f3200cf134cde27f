"""Rows of a data set on the Hugging Face hub, for the task loaders (`tasks.gsm8k`, `tasks.math`).

`datasets` is imported only here and only when a loader reads from the hub; a local JSONL file needs neither.
Whatever stops the download (no `datasets`, the network, authentication, an unknown split) is the user's to
fix, and becomes one `UserError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mathagent.errors import UserError


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
