"""The one training recipe: every objective (M-DPO / IPO / hinge, M-KTO, SFT, the PRM) through transformers,
peft and accelerate.

`train` runs a whole training for an `objectives.Objective`, the part that differs between them (how a record
becomes training examples, whether it needs a reference pass, how a micro-batch's forward pass becomes its
share of the step's loss and its metrics), built by the command and handed in. The run's options are a
`train_config.TrainConfig`, checked where it is built.

The recipe sets up in named phases, then runs a short loop (see `Recipe`):

1. Run: the accelerator (DDP, FSDP2 or one process), precision, the output directory.
2. Data: the records encoded by the objective (observations masked unless `mask_observations=False`, the
   single-turn baseline), longer ones than `max_length` dropped whole and counted, never cut; the plan of the
   steps (`batches.Plan`: a pure function of (seed, step), so a resumed run sees exactly the examples it would
   have).
3. Checkpoints: what to resume from (OUTPUT_DIR/checkpoints/step-N, `mathagent.checkpoints`), or the finished
   run.
4. The reference pass (M-DPO, M-KTO): log pi_ref of every sequence the plan will use, computed once BEFORE
   training, with `ref_model` (default: the starting policy itself, before any update or LoRA adapter), so
   training holds a single model in memory. Cached in OUTPUT_DIR/reference_logps.json.
5. Model: the policy, LoRA, gradient checkpointing.
6. Optimizer and schedule: AdamW and transformers' LR schedule, prepared by accelerate, state loaded on resume.
7. The loop: per micro-batch the objective's loss, one backward pass; per step gradient clipping, AdamW and the
   LR schedule. Each step's metrics (TRL's names for the policy objectives: rewards/chosen = mean of
   beta * (log pi - log pi_ref) over the step's chosen trajectories, computed in that step's forward pass
   before its update, and so on) go to the metrics log (`metrics_log.MetricsLog`: OUTPUT_DIR/metrics.jsonl,
   and TensorBoard or wandb with `report_to`). Every `save_every` steps a checkpoint (model or adapter,
   optimizer, scheduler, RNG states of every process, the step; the data order follows from the step),
   written beside and renamed, so a killed run leaves only complete ones. `resume=True` continues from the
   last.
8. Save what vLLM (or score-prm) loads: the full model, or the LoRA adapter (vLLM's --adapter), or the merged
   model; and the objective's own files (the PRM's prm.json).

Multi-process under `torchrun` / `accelerate launch` via accelerate: DDP, and FSDP2 with
configs/accelerate/fsdp.yaml (on CPUs too, see `make_accelerator`); the DeepSpeed config is for CUDA GPUs and
untested (docs/training.md). Reductions are exact across micro-batches and processes: an objective's loss is a
sum over the micro-batch's examples divided by the step's totals (`objectives.StepTotals`), so the loss of a
step is the same however it is split.

Device and precision are chosen in `choose_precision`: bf16 mixed precision on a GPU that has it (fp32 master
weights; LoRA's frozen base weights in bf16), fp32 everywhere else.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mathagent.batches import Encoded, action_token_logps, make_plan, sequence_logps
from mathagent.checkpoints import checkpoints, save_checkpoint
from mathagent.errors import UserError
from mathagent.losses import token_logps
from mathagent.metrics_log import MetricsLog
from mathagent.objectives import MicroBatch, Objective, StepTotals, fingerprint
from mathagent.records import write_atomic
from mathagent.train_config import PRECISIONS, TrainConfig

# ---- the recipe --------------------------------------------------------------------------------------------


def train(config: TrainConfig, objective: Objective, records: Sequence[dict[str, Any]], *,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `objective` on `records` (pairs, KTO examples, trajectories or PRM examples, as it reads them) and
    save the model.

    Returns the run's summary (also in OUTPUT_DIR/training_summary.json). `on_step` gets each metrics row and
    `log` each progress message, on the main process only.
    """
    return Recipe(config, objective, log).run(records, on_step)


