"""The options of a training run (`TrainConfig`), each checked once, where the config is built.

Every training command (train-mdpo, train-sft, train-prm) makes one `TrainConfig` and hands it, with its
objective (`mathagent.objectives`), to the recipe (`training.train`). The options an objective alone reads
(`loss`, `beta`, `labels`, ...) are checked by that objective when it is built; the ones of the run are checked
here. An error names the option by its field name (`UserError.options`): the CLI writes its flag.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from mathagent.chat import DEFAULT_MAX_LENGTH
from mathagent.errors import UserError
from mathagent.metrics_log import report_targets

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class TrainConfig:
    model: str
    output_dir: str
    ref_model: str | None = None  # None: the starting policy
    loss: str = "sigmoid"
    beta: float = 0.1  # the paper's eta: the KL coefficient
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    scale_rewards: str = "group"  # grpo: divide the advantages by the group's std (group) or not (none)
    epsilon: float = 0.2  # grpo: the ratio's clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float | None = None  # grpo: the clip range above 1 (DAPO's clip-higher); None: epsilon
    kl_beta: float = 0.0  # grpo: the weight of the k3 KL to the reference (0: no reference pass)
    max_completion_length: int | None = None  # grpo dr-grpo: the length constant (None: the longest actions)
    labels: str = "hard"  # prm: hard (cross-entropy on the label token) or soft (BCE of P('+') against Q-hat)
    steps_mode: str = "turns"  # prm: what a step of a trajectory is (labeling.STEP_MODES)
    learning_rate: float = 5e-7
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    batch_size: int = 8  # examples per optimizer step, over all processes and micro-batches
    grad_accum: int = 1
    max_steps: int | None = None  # overrides epochs
    epochs: float = 1.0  # may be fractional: ceil(epochs x steps per epoch) steps
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    merge_lora: bool = False
    mask_observations: bool = True
    resume: bool = False
    seed: int = 0
    max_length: int = DEFAULT_MAX_LENGTH  # longer examples are dropped (counted and reported), never cut
    gradient_checkpointing: bool = False
    save_every: int = 0  # 0: no intermediate checkpoints
    precision: str = "auto"
    ref_batch_size: int | None = None  # sequences per reference forward pass (default: 2 x micro-batch)
    report_to: str = "none"  # trackers beside metrics.jsonl: none, all, or a comma list (see report_targets)

    def __post_init__(self) -> None:
        """Refuse impossible options with a `UserError` naming the option, before any work."""
        if self.lr_scheduler not in SCHEDULERS:
            raise UserError(f"lr_scheduler {self.lr_scheduler!r}: choose from {', '.join(SCHEDULERS)}",
                            options=("lr_scheduler",))
        if self.precision not in PRECISIONS:
            raise UserError(f"precision {self.precision!r}: choose from {', '.join(PRECISIONS)}",
                            options=("precision",))
        if not (_finite(self.beta) and self.beta > 0):
            raise UserError(f"beta {self.beta}: must be a positive number", options=("beta",))
        if not (_finite(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise UserError(f"label_smoothing {self.label_smoothing}: must be in [0, 0.5)",
                            options=("label_smoothing",))
        if not (_finite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"learning_rate {self.learning_rate}: must be a positive number",
                            options=("learning_rate",))
        if not (_finite(self.epochs) and self.epochs > 0):
            raise UserError(f"epochs {self.epochs}: must be a positive number", options=("epochs",))
        for name in ("nll_weight", "weight_decay", "max_grad_norm", "desirable_weight", "undesirable_weight",
                     "epsilon", "kl_beta"):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                raise UserError(f"{name} {value}: must be a number >= 0", options=(name,))
        for name, low in (("batch_size", 1), ("grad_accum", 1), ("lora_rank", 1), ("lora_alpha", 1),
                          ("max_length", 2), ("warmup_steps", 0), ("save_every", 0)):
            value = getattr(self, name)
            if value < low:
                raise UserError(f"{name} {value}: must be at least {low}", options=(name,))
        if self.epsilon_high is not None and not (_finite(self.epsilon_high) and self.epsilon_high >= 0):
            raise UserError(f"epsilon_high {self.epsilon_high}: must be a number >= 0", options=("epsilon_high",))
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise UserError(f"max_completion_length {self.max_completion_length}: must be at least 1",
                            options=("max_completion_length",))
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max_steps {self.max_steps}: must be at least 1", options=("max_steps",))
        if self.merge_lora and not self.lora:
            raise UserError("merge_lora needs lora", options=("merge_lora", "lora"))
        report_targets(self.report_to)
        from mathagent.tiny import check_model

        for name in ("model", "ref_model"):
            try:
                check_model(name, getattr(self, name), or_adapter=True)
            except UserError as e:
                raise UserError(str(e), options=(name,)) from None
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise UserError(f"output_dir {self.output_dir}: is a file, not a directory", options=("output_dir",))
