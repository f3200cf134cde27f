"""The one training recipe: every objective (M-DPO / IPO / hinge, M-KTO, SFT, the PRM) through transformers,
peft and accelerate.

`train` runs a whole training for an `Objective`, the part that differs between them: how a record becomes
training examples (token ids and masks from `chat.tokenize_conversation`), whether it needs a reference pass,
and how a micro-batch's forward pass becomes its share of the step's loss and its metrics. The objectives of
the policy are below (`PairObjective`, `KTOObjective`, `SFTObjective`, their losses the pure functions of
`losses`); the PRM's is `prm.PRMObjective`. Each says at its top where it departs from its paper.

The recipe sets up in named phases, then runs a short loop (see `Recipe`):

1. Run: the accelerator (DDP, FSDP2 or one process), precision, the output directory.
2. Data: the records encoded by the objective (observations masked unless `mask_observations=False`, the
   single-turn baseline), longer ones than `max_length` dropped whole and counted, never cut; the plan: epoch
   e is a permutation seeded by (seed, e), optimizer step s takes the next `batch_size` examples of its epoch,
   split evenly across processes and then into `grad_accum` micro-batches. The order is a pure function of
   (seed, step), so a resumed run sees exactly the examples it would have.
3. Checkpoints: what to resume from (OUTPUT_DIR/checkpoints/step-N), or the finished run.
4. The reference pass (M-DPO, M-KTO): log pi_ref of every sequence the plan will use, computed once BEFORE
   training, with `ref_model` (default: the starting policy itself, before any update or LoRA adapter), so
   training holds a single model in memory. Cached in OUTPUT_DIR/reference_logps.json.
5. Model: the policy, LoRA, gradient checkpointing.
6. Optimizer and schedule: AdamW and transformers' LR schedule, prepared by accelerate, state loaded on resume.
7. The loop: per micro-batch the objective's loss, one backward pass; per step gradient clipping, AdamW and the
   LR schedule. Each step's metrics (TRL's names for the policy objectives: rewards/chosen = mean of
   beta * (log pi - log pi_ref) over the step's chosen trajectories, computed in that step's forward pass
   before its update, and so on) go to OUTPUT_DIR/metrics.jsonl, and to TensorBoard or wandb with --report-to
   (`MetricsLog`). Every `save_every` steps a checkpoint (model or adapter, optimizer, scheduler, RNG states of
   every process, the step; the data order follows from the step), written beside and renamed, so a killed run
   leaves only complete ones. `resume=True` continues from the last.
8. Save what vLLM (or score-prm) loads: the full model, or the LoRA adapter (vLLM's --adapter), or the merged
   model; and the objective's own files (the PRM's prm.json).

Multi-process under `torchrun` / `accelerate launch` via accelerate: DDP, and FSDP2 with
configs/accelerate/fsdp.yaml (on CPUs too, see `make_accelerator`); the DeepSpeed config is for CUDA GPUs and
untested (docs/training.md). Reductions are exact across micro-batches and processes: an objective's loss is a
sum over the micro-batch's examples divided by the step's totals (`StepTotals`: its examples, or the action
tokens or labels it averages over), so the loss of a step is the same however it is split.

Device and precision are chosen in `choose_precision`: bf16 mixed precision on a GPU that has it (fp32 master
weights; LoRA's frozen base weights in bf16), fp32 everywhere else.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mathagent import losses
from mathagent.chat import DEFAULT_MAX_LENGTH, tokenize_conversation
from mathagent.errors import UserError
from mathagent.records import check_messages, check_prompt, first_action

OBJECTIVES = ("pairs", "kto", "sft", "prm")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
CHECKPOINTS_KEPT = 2


@dataclass
class TrainConfig:
    model: str
    output_dir: str
    objective: str = "pairs"  # pairs (M-DPO, IPO, hinge), kto (M-KTO), sft or prm
    ref_model: str | None = None  # None: the starting policy
    loss: str = "sigmoid"
    beta: float = 0.1  # the paper's eta: the KL coefficient
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
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

    def check(self) -> None:
        """Refuse impossible options with a `UserError` naming the option, before any work."""
        def finite(x: float) -> bool:
            return isinstance(x, (int, float)) and math.isfinite(x)

        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}")
        if self.objective == "pairs" and self.loss not in losses.PAIR_LOSSES:
            raise UserError(f"--loss {self.loss!r}: choose from {', '.join(losses.LOSSES)}")
        if self.objective == "kto" and self.nll_weight:
            raise UserError("--nll-weight applies to the pair losses (sigmoid, ipo, hinge), not kto")
        if self.objective == "prm":
            from mathagent import labeling, prm

            if self.labels not in prm.LABEL_KINDS:
                raise UserError(f"--labels {self.labels!r}: choose from {', '.join(prm.LABEL_KINDS)}")
            if self.steps_mode not in labeling.STEP_MODES:
                raise UserError(f"--steps {self.steps_mode!r}: choose from {', '.join(labeling.STEP_MODES)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise UserError(f"--lr-scheduler {self.lr_scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if not (finite(self.beta) and self.beta > 0):
            raise UserError(f"--beta {self.beta}: must be a positive number")
        if not (finite(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise UserError(f"--label-smoothing {self.label_smoothing}: must be in [0, 0.5)")
        if not (finite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--lr {self.learning_rate}: must be a positive number")
        if not (finite(self.epochs) and self.epochs > 0):
            raise UserError(f"--epochs {self.epochs}: must be a positive number")
        for name, value in (("--nll-weight", self.nll_weight), ("--weight-decay", self.weight_decay),
                            ("--max-grad-norm", self.max_grad_norm), ("--desirable-weight", self.desirable_weight),
                            ("--undesirable-weight", self.undesirable_weight)):
            if not (finite(value) and value >= 0):
                raise UserError(f"{name} {value}: must be a number >= 0")
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--grad-accum", self.grad_accum, 1),
                                 ("--lora-rank", self.lora_rank, 1), ("--lora-alpha", self.lora_alpha, 1),
                                 ("--max-length", self.max_length, 2), ("--warmup-steps", self.warmup_steps, 0),
                                 ("--save-every", self.save_every, 0)):
            if value < low:
                raise UserError(f"{name} {value}: must be at least {low}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps {self.max_steps}: must be at least 1")
        if self.merge_lora and not self.lora:
            raise UserError("--merge-lora needs --lora")
        report_targets(self.report_to)
        from mathagent.tiny import check_model

        check_model("--model", self.model)
        check_model("--ref-model", self.ref_model)
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise UserError(f"--output-dir {self.output_dir}: is a file, not a directory")


@dataclass
class Encoded:
    """One tokenized conversation: ids and action mask (1 = a token the loss reads: the agent's actions, or a
    PRM's labels), and, after the reference pass, log pi_ref of its actions."""

    input_ids: list[int]
    action_mask: list[int]
    ref_logp: float | None = None

    @property
    def actions(self) -> int:
        return sum(self.action_mask)


@dataclass
class Example:
    """A training example: a pair (chosen, rejected), a KTO completion with its label, an SFT trajectory, or a
    PRM chat with its step labels."""

    id: str
    sequences: list[Encoded]  # pairs: [chosen, rejected]; the others: [conversation]
    # What the example adds to the per-token denominator of its step (`StepTotals.targets`): SFT's action
    # tokens, the chosen action tokens of the pair NLL term, the PRM's labels.
    targets: int = 0
    desirable: bool = True  # kto
    prompt: list[dict[str, str]] = field(default_factory=list)  # kto: for the mismatched KL pairs
    completion: list[dict[str, str]] = field(default_factory=list)
    plus: list[bool] = field(default_factory=list)  # prm: the hard labels, True for '+'
    q: list[float] = field(default_factory=list)  # prm: the soft labels (Q-hat)


# ---- records ---------------------------------------------------------------------------------------------


def check_pair(record: dict[str, Any]) -> str | None:
    """What train-mdpo reads: {"id", "prompt", "chosen", "rejected"} (make-pairs' default format)."""
    return (check_prompt(record.get("prompt"))
            or check_messages(record.get("chosen"), "chosen", starts_with_action=True)
            or check_messages(record.get("rejected"), "rejected", starts_with_action=True))


def check_kto(record: dict[str, Any]) -> str | None:
    """M-KTO reads {"id", "prompt", "completion", "label": bool}, or pairs (each gives two examples)."""
    if "chosen" in record:
        return check_pair(record)
    if not isinstance(record.get("label"), bool):
        return "field 'label' must be true or false"
    return (check_prompt(record.get("prompt"))
            or check_messages(record.get("completion"), "completion", starts_with_action=True))


def check_trajectory(record: dict[str, Any]) -> str | None:
    """SFT reads trajectories {"id", "messages"} with at least one action."""
    problem = check_messages(record.get("messages"))
    if problem is None and first_action(record["messages"]) is None:
        return "field 'messages' has no assistant message (no action to learn)"
    return problem


@dataclass
class EncodeReport:
    too_long: int = 0  # examples dropped because a sequence of theirs is longer than max_length
    no_actions: int = 0  # sequences with no action token (PRM: records with no step label, left out)
    straddling: int = 0  # tokens left out of actions because they also hold template text (see chat.py)


def encode_conversation(tokenizer, messages: list[dict[str, str]], config: TrainConfig,
                        report: EncodeReport) -> Encoded:
    """A conversation's ids and action mask (`chat.tokenize_conversation`), its oddities counted in `report`."""
    conv = tokenize_conversation(tokenizer, messages, mask_observations=config.mask_observations)
    report.straddling += conv.straddling
    if not any(conv.action_mask[1:]):
        report.no_actions += 1
    return Encoded(conv.input_ids, conv.action_mask)


def encode_records(
    tokenizer, records: Sequence[dict[str, Any]], config: TrainConfig
) -> tuple[list[Example], EncodeReport]:
    """Tokenize the records for the objective; a record that the template cannot render names itself.

    An example with a sequence longer than `max_length` is dropped whole and counted, never cut: cutting
    the end of a trajectory removes its answer, and a pair whose answers are gone teaches the opposite of
    its label (make-pairs --max-length drops the same pairs earlier, with the same default)."""
    return make_objective(config, tokenizer).encode_records(records)


# ---- the objectives ----------------------------------------------------------------------------------------


@dataclass
class StepTotals:
    """The denominators of an optimizer step's loss, over all its micro-batches and processes."""

    examples: int  # --batch-size
    targets: int  # the tokens or labels its per-token terms average over (sum of `Example.targets`, at least 1)


@dataclass
class MicroBatch:
    """What an objective's loss sees of one micro-batch."""

    indices: list[int]  # into the run's examples
    examples: list[Example]
    totals: StepTotals  # of the whole step
    device: Any
    pad_id: int
    mean_over_processes: Callable[[Any], Any] | None  # M-KTO's KL baseline (None in one process)
    same_passes: Callable[[int], int] | None  # see `forward_groups` (None in one process)


class Objective:
    """What `train` asks of a training objective.

    - `encode(record, report)`: the record's training examples (token ids and masks from the chat template).
    - `needs_reference`: whether log pi_ref of its sequences is computed, once, before training.
    - `loss(model, batch)`: the micro-batch's forward pass and its share of the step's loss, a sum over its
      examples divided by the step's totals (so the step's loss is exact however it is split across
      micro-batches and processes), with the micro-batch's metric sums ('tokens': its non-pad tokens).
    - `metrics(sums, totals)`: the step's metrics row from the sums of all its micro-batches and processes.
    """

    needs_reference = False

    def __init__(self, config: TrainConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        raise NotImplementedError

    def encode_records(self, records: Sequence[dict[str, Any]]) -> tuple[list[Example], EncodeReport]:
        """The examples of all records, those with a sequence longer than `max_length` dropped and counted."""
        report = EncodeReport()
        examples: list[Example] = []
        for record in records:
            try:
                encoded = self.encode(record, report)
            except UserError as e:
                raise UserError(f"record {record['id']}: {e}") from None
            for example in encoded:
                if any(len(s.input_ids) > self.config.max_length for s in example.sequences):
                    report.too_long += 1
                else:
                    examples.append(example)
        return examples, report

    def check_plan(self, plan: Plan) -> None:
        """Refuse, with a `UserError`, a split of the steps that the objective cannot train on."""

    def sequences(self, examples: list[Example], plan: Plan) -> list[Encoded]:
        """Every sequence the run reads, the examples' first: the data's fingerprint, and the reference pass."""
        return [s for e in examples for s in e.sequences]

    def identity(self, examples: list[Example]) -> dict[str, Any]:
        """What else a checkpoint must share with the run that resumes it."""
        return {}

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], totals: StepTotals) -> dict[str, Any]:
        return {}

    def save(self, output_dir: Path, model_path: str, steps: int) -> None:
        """Write the objective's own files beside the saved model (on the main process)."""


