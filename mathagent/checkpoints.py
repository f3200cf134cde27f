"""The checkpoints of a training run: OUTPUT_DIR/checkpoints/step-N, each complete or absent.

A checkpoint holds what accelerate saves (the model or adapter, the optimizer, the scheduler, the RNG state of
every process) and trainer_state.json (the step, the run's identity, its config); the data order follows from
the step (`batches.Plan`), so a resumed run continues exactly. Every process writes its part into one staging
directory (the same name on every rank), which the main process publishes onto step-N once it is complete:
a killed run leaves only complete checkpoints. The last CHECKPOINTS_KEPT are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mathagent.records import publish

CHECKPOINTS_KEPT = 2


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write the checkpoint of `step` (a collective: every process calls it) with `state` as its
    trainer_state.json; returns its directory."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    # Not records.staging_path: its random name would differ between the processes, which all write here.
    staging = root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        publish(staging, final)
        for old in checkpoints(output_dir)[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