class Recipe:
    """One training run, set up in named phases (`_setup_*`), then `_train` and `_save`.

    Supports: every objective of `mathagent.objectives`; full fine-tuning or LoRA (peft, every linear layer); one
    process, DDP, or FSDP2 (full fine-tuning) under torchrun / accelerate launch; gradient accumulation; bf16
    mixed precision on GPUs; checkpoints and exact resume. Assumes: every process reads the same records and
    the model fits each device for the reference pass (under FSDP too)."""

    def __init__(self, config: TrainConfig, objective: Objective, log: Callable[[str], None]):
        self.config = config
        self.objective = objective
        # The config as checkpoints and trackers record it, the objective's name in the place of its field.
        fields = list(asdict(config).items())
        self.config_record = dict(fields[:2] + [("objective", objective.name)] + fields[2:])
        self._setup_run(log)

    def run(self, records: Sequence[dict[str, Any]], on_step: Callable[[dict[str, Any]], None] | None
            ) -> dict[str, Any]:
        self.mismatch: dict[str, Any] | None = None
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
            raise UserError("lora runs under DDP (torchrun, or accelerate launch without an FSDP/DeepSpeed "
                            "config); FSDP and DeepSpeed are for full fine-tuning (see docs/training.md)",
                            options=("lora",))
        self.world, self.rank, self.device = accelerator.num_processes, accelerator.process_index, accelerator.device
        self.output_dir = Path(config.output_dir)
        self.existing = checkpoints(self.output_dir)
        if not config.resume and (self.existing or (self.output_dir / "metrics.jsonl").exists()):
            raise UserError(f"{self.output_dir} already holds a training run: pass resume to continue it, or "
                            "choose another output_dir", options=("resume", "output_dir"))
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
        self.objective.setup(tokenizer)
        self.examples, self.report = self.objective.encode_records(records)
        report = self.report
        if report.too_long or report.no_actions or report.straddling:
            self.say(f"encoding: {report.too_long} example(s) longer than --max-length {config.max_length} tokens "
                     f"dropped (never cut: that would cut off answers), {report.no_actions} sequence(s) with no "
                     f"action token, {report.straddling} token(s) straddling an action boundary left out of the "
                     "actions")
        if report.flat_groups:
            self.say(f"grpo: {report.flat_groups} group(s) whose rewards are all equal (or of one sample) dropped: "
                     "no signal")
        if not self.examples and report.too_long:
            raise UserError(f"every example is longer than max_length {config.max_length} tokens: raise it",
                            options=("max_length",))
        self.plan = plan = make_plan(len(self.examples), config, self.world)
        self.objective.check_plan(plan)
        left_out = len(self.examples) - plan.steps_per_epoch * plan.batch_size
        self.say(f"{len(self.examples)} examples, {plan.steps_per_epoch} steps per epoch ({left_out} examples left "
                 f"out of each epoch by its order), {plan.total_steps} steps, micro-batch {plan.micro_batch} x "
                 f"{config.grad_accum} accumulation x {self.world} process(es)")
        # Every sequence of the run: the examples', then M-KTO's mismatched pairs in the plan.
        self.sequences = self.objective.sequences(self.examples, plan)
        self.identity = {
            "objective": self.objective.name, "loss": config.loss, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "world_size": self.world, "seed": config.seed,
            "examples": len(self.examples), "lora": config.lora,
            "data": fingerprint([[(r.input_ids, r.action_mask, *([] if r.nll_mask is None else [r.nll_mask]))
                                  for r in s.rows()] for s in self.sequences]),
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
                    raise UserError(f"resume: {self.resume_from} was made with {key}={state['run'].get(key)!r}, "
                                    f"this run has {value!r}", options=("resume",))
            self.start_step = state["step"]
            self.say(f"resuming from {self.resume_from} (step {self.start_step})")
        elif config.resume:
            self.say(f"--resume: no checkpoint in {self.output_dir}, starting from step 0")
        return None

    # 4. the reference pass, before training: one model in memory at a time
    def _setup_reference(self):
        """Set each sequence's `ref_logp` (or, for an objective with `reference_tokens`, `ref_token_logps`); return
        the model that scored them if it is the policy to train."""
        import torch
        from accelerate.utils import gather_object

        if not self.objective.needs_reference:
            return None
        config, sequences, world = self.config, self.sequences, self.world
        per_token = self.objective.reference_tokens
        field = "ref_token_logps" if per_token else "ref_logp"
        cache_path = self.output_dir / "reference_logps.json"
        key = fingerprint(self.identity["data"], self.ref_path or self.model_path, self.precision,
                          *(["per token"] if per_token else []))
        cached = json.loads(cache_path.read_text()) if cache_path.exists() else None
        if cached is not None and cached.get("key") == key:
            for sequence, logp in zip(sequences, cached["logps"], strict=True):
                setattr(sequence, field, logp)
            self.say(f"reference log-probs: {len(sequences)} from {cache_path}")
            return None
        started = time.perf_counter()
        # Without --ref-model the reference is the starting policy: this very model is then trained (under LoRA
        # its base stays frozen, in bf16 where that is the precision).
        frozen_bf16 = self.precision == "bf16" and (config.lora or self.ref_path is not None)
        # (an adapter policy stays the trainable adapter when this model is the one then trained)
        ref_model = load_model(self.ref_path or self.model_path, frozen_bf16=frozen_bf16,
                               keep_adapter=config.lora and self.ref_path is None)
        disable_dropout(ref_model)
        ref_model.to(self.device)
        batch = self._ref_batch_size()
        scoring = dict(batch_size=batch, pad_id=self.pad_id, device=self.device, autocast=self.accelerator.autocast,
                       indices=range(self.rank, len(sequences), world))
        if per_token:  # the mismatch is measured by the policy's own pass (`_setup_model`)
            mine = reference_token_logps(ref_model, sequences, **scoring)
        else:
            # The starting policy is the sampling policy of records with log-probs: its pass measures the mismatch.
            mismatch = SamplingMismatch() if self.ref_path is None and self.start_step == 0 else None
            mine = reference_logps(ref_model, sequences, **scoring, on_logits=mismatch)
            if mismatch is not None:
                self._report_mismatch(mismatch)
        merged: dict[int, Any] = {}
        for part in (gather_object([mine]) if world > 1 else [mine]):
            merged.update(part)
        for i, sequence in enumerate(sequences):
            setattr(sequence, field, merged[i])
        if self.main:
            write_atomic(cache_path, json.dumps({"key": key, "logps": [getattr(s, field) for s in sequences]}))
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
            model = load_model(self.model_path, frozen_bf16=self.precision == "bf16" and config.lora,
                               keep_adapter=config.lora)
        disable_dropout(model)
        if self.mismatch is None and self.start_step == 0 and any(s.logprobs is not None for s in self.sequences):
            self._measure_mismatch(model)
        if config.lora and not hasattr(model, "peft_config"):  # (an adapter policy is already one)
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                     lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model

    def _measure_mismatch(self, model) -> None:
        """The starting policy's log-probs of sampled tokens against the recorded ones, on up to
        MISMATCH_SEQUENCES sequences, where no reference pass measured them (SFT, a separate --ref-model):
        before the model is wrapped, so each process runs its own share without collectives."""
        import torch

        sampled = [i for i, s in enumerate(self.sequences) if s.logprobs is not None][:MISMATCH_SEQUENCES]
        mine = sampled[self.rank :: self.world]
        mismatch = SamplingMismatch()
        model.to(self.device)
        model.eval()
        batch = self._ref_batch_size()
        with torch.no_grad(), self.accelerator.autocast():
            for lo in range(0, len(mine), batch):
                sequence_logps(model, [self.sequences[i] for i in mine[lo : lo + batch]], self.pad_id, self.device,
                               on_logits=mismatch)
        model.train()
        self._report_mismatch(mismatch)

    def _ref_batch_size(self) -> int:
        """Sequences per no-grad forward pass (the reference pass, the mismatch pass)."""
        return self.config.ref_batch_size or max(2, 2 * self.plan.micro_batch)

    def _report_mismatch(self, mismatch: SamplingMismatch) -> None:
        from accelerate.utils import gather_object

        parts = gather_object([mismatch]) if self.world > 1 else [mismatch]
        total = SamplingMismatch()
        for part in parts:
            total.tokens += part.tokens
            total.abs_sum += part.abs_sum
            total.abs_max = max(total.abs_max, part.abs_max)
        self.mismatch = total.as_dict()
        if total.tokens:
            self.say(f"sampled log-probs: {total.tokens} tokens, |recorded - trainer's| mean "
                     f"{self.mismatch['mean_abs']:.2e}, max {self.mismatch['max_abs']:.2e} per token")

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
                                 config=self.config_record) if self.main else None
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
                    save_checkpoint(self.accelerator, self.output_dir, done,
                                    {"step": done, "run": self.identity, "config": self.config_record})
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
        if self.mismatch is not None and self.mismatch["tokens"]:
            summary["sampling_logprob_mismatch"] = self.mismatch
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