def _reference(batch_sequences: list[Encoded], like) -> Any:
    import torch

    return torch.tensor([s.ref_logp for s in batch_sequences], device=like.device, dtype=like.dtype)


class PairObjective(Objective):
    """M-DPO (Xiong et al. 2024, "Building Math Agents with Multi-Turn Iterative Preference Learning"), and the
    IPO and hinge losses on the same summed action log-ratios (`losses.pair_loss`).

    Departures from the paper: `--label-smoothing` (conservative DPO) and `--nll-weight` (an NLL term on the
    chosen actions, averaged over the step's chosen action tokens, as in RPO) are additions, off by default;
    IPO's margin is on summed log-ratios, as in the IPO paper (TRL averages them per token); pi_ref's
    log-probs are computed once before training, not in each step (the same values: pi_ref is fixed);
    dropout is off in both passes (as TRL does).
    """

    needs_reference = True

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        chosen = encode_conversation(self.tokenizer, record["prompt"] + record["chosen"], self.config, report)
        rejected = encode_conversation(self.tokenizer, record["prompt"] + record["rejected"], self.config, report)
        # the NLL term's tokens: the chosen actions that have a token before them
        return [Example(record["id"], [chosen, rejected], targets=chosen.actions - chosen.action_mask[0])]

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        config = self.config
        sequences = [e.sequences[0] for e in batch.examples] + [e.sequences[1] for e in batch.examples]
        logps, _, tokens = sequence_logps(model, sequences, batch.pad_id, batch.device, batch.same_passes)
        refs = _reference(sequences, logps)
        m = len(batch.examples)
        pc, pr, rc, rr = logps[:m], logps[m:], refs[:m], refs[m:]
        ell = losses.pair_loss(pc, pr, rc, rr, beta=config.beta, loss=config.loss,
                               label_smoothing=config.label_smoothing)
        loss = ell.sum() / batch.totals.examples
        nll = losses.nll_loss(pc, batch.totals.targets)
        if config.nll_weight:
            loss = loss + config.nll_weight * nll
        chosen, rejected = losses.rewards(pc, rc, config.beta), losses.rewards(pr, rr, config.beta)
        return loss, {"tokens": tokens, "nll": nll.detach(), "rewards/chosen": chosen.sum(),
                      "rewards/rejected": rejected.sum(), "rewards/accuracies": (chosen > rejected).sum(),
                      "rewards/margins": (chosen - rejected).sum(), "logps/chosen": pc.detach().sum(),
                      "logps/rejected": pr.detach().sum()}

    def metrics(self, sums: dict[str, float], totals: StepTotals) -> dict[str, Any]:
        row: dict[str, Any] = {"nll": sums["nll"]} if self.config.nll_weight else {}
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected"):
            row[name] = sums[name] / totals.examples
        return row


