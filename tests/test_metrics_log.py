"""The metrics log of a training run: the trackers of report_to (the rows themselves: tests/test_training.py)."""

import sys

import pytest

from mathagent import metrics_log
from mathagent.errors import UserError


def test_report_to_reads_like_transformers_report_to_and_refuses_what_it_cannot_do(monkeypatch):
    assert metrics_log.report_targets("none") == ()
    assert metrics_log.report_targets("tensorboard") == ("tensorboard",)
    assert metrics_log.report_targets(" tensorboard,tensorboard ") == ("tensorboard",)
    assert "tensorboard" in metrics_log.report_targets("all")  # every installed tracker
    for bogus in ("bogus", "tensorboard,bogus", "", "none,all"):
        with pytest.raises(UserError, match="choose none, all, or from tensorboard, wandb"):
            metrics_log.report_targets(bogus)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where wandb is not installed
    with pytest.raises(UserError, match="the wandb package is not installed: pip install wandb"):
        metrics_log.report_targets("tensorboard,wandb")
    assert metrics_log.report_targets("all") == ("tensorboard",)