# ---- precision, models, the reference pass, the processes --------------------------------------------------

MISMATCH_SEQUENCES = 256  # sequences a separate mismatch pass reads at most (the reference pass reads all)


class SamplingMismatch:
    """|log pi_sample(token) - log pi(token)| over the sampled tokens of records that carry `logprobs`: the
    engine's figure against the trainer's for the same model and the same ids (`on_logits` of
    `batches.sequence_logps`). Large values mean the engine and the trainer disagree (another dtype, kernel or
    model), which biases anything that weighs tokens by their ratio to the sampling policy; verl and TRL log
    the same figure."""

    def __init__(self) -> None:
        self.tokens = 0
        self.abs_sum = 0.0
        self.abs_max = 0.0

    def __call__(self, rows: Sequence[Encoded], logits, input_ids) -> None:
        import torch

        per_token = None
        for k, row in enumerate(rows):
            if row.logprobs is None:
                continue
            positions = [t for t, x in enumerate(row.logprobs) if x is not None and t >= 1]
            if not positions:
                continue
            if per_token is None:
                per_token = token_logps(logits, input_ids).detach()
            got = per_token[k, [t - 1 for t in positions]].double()
            want = torch.tensor([row.logprobs[t] for t in positions], dtype=torch.float64, device=got.device)
            diff = (got - want).abs()
            self.tokens += len(positions)
            self.abs_sum += float(diff.sum())
            self.abs_max = max(self.abs_max, float(diff.max()))

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "mean_abs": self.abs_sum / self.tokens if self.tokens else None,
                "max_abs": self.abs_max if self.tokens else None}