class KTOObjective(Objective):
    """M-KTO (Xiong et al. 2024): KTO (Ethayarajh et al. 2024) on the summed action log-ratios of labelled
    trajectories (`losses.kto_loss`); a pair record gives two examples, its chosen desirable.

    Departures from the paper: the KL baseline z0 is estimated in each micro-batch from mismatched (prompt,
    completion) pairs that never share a prompt (`kl_partners`; KTO's shifts the completions of the batch by
    one), averaged over the processes and clamped at 0 once, after that mean; its pi_ref log-probs are part of
    the one reference pass; dropout is off.
    """

    needs_reference = True

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        units = ([(record["chosen"], True), (record["rejected"], False)] if "chosen" in record
                 else [(record["completion"], record["label"])])
        return [Example(record["id"],
                        [encode_conversation(self.tokenizer, record["prompt"] + completion, self.config, report)],
                        desirable=label, prompt=record["prompt"], completion=completion)
                for completion, label in units]

    def check_plan(self, plan: Plan) -> None:
        import torch

        if plan.micro_batch < 2:
            losses.kl_baseline(torch.zeros(plan.micro_batch), torch.zeros(plan.micro_batch))  # raises the UserError

    def sequences(self, examples: list[Example], plan: Plan) -> list[Encoded]:
        """The examples' sequences, then the mismatched KL pairs of every micro-batch of the plan."""
        sequences = super().sequences(examples, plan)
        self.prompt_keys = [json.dumps(e.prompt, sort_keys=True) for e in examples]
        self.partners: dict[tuple[int, int], Encoded] = {}
        for step in range(plan.total_steps):
            for per_rank in plan.step(step):
                for micro in per_rank:
                    for i, j in kl_partners(micro, self.prompt_keys):
                        if (i, j) not in self.partners:
                            self.partners[i, j] = encode_conversation(
                                self.tokenizer, examples[i].prompt + examples[j].completion, self.config,
                                EncodeReport())
                            sequences.append(self.partners[i, j])
        return sequences

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        import torch

        config = self.config
        sequences = [e.sequences[0] for e in batch.examples]
        logps, _, tokens = sequence_logps(model, sequences, batch.pad_id, batch.device, batch.same_passes)
        refs = _reference(sequences, logps)
        partners = [self.partners[p] for p in kl_partners(batch.indices, self.prompt_keys)]
        with torch.no_grad():
            kl_logps, _, _ = sequence_logps(model, partners, batch.pad_id, batch.device, batch.same_passes)
        kl = losses.kl_baseline(kl_logps, _reference(partners, kl_logps), batch.mean_over_processes)
        desirable = torch.tensor([e.desirable for e in batch.examples], device=batch.device)
        ell = losses.kto_loss(logps, refs, desirable, kl, beta=config.beta, desirable_weight=config.desirable_weight,
                              undesirable_weight=config.undesirable_weight)
        reward = losses.rewards(logps, refs, config.beta)
        zero = torch.zeros_like(reward)
        return ell.sum() / batch.totals.examples, {
            "tokens": tokens, "desirable": desirable.sum(), "kl": kl.detach(), "micro_batches": 1,
            "rewards/chosen": torch.where(desirable, reward, zero).sum(),
            "rewards/rejected": torch.where(desirable, zero, reward).sum()}

    def metrics(self, sums: dict[str, float], totals: StepTotals) -> dict[str, Any]:
        desirable, undesirable = sums["desirable"], totals.examples - sums["desirable"]
        chosen = sums["rewards/chosen"] / desirable if desirable else None
        rejected = sums["rewards/rejected"] / undesirable if undesirable else None
        return {"rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected if chosen is not None and rejected is not None else None,
                "kl": sums["kl"] / sums["micro_batches"]}


