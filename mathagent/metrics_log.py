"""The metrics log of a training run: each optimizer step's metrics row, in OUTPUT_DIR/metrics.jsonl always,
and in the trackers of `report_to` (TensorBoard, wandb) with the same names and step numbers.

The recipe (`training.Recipe`) writes one row per step from the main process; a resumed run cuts the log
back to the steps of its checkpoint and writes the rest again, so a killed and resumed run's log is the
uninterrupted run's. The names of the policy objectives' metrics are TRL's (rewards/chosen, ...).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from mathagent.errors import UserError
from mathagent.records import write_atomic

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under OUTPUT_DIR
WANDB_RUN_ID = "wandb_run_id"  # under OUTPUT_DIR: the wandb run that a --resume continues
TRACKER_PACKAGES = {"tensorboard": "tensorboard (or: pip install 'mathagent[tensorboard]')", "wandb": "wandb"}


def report_targets(report_to: str) -> tuple[str, ...]:
    """The trackers named by `report_to`, as transformers reads its report_to: 'none' (the default), 'all'
    (every installed one), or a comma list of tensorboard and wandb. A named tracker whose package is not
    installed is a UserError, before any work."""
    import importlib.util

    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    if names == ["all"]:
        return tuple(t for t in TRACKERS if importlib.util.find_spec(t) is not None)
    unknown = [n for n in names if n not in TRACKERS]
    if not names or unknown:
        raise UserError(f"report_to {report_to!r}: choose none, all, or from {', '.join(TRACKERS)} "
                        "(a comma list)", options=("report_to",))
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"report_to {name}: the {name} package is not installed: pip install "
                            f"{TRACKER_PACKAGES[name]}", options=("report_to",))
    return tuple(dict.fromkeys(names))


class MetricsLog:
    """Where each optimizer step's metrics row goes: OUTPUT_DIR/metrics.jsonl, always, and the trackers of
    `report_to` with the same names and step numbers: TensorBoard event files in OUTPUT_DIR/tensorboard (offline,
    torch's SummaryWriter), a wandb run (WANDB_PROJECT, default 'mathagent'; files under OUTPUT_DIR/wandb).
    Only the main process opens one.

    A run that starts at `start_step` (a resumed one) keeps the rows of steps up to it and writes the rest
    again: metrics.jsonl is cut back to them, TensorBoard hides the events of later steps (purge_step), and
    wandb continues the same run (its id is kept in OUTPUT_DIR/wandb_run_id), where it ignores a step it
    already holds (wandb's steps only go up)."""

    def __init__(self, output_dir: Path, report_to: str, *, start_step: int, config: dict[str, Any]):
        targets = report_targets(report_to)
        self.path = output_dir / "metrics.jsonl"
        self.kept = read_metrics(self.path, start_step)
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        if "wandb" in targets:
            import wandb

            id_path = output_dir / WANDB_RUN_ID
            run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:12]
            id_path.write_text(run_id + "\n")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mathagent"), dir=str(output_dir),
                                    name=output_dir.name, id=run_id, resume="allow", config=config)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        # The trackers take numbers; a metric a step has no value for (None) is left out of that step.
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()  # a killed run's board holds what its metrics.jsonl holds
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", math.inf) <= up_to_step:
                rows.append(row)
    return rows