def choose_precision(requested: str = "auto") -> str:
    """'bf16' (mixed precision) on a CUDA GPU that supports it, else 'fp32'; an explicit choice is kept."""
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"precision {requested!r}: choose from {', '.join(PRECISIONS)}", options=("precision",))
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_model(path: str, *, frozen_bf16: bool = False, keep_adapter: bool = False):
    """A causal LM in fp32 (trained weights stay fp32 under mixed precision), or bf16 where it stays frozen.

    A peft adapter's directory (an iteration trained with --lora) loads on its base model: as the trainable
    adapter with `keep_adapter` (the loop's next iteration goes on training the same adapter, so every
    iteration's policy is a small adapter of one base a server keeps loaded), else merged into the base."""
    import torch
    from transformers import AutoModelForCausalLM

    from mathagent.tiny import base_model, is_adapter_dir

    dtype = torch.bfloat16 if frozen_bf16 else torch.float32
    try:
        if is_adapter_dir(path):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(base_model(path), dtype=dtype)
            model = PeftModel.from_pretrained(base, path, is_trainable=keep_adapter)
            if not keep_adapter:  # peft froze the base: a merged policy is trained in full
                model = model.merge_and_unload().requires_grad_(True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise UserError(f"model {path}: cannot load: {e}", options=("model",)) from None
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



def reference_logps(model, sequences: Sequence[Encoded], *, batch_size: int, pad_id: int, device, autocast,
                    indices: Sequence[int], on_logits=None) -> dict[int, float]:
    """log pi_ref of `sequences[i]` for each i in `indices`, longest first (less padding); `on_logits` sees
    each forward pass (`batches.sequence_logps`)."""
    import torch

    todo = sorted(indices, key=lambda i: -sequences[i].longest)
    out: dict[int, float] = {}
    model.eval()
    with torch.no_grad(), autocast():
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            logps, _, _ = sequence_logps(model, [sequences[i] for i in chunk], pad_id, device, on_logits=on_logits)
            out.update(zip(chunk, logps.double().tolist()))
    return out


def reference_token_logps(model, sequences: Sequence[Encoded], *, batch_size: int, pad_id: int, device, autocast,
                          indices: Sequence[int]) -> dict[int, list[float]]:
    """`reference_logps` per action token, in `batches.action_token_logps`' order."""
    import torch

    todo = sorted(indices, key=lambda i: -sequences[i].longest)
    out: dict[int, list[float]] = {}
    model.eval()
    with torch.no_grad(), autocast():
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            logps = action_token_logps(model, [sequences[i] for i in chunk], pad_id, device).logps
            out.update(zip(chunk, (lp.double().tolist() for lp in logps)))
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