class SFTObjective(Objective):
    """Supervised fine-tuning on trajectories: the negative log-likelihood of the action tokens
    (`losses.nll_loss`), observations masked as in M-DPO.

    Departures from plain SFT: the loss is the mean over the step's action tokens (all its trajectories
    together, as a token-level mean), not a mean of per-trajectory means; nothing outside the actions
    (prompt, observations, template scaffolding) is learned unless `--no-mask-observations`.
    """

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        sequence = encode_conversation(self.tokenizer, record["messages"], self.config, report)
        return [Example(record["id"], [sequence], targets=sequence.actions - sequence.action_mask[0])]

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        logps, _, tokens = sequence_logps(model, [e.sequences[0] for e in batch.examples], batch.pad_id,
                                          batch.device, batch.same_passes)
        return losses.nll_loss(logps, batch.totals.targets), {"tokens": tokens}


def make_objective(config: TrainConfig, tokenizer) -> Objective:
    """The objective of `config.objective`, for this tokenizer."""
    if config.objective == "prm":
        from mathagent.prm import PRMObjective

        return PRMObjective(config, tokenizer)
    if config.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {config.objective!r}")
    return {"pairs": PairObjective, "kto": KTOObjective, "sft": SFTObjective}[config.objective](config, tokenizer)


# ---- the plan: which examples each step, process and micro-batch takes ------------------------------------


@dataclass
class Plan:
    n_examples: int
    batch_size: int
    grad_accum: int
    world: int
    seed: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.batch_size

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world * self.grad_accum)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n_examples))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def step(self, step: int) -> list[list[list[int]]]:
        """Example indices of optimizer step `step` (0-based): [process][micro-batch][example]."""
        epoch, k = divmod(step, self.steps_per_epoch)
        chosen = self._order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        per_rank = self.batch_size // self.world
        m = self.micro_batch
        return [[chosen[r * per_rank + a * m : r * per_rank + (a + 1) * m] for a in range(self.grad_accum)]
                for r in range(self.world)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def make_plan(n_examples: int, config: TrainConfig, world: int) -> Plan:
    if config.batch_size < 1 or config.grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be at least 1")
    if config.batch_size % (world * config.grad_accum):
        raise UserError(
            f"--batch-size {config.batch_size} must be a multiple of --grad-accum ({config.grad_accum}) times the "
            f"number of processes ({world})"
        )
    if n_examples < config.batch_size:
        raise UserError(f"{n_examples} training examples, fewer than --batch-size {config.batch_size}")
    plan = Plan(n_examples, config.batch_size, config.grad_accum, world, config.seed, 0)
    # round() first: 0.3 x 10 is 3.0000000000000004 in floating point, which is 3 steps, not 4
    plan.total_steps = config.max_steps or math.ceil(round(config.epochs * plan.steps_per_epoch, 6))
    if plan.total_steps < 1:
        raise UserError("nothing to train: --max-steps and --epochs give 0 steps")
    return plan


def kl_partners(micro: list[int], prompts: Sequence[str]) -> list[tuple[int, int]]:
    """M-KTO's mismatched pairs of a micro-batch: (i, j), the prompt of example i with the completion of
    example j, where j never has i's prompt (`prompts[k]` is example k's prompt, as a key). j is the nearest
    example before i in the micro-batch (cyclically) with another prompt; when every example of the micro-batch
    shares i's prompt (two completions of one problem), the next example after i in the data that has another."""
    out = []
    n = len(prompts)
    for position, i in enumerate(micro):
        others = (micro[position - d] for d in range(1, len(micro)))
        j = next((k for k in others if prompts[k] != prompts[i]), None)
        if j is None:
            j = next((k % n for k in range(i + 1, i + n) if prompts[k % n] != prompts[i]), None)
        if j is None:
            raise UserError("--loss kto needs at least two different prompts: its KL baseline pairs a prompt with "
                            "the completion of another")
        out.append((i, j))
    return out


# ---- models, precision, batches ----------------------------------------------------------------------------


def choose_precision(requested: str = "auto") -> str:
    """'bf16' (mixed precision) on a CUDA GPU that supports it, else 'fp32'; an explicit choice is kept."""
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r}: choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_model(path: str, *, frozen_bf16: bool = False):
    """A causal LM in fp32 (trained weights stay fp32 under mixed precision), or bf16 where it stays frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    except OSError as e:
        raise UserError(f"--model {path}: cannot load: {e}") from None
    model.config.use_cache = False
    return model


def disable_dropout(model) -> None:
    """Dropout off (as TRL's DPO does by default): the policy's and the reference's log-probs must agree at
    step 0, and the reference pass runs without it."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def collate(sequences: Sequence[Encoded], pad_id: int):
    """Right-padded input_ids, attention_mask and action_mask tensors."""
    import torch

    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    actions = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        attention[row, :n] = 1
        actions[row, :n] = torch.tensor(s.action_mask)
    return {"input_ids": ids, "attention_mask": attention, "action_mask": actions}


# A micro-batch is run as groups of similar length: a sequence joins the current group (longest first) while
# it is at least this fraction of the group's longest. Trajectories vary in length several-fold, and padding
# them all to the longest costs more than the extra forward passes (half the time on the benchmark's pairs).
LENGTH_GROUP_RATIO = 0.8


def length_groups(lengths: Sequence[int], ratio: float = LENGTH_GROUP_RATIO) -> list[list[int]]:
    """Indices grouped by length, longest first; within a group every length is >= ratio x the longest."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not groups or lengths[i] < ratio * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups


def forward_groups(lengths: Sequence[int], same_passes: Callable[[int], int] | None = None) -> list[list[int]]:
    """The forward passes of a micro-batch: its `length_groups`, and where `same_passes` is given (several
    processes) the largest of them halved until this process runs as many passes as the process with the most.

    Under DDP and FSDP each forward pass of the wrapped model is a collective (DDP broadcasts the buffers before
    it, FSDP gathers the weights), so processes that ran different numbers of them would wait for each other
    forever. `same_passes(n)` is the largest n over the processes (an all-reduce); every process has as many
    sequences, so each can split its groups that far."""
    groups = length_groups(lengths)
    if same_passes is not None:
        target = same_passes(len(groups))
        while len(groups) < target:
            largest = max(range(len(groups)), key=lambda g: len(groups[g]))
            if len(groups[largest]) < 2:
                raise RuntimeError(f"{len(lengths)} sequences cannot make {target} forward passes")
            group = groups.pop(largest)
            groups[largest:largest] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return groups


def sequence_logps(model, sequences: Sequence[Encoded], pad_id: int, device,
                   same_passes: Callable[[int], int] | None = None):
    """Summed action log-probs [B] (with grad if enabled), action-token counts [B] and non-pad tokens.

    One forward pass per length group (see `length_groups`, and `forward_groups` for `same_passes`); the
    results are in the order of `sequences`, and a single backward pass through them all follows.
    """
    import torch

    logps: list[Any] = [None] * len(sequences)
    counts: list[Any] = [None] * len(sequences)
    for group in forward_groups([len(s.input_ids) for s in sequences], same_passes):
        batch = {k: v.to(device) for k, v in collate([sequences[i] for i in group], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        group_logps, group_counts = losses.action_logps(logits, batch["input_ids"], batch["action_mask"])
        for row, i in enumerate(group):
            logps[i], counts[i] = group_logps[row], group_counts[row]
    return torch.stack(logps), torch.stack(counts), sum(len(s.input_ids) for s in sequences)


def reference_logps(model, sequences: Sequence[Encoded], *, batch_size: int, pad_id: int, device, autocast,
                    indices: Sequence[int]) -> dict[int, float]:
    """log pi_ref of `sequences[i]` for each i in `indices`, longest first (less padding)."""
    import torch

    todo = sorted(indices, key=lambda i: -len(sequences[i].input_ids))
    out: dict[int, float] = {}
    model.eval()
    with torch.no_grad(), autocast():
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            logps, _, _ = sequence_logps(model, [sequences[i] for i in chunk], pad_id, device)
            out.update(zip(chunk, logps.double().tolist()))
    return out


def weights_digest(model) -> str:
    """sha256 of the trainable parameters (sorted by name): equal on every DDP process after each step.

    Under FSDP2 a parameter is a DTensor, this process's shard of it: the digest is of the whole parameter,
    gathered (a collective, so every process must call this), and so of the same bytes a one-process run with
    these weights would hash."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            whole = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            digest.update(name.encode())
            digest.update(whole.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """sha256 of JSON-able parts: what a run, a cache or a checkpoint is made of."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def make_accelerator(precision: str, grad_accum: int):
    """accelerate's Accelerator for this process: on CUDA when there is one, else on the CPU (cpu=True is also
    what makes accelerate run DDP over gloo on CPUs under torchrun); FSDP where `accelerate launch` asked for it.

    A workaround for accelerate 1.15, whose AcceleratorState.__init__ turns an FSDP launch into FSDP only on
    GPU-like devices (MULTI_GPU, MULTI_XPU, ...): on CPUs the same launch silently became DDP over gloo
    (MULTI_CPU), every process holding every weight. torch's FSDP2 (`fully_shard`) runs on CPUs over gloo, and
    so does accelerate's FSDP2 code (prepare, clipping, sharded save_state/load_state, the gathered state dict)
    once its state says FSDP; so on CPUs an FSDP2 launch gets that state here, as AcceleratorState sets it on a
    GPU. A DeepSpeed launch has no such way out and is refused on CPUs (accelerate would run it as DDP)."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    mixed_precision = "bf16" if precision == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                              cpu=not torch.cuda.is_available())
    # `accelerate launch` may set ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which would win over ours.
    accelerator.gradient_accumulation_steps = grad_accum
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_launch and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment, as accelerate reads it
        if plugin.fsdp_version != 2:
            raise UserError("FSDP on CPUs runs here as FSDP2 only: set fsdp_version: 2 (as "
                            "configs/accelerate/fsdp.yaml does)")
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed_launch and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError("the DeepSpeed config needs CUDA GPUs (on CPUs accelerate would run plain DDP instead): "
                        "use configs/accelerate/fsdp.yaml or torchrun there")
    return accelerator


# ---- checkpoints -------------------------------------------------------------------------------------------


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(accelerator, output_dir: Path, step: int, state: dict[str, Any]) -> Path:
    root = output_dir / "checkpoints"
    final = root / f"step-{step:08d}"
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in checkpoints(output_dir)[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
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


# ---- metrics: OUTPUT_DIR/metrics.jsonl, and the trackers of --report-to --------------------------------------

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under OUTPUT_DIR
WANDB_RUN_ID = "wandb_run_id"  # under OUTPUT_DIR: the wandb run that a --resume continues
TRACKER_PACKAGES = {"tensorboard": "tensorboard (or: pip install 'mathagent[tensorboard]')", "wandb": "wandb"}


def report_targets(report_to: str) -> tuple[str, ...]:
    """The trackers named by --report-to, as transformers reads its report_to: 'none' (the default), 'all'
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
        raise UserError(f"--report-to {report_to!r}: choose none, all, or from {', '.join(TRACKERS)} "
                        "(a comma list)")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--report-to {name}: the {name} package is not installed: pip install "
                            f"{TRACKER_PACKAGES[name]}")
    return tuple(dict.fromkeys(names))


class MetricsLog:
    """Where each optimizer step's metrics row goes: OUTPUT_DIR/metrics.jsonl, always, and the trackers of
    --report-to with the same names and step numbers: TensorBoard event files in OUTPUT_DIR/tensorboard (offline,
    torch's SummaryWriter), a wandb run (WANDB_PROJECT, default 'mathagent'; files under OUTPUT_DIR/wandb).
    Only the main process opens one.

    A run that starts at `start_step` (a resumed one) keeps the rows of steps up to it and writes the rest
    again: metrics.jsonl is cut back to them, TensorBoard hides the events of later steps (purge_step), and
    wandb continues the same run (its id is kept in OUTPUT_DIR/wandb_run_id), where it ignores a step it
    already holds (wandb's steps only go up)."""

    def __init__(self, output_dir: Path, report_to: str, *, start_step: int, config: dict[str, Any]):
        targets = report_targets(report_to)
        self.path = output_dir / "metrics.jsonl"
        self.kept = _read_metrics(self.path, start_step)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.kept))
        os.replace(tmp, self.path)
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


# ---- the recipe --------------------------------------------------------------------------------------------


def train(config: TrainConfig, records: Sequence[dict[str, Any]], *,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train on `records` (pairs, KTO examples, trajectories or PRM examples, per `config.objective`) and save
    the model.

    Returns the run's summary (also in OUTPUT_DIR/training_summary.json). `on_step` gets each metrics row and
    `log` each progress message, on the main process only.
    """
    config.check()
    return Recipe(config, log).run(records, on_step)


class Recipe:
    """One training run, set up in named phases (`_setup_*`), then `_train` and `_save`.

    Supports: every objective of `make_objective`; full fine-tuning or LoRA (peft, every linear layer); one
    process, DDP, or FSDP2 (full fine-tuning) under torchrun / accelerate launch; gradient accumulation; bf16
    mixed precision on GPUs; checkpoints and exact resume. Assumes: every process reads the same records and
    the model fits each device for the reference pass (under FSDP too)."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None]):
        self.config = config
        self._setup_run(log)

    def run(self, records: Sequence[dict[str, Any]], on_step: Callable[[dict[str, Any]], None] | None
            ) -> dict[str, Any]:
        self._setup_data(records)
        finished = self._setup_checkpoints()
        if finished is not None:
            _end(self.accelerator)
            return finished
        from accelerate.utils import set_seed

        set_seed(self.config.seed)
        reference_model = self._setup_reference()
        self._setup_model(reference_model)
        self._setup_optimizer_and_schedule()
        seconds, tokens = self._train(on_step)
        summary = self._save(seconds, tokens)
        _end(self.accelerator)
        return summary

    # 1. the processes, the device, the output directory
    def _setup_run(self, log: Callable[[str], None]) -> None:
        from accelerate.utils import gather_object

        from mathagent.tiny import resolve_model

        config = self.config
        self.precision = choose_precision(config.precision)
        self.accelerator = accelerator = make_accelerator(self.precision, config.grad_accum)
        self.main = accelerator.is_main_process
        self.say = log if self.main else (lambda _message: None)
        self.parallelism = accelerator.distributed_type.name  # NO, MULTI_CPU / MULTI_GPU (DDP), FSDP or DEEPSPEED
        if self.parallelism in ("FSDP", "DEEPSPEED") and config.lora:
            raise UserError("--lora runs under DDP (torchrun, or accelerate launch without an FSDP/DeepSpeed "
                            "config); FSDP and DeepSpeed are for full fine-tuning (see docs/training.md)")
        self.world, self.rank, self.device = accelerator.num_processes, accelerator.process_index, accelerator.device
        self.output_dir = Path(config.output_dir)
        self.existing = checkpoints(self.output_dir)
        if not config.resume and (self.existing or (self.output_dir / "metrics.jsonl").exists()):
            raise UserError(f"{self.output_dir} already holds a training run: pass --resume to continue it, or "
                            "choose another --output-dir")
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()

        def resolve(name: str) -> str:  # the main process builds `tiny` (once) and tells the others
            path = resolve_model(name) if self.main else None
            return gather_object([path])[0] if self.world > 1 else path

        self.model_path = resolve(config.model)
        self.ref_path = resolve(config.ref_model) if config.ref_model else None
        self.say(f"device {self.device}, {self.world} process(es) ({self.parallelism}), precision {self.precision}")

    # 2. the examples and the plan of the steps
    def _setup_data(self, records: Sequence[dict[str, Any]]) -> None:
        from transformers import AutoTokenizer

        config = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tokenizer = self.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.objective = make_objective(config, tokenizer)
        self.examples, self.report = self.objective.encode_records(records)
        report = self.report
        if report.too_long or report.no_actions or report.straddling:
            self.say(f"encoding: {report.too_long} example(s) longer than --max-length {config.max_length} tokens "
                     f"dropped (never cut: that would cut off answers), {report.no_actions} sequence(s) with no "
                     f"action token, {report.straddling} token(s) straddling an action boundary left out of the "
                     "actions")
        if not self.examples and report.too_long:
            raise UserError(f"every example is longer than --max-length {config.max_length} tokens: raise it")
        self.plan = plan = make_plan(len(self.examples), config, self.world)
        self.objective.check_plan(plan)
        left_out = len(self.examples) - plan.steps_per_epoch * plan.batch_size
        self.say(f"{len(self.examples)} examples, {plan.steps_per_epoch} steps per epoch ({left_out} examples left "
                 f"out of each epoch by its order), {plan.total_steps} steps, micro-batch {plan.micro_batch} x "
                 f"{config.grad_accum} accumulation x {self.world} process(es)")
        # Every sequence of the run: the examples', then M-KTO's mismatched pairs in the plan.
        self.sequences = self.objective.sequences(self.examples, plan)
        self.identity = {
            "objective": config.objective, "loss": config.loss, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "world_size": self.world, "seed": config.seed,
            "examples": len(self.examples), "lora": config.lora,
            "data": fingerprint([(s.input_ids, s.action_mask) for s in self.sequences]),
            **self.objective.identity(self.examples),
        }

    # 3. where to start: a checkpoint, step 0, or the finished run (returned)
    def _setup_checkpoints(self) -> dict[str, Any] | None:
        config, total = self.config, self.plan.total_steps
        self.start_step, self.resume_from = 0, self.existing[-1] if config.resume and self.existing else None
        self.summary_path = self.output_dir / "training_summary.json"
        if config.resume and self.summary_path.exists():
            finished = json.loads(self.summary_path.read_text())
            if finished.get("run") == self.identity and finished.get("steps") == total:
                self.say(f"--resume: {self.output_dir} holds the finished run ({total} steps); nothing to do")
                return finished
        if self.resume_from is not None:
            state = json.loads((self.resume_from / "trainer_state.json").read_text())
            for key, value in self.identity.items():
                if state["run"].get(key) != value:
                    raise UserError(f"--resume: {self.resume_from} was made with {key}={state['run'].get(key)!r}, "
                                    f"this run has {value!r}")
            self.start_step = state["step"]
            self.say(f"resuming from {self.resume_from} (step {self.start_step})")
        elif config.resume:
            self.say(f"--resume: no checkpoint in {self.output_dir}, starting from step 0")
        return None

    # 4. the reference pass, before training: one model in memory at a time
    def _setup_reference(self):
        """Set each sequence's `ref_logp`; return the model that scored them if it is the policy to train."""
        import torch
        from accelerate.utils import gather_object

        if not self.objective.needs_reference:
            return None
        config, sequences, world = self.config, self.sequences, self.world
        cache_path = self.output_dir / "reference_logps.json"
        key = fingerprint(self.identity["data"], self.ref_path or self.model_path, self.precision)
        cached = json.loads(cache_path.read_text()) if cache_path.exists() else None
        if cached is not None and cached.get("key") == key:
            for sequence, logp in zip(sequences, cached["logps"], strict=True):
                sequence.ref_logp = logp
            self.say(f"reference log-probs: {len(sequences)} from {cache_path}")
            return None
        started = time.perf_counter()
        # Without --ref-model the reference is the starting policy: this very model is then trained (under LoRA
        # its base stays frozen, in bf16 where that is the precision).
        frozen_bf16 = self.precision == "bf16" and (config.lora or self.ref_path is not None)
        ref_model = load_model(self.ref_path or self.model_path, frozen_bf16=frozen_bf16)
        disable_dropout(ref_model)
        ref_model.to(self.device)
        batch = config.ref_batch_size or max(2, 2 * self.plan.micro_batch)
        mine = reference_logps(ref_model, sequences, batch_size=batch, pad_id=self.pad_id, device=self.device,
                               autocast=self.accelerator.autocast, indices=range(self.rank, len(sequences), world))
        merged: dict[int, float] = {}
        for part in (gather_object([mine]) if world > 1 else [mine]):
            merged.update(part)
        for i, sequence in enumerate(sequences):
            sequence.ref_logp = merged[i]
        if self.main:
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "logps": [s.ref_logp for s in sequences]}))
            os.replace(tmp, cache_path)
        self.say(f"reference log-probs: {len(sequences)} sequences in {time.perf_counter() - started:.1f} s")
        if self.ref_path is None:
            return ref_model
        del ref_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    # 5. the policy
    def _setup_model(self, model) -> None:
        config = self.config
        if model is None:
            model = load_model(self.model_path, frozen_bf16=self.precision == "bf16" and config.lora)
        disable_dropout(model)
        if config.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                     lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model

    # 6. AdamW and the LR schedule, prepared by accelerate; the checkpoint's states on resume
    def _setup_optimizer_and_schedule(self) -> None:
        import torch
        from transformers import get_scheduler

        config, accelerator = self.config, self.accelerator
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=self.plan.total_steps)
        # The scheduler stays unprepared: accelerate's wrapper steps it once per process per step.
        if accelerator.state.deepspeed_plugin is not None:
            # No dataloader is prepared, so DeepSpeed learns the micro-batch here; its accumulation must be ours
            # (it steps the optimizer itself at the accumulation boundary) and it clips by its own config.
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.plan.micro_batch
            ds["gradient_accumulation_steps"] = config.grad_accum
            ds["train_batch_size"] = config.batch_size
            ds["gradient_clipping"] = config.max_grad_norm
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        if self.resume_from is not None:
            accelerator.load_state(str(self.resume_from))

    # 7. the steps
    def _train(self, on_step: Callable[[dict[str, Any]], None] | None) -> tuple[float, int]:
        config = self.config
        metrics_log = MetricsLog(self.output_dir, config.report_to, start_step=self.start_step,
                                 config=asdict(config)) if self.main else None
        self.last_row: dict[str, Any] = metrics_log.kept[-1] if metrics_log is not None and metrics_log.kept else {}
        started = time.perf_counter()
        tokens = 0
        try:
            for step in range(self.start_step, self.plan.total_steps):
                t0 = time.perf_counter()
                row = self._train_step(step)
                tokens += row["tokens"]
                row["tokens_per_second"] = row["tokens"] / (time.perf_counter() - t0)
                if metrics_log is not None:
                    metrics_log.write(row)
                    if on_step is not None:
                        on_step(row)
                self.last_row = row
                done = step + 1
                if config.save_every and done % config.save_every == 0 and done < self.plan.total_steps:
                    _save_checkpoint(self.accelerator, self.output_dir, done,
                                     {"step": done, "run": self.identity, "config": asdict(config)})
        finally:
            if metrics_log is not None:
                metrics_log.close()
        return time.perf_counter() - started, tokens

    def _train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over the plan's examples for `step`; returns its metrics row (all processes')."""
        import torch

        accelerator, plan, world = self.accelerator, self.plan, self.world
        everyone = plan.step(step)
        totals = StepTotals(examples=plan.batch_size, targets=max(1, sum(
            self.examples[i].targets for part in everyone for micro in part for i in micro)))
        mean_over_processes = (lambda mean: accelerator.gather(mean.reshape(1)).mean()) if world > 1 else None
        same_passes = (lambda n: int(accelerator.reduce(torch.tensor([n], device=self.device), reduction="max")))\
            if world > 1 else None
        sums: dict[str, Any] = {}
        lr = self.scheduler.get_last_lr()[0]
        for micro in everyone[self.rank]:
            batch = MicroBatch(micro, [self.examples[i] for i in micro], totals, self.device, self.pad_id,
                               mean_over_processes, same_passes)
            # accelerate's accumulate() skips the gradient all-reduce (and, under DeepSpeed, the optimizer step)
            # until the step's last micro-batch; backward() divides by grad_accum, which the scaling undoes.
            with accelerator.accumulate(self.model), accelerator.autocast():
                loss, parts = self.objective.loss(self.model, batch)
                # DDP averages gradients over the processes: scale so that they sum to the step's gradient.
                accelerator.backward(loss * world * plan.grad_accum)
            for name, value in {"loss": loss.detach(), **parts}.items():
                sums[name] = sums.get(name, 0) + torch.as_tensor(value, dtype=torch.float64, device=self.device)
        if not accelerator.sync_gradients:
            raise RuntimeError("the step ended before accelerate synchronized gradients")
        grad_norm = None
        if self.config.max_grad_norm:
            norm = accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            grad_norm = None if norm is None else float(norm)  # DeepSpeed clips by its own config
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        # Every process has the same names: one all-reduce of their float64 sums gives the step's.
        names = sorted(sums)
        local = torch.stack([sums[name].reshape(()) for name in names])
        summed = dict(zip(names, (accelerator.reduce(local, reduction="sum") if world > 1 else local).tolist(),
                          strict=True))
        row: dict[str, Any] = {"step": step + 1, "loss": summed["loss"], **self.objective.metrics(summed, totals)}
        row.update({"grad_norm": grad_norm, "learning_rate": lr, "epoch": plan.epoch_of(step + 1),
                    "tokens": int(summed["tokens"])})
        return row

    # 8. the model vLLM (or score-prm) loads, and the summary
    def _save(self, seconds: float, tokens: int) -> dict[str, Any]:
        from accelerate.utils import gather_object

        accelerator, model, config = self.accelerator, self.model, self.config
        # Under DDP every process holds all weights, which must agree. Under FSDP each holds a shard: each hashes
        # the whole weights it gathers from the shards. DeepSpeed ZeRO-3's partitions are not hashed (untested).
        deepspeed = self.parallelism == "DEEPSPEED"
        digests = [] if deepspeed else gather_object([weights_digest(model)]) if self.world > 1 else \
            [weights_digest(model)]
        accelerator.wait_for_everyone()
        saved = save_model(accelerator, model, self.tokenizer, self.output_dir, merge_lora=config.merge_lora)
        summary = {
            "output_dir": str(self.output_dir), "saved": saved, "steps": self.plan.total_steps,
            "resumed_from_step": self.start_step, "examples": len(self.examples), "world_size": self.world,
            "distributed_type": self.parallelism, "precision": self.precision, "device": str(self.device),
            "train_seconds": seconds, "train_tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds else None,
            "final": self.last_row, "weights_sha256": digests, "processes_agree": len(set(digests)) <= 1,
            "encoding": asdict(self.report), "run": self.identity,
        }
        if self.main:
            self.objective.save(self.output_dir, self.model_path, self.plan.total_steps)
            self.summary_path.write_text(json.dumps(summary, indent=2))
            if not summary["processes_agree"]:
                self.say("warning: the processes ended with different weights")
        return summary


def _end(accelerator) -> None:
    """Every process leaves together; end_training destroys accelerate's process group here rather than at
    the interpreter's exit (the CLI then ends a torchrun rank with os._exit, see stages.train)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def save_model(accelerator, model, tokenizer, output_dir: Path, *, merge_lora: bool) -> str:
    """Write what vLLM loads into `output_dir`: the model (`--model DIR`), or the LoRA adapter (`--adapter DIR`
    with the base model), or with `merge_lora` the adapter merged into the base. Returns which."""
    unwrapped = accelerator.unwrap_model(model)
    is_peft = hasattr(unwrapped, "peft_config")
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if is_peft and merge_lora:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(output_dir)
            kind = "merged"
        elif is_peft:
            unwrapped.save_pretrained(output_dir)
            kind = "adapter"
        else:
            unwrapped.save_pretrained(output_dir, state_dict=state_dict)
            kind = "model"
        tokenizer.save_pretrained(output_dir)
    else:
        kind = "merged" if is_peft and merge_lora else "adapter" if is_peft else "model"
    accelerator.wait_for_everyone()
    return kind
