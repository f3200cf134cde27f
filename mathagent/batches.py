"""Batches: which examples each optimizer step, process and micro-batch takes (`Plan`), and a micro-batch's
forward passes (`sequence_logps`: summed action log-probs, one pass per group of similar length).

The plan: epoch e is a permutation of the examples seeded by (seed, e); optimizer step s takes the next
`batch_size` examples of its epoch, split evenly across processes and then into `grad_accum` micro-batches.
The order is a pure function of (seed, step), so a resumed run sees exactly the examples it would have. The
examples left over at the end of an epoch (fewer than a batch) wait for another epoch's order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mathagent import losses
from mathagent.chat import right_pad
from mathagent.errors import UserError
from mathagent.train_config import TrainConfig


@dataclass
class Encoded:
    """One tokenized conversation: ids and action mask (1 = a token the loss reads: the agent's actions, or a
    PRM's labels), and, after the reference pass, log pi_ref of its actions (summed, or per token).

    `more`: further sequences of the same conversation whose action log-probs add to this one's, where a
    template that rewrites history shows each action in its own context (`chat.tokenize_per_action`).
    `logprobs`: where the record carries them, the sampling policy's log-prob of each position's token (None
    where none was recorded), for the trainer's engine/trainer mismatch figure.
    `nll_mask`: where the loss reads more than the actions (the single-turn baseline, `chat.completion_mask`),
    1 on the actions alone: the tokens an NLL term reads, the same in both arms of the M-DPO comparison.
    None: the action mask."""

    input_ids: list[int]
    action_mask: list[int]
    ref_logp: float | None = None
    more: list[Encoded] = field(default_factory=list)
    logprobs: list[float | None] | None = None
    nll_mask: list[int] | None = None
    ref_token_logps: list[float] | None = None  # log pi_ref of each action token, where the objective asks

    def rows(self) -> list[Encoded]:
        """The sequences a forward pass runs for it: itself, then `more`."""
        return [self, *self.more]

    @property
    def actions(self) -> int:
        return sum(sum(row.action_mask) for row in self.rows())

    @property
    def predicted(self) -> int:
        """Action tokens with a token before them: those the model predicts (an NLL term's denominator)."""
        return sum(sum(row.action_mask[1:]) for row in self.rows())

    @property
    def nll_targets(self) -> int:
        """The tokens of an NLL term on it (`nll_mask`) with a token before them."""
        return sum(sum((row.action_mask if row.nll_mask is None else row.nll_mask)[1:]) for row in self.rows())

    @property
    def longest(self) -> int:
        return max(len(row.input_ids) for row in self.rows())


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
    """The plan of a run of `n_examples` examples over `world` processes."""
    if config.batch_size % (world * config.grad_accum):
        raise UserError(
            f"batch_size {config.batch_size} must be a multiple of grad_accum ({config.grad_accum}) times the "
            f"number of processes ({world})", options=("batch_size", "grad_accum"))
    if n_examples < config.batch_size:
        raise UserError(f"{n_examples} training examples, fewer than batch_size {config.batch_size}",
                        options=("batch_size",))
    plan = Plan(n_examples, config.batch_size, config.grad_accum, world, config.seed, 0)
    # round() first: 0.3 x 10 is 3.0000000000000004 in floating point, which is 3 steps, not 4
    plan.total_steps = config.max_steps or math.ceil(round(config.epochs * plan.steps_per_epoch, 6))
    if plan.total_steps < 1:
        raise UserError("nothing to train: max_steps and epochs give 0 steps", options=("max_steps", "epochs"))
    return plan


def collate(sequences: Sequence[Encoded], pad_id: int):
    """Right-padded input_ids, attention_mask and action_mask tensors, and nll_mask where a sequence has one."""
    ids, attention = right_pad([s.input_ids for s in sequences], pad_id)
    actions, _ = right_pad([s.action_mask for s in sequences], 0)
    batch = {"input_ids": ids, "attention_mask": attention, "action_mask": actions}
    if any(s.nll_mask is not None for s in sequences):
        batch["nll_mask"], _ = right_pad([s.action_mask if s.nll_mask is None else s.nll_mask for s in sequences], 0)
    return batch


class SequenceLogps(NamedTuple):
    """What `sequence_logps` returns, in the order of its sequences."""

    actions: Any  # [B] summed log-probs of the action tokens (the loss mask)
    nll: Any  # [B] summed log-probs of each sequence's `nll_mask` tokens (`actions` where it has none)
    tokens: int  # the non-pad tokens of the forward passes


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


def _forward_passes(model, rows: Sequence[tuple[int, Encoded]], pad_id: int, device,
                    same_passes: Callable[[int], int] | None):
    """Each forward pass over (sequence index, row) pairs, one per length group (`forward_groups`): the group's
    indices into `rows`, its collated batch on `device`, and the logits."""
    for group in forward_groups([len(row.input_ids) for _, row in rows], same_passes):
        batch = {k: v.to(device) for k, v in collate([rows[r][1] for r in group], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        yield group, batch, logits


def sequence_logps(model, sequences: Sequence[Encoded], pad_id: int, device,
                   same_passes: Callable[[int], int] | None = None,
                   on_logits: Callable[[list[Encoded], Any, Any], None] | None = None):
    """Summed action log-probs [B] (with grad if enabled), those of the NLL tokens [B] and the non-pad tokens
    (`SequenceLogps`).

    One forward pass per length group of the sequences' rows (see `length_groups`, and `forward_groups` for
    `same_passes`); a sequence's log-prob sums those of its rows (`Encoded.rows`). The results are in the order
    of `sequences`, and a single backward pass through them all follows. `on_logits(rows, logits, input_ids)`,
    if given, sees each forward pass (the trainer's log-prob mismatch figure).
    """
    import torch

    rows = [(i, row) for i, s in enumerate(sequences) for row in s.rows()]
    logps: list[Any] = [None] * len(rows)
    nlls: list[Any] = [None] * len(rows)
    for group, batch, logits in _forward_passes(model, rows, pad_id, device, same_passes):
        if on_logits is not None:
            on_logits([rows[r][1] for r in group], logits, batch["input_ids"])
        per_token = losses.token_logps(logits, batch["input_ids"])
        group_logps = losses.masked_sum(per_token, batch["action_mask"])
        group_nll = losses.masked_sum(per_token, batch["nll_mask"]) if "nll_mask" in batch else group_logps
        for k, r in enumerate(group):
            logps[r], nlls[r] = group_logps[k], group_nll[k]
    summed: list[Any] = [None] * len(sequences)
    summed_nll: list[Any] = [None] * len(sequences)
    for r, (i, _) in enumerate(rows):  # a sequence's rows, summed (one row: its own values, unchanged)
        summed[i] = logps[r] if summed[i] is None else summed[i] + logps[r]
        summed_nll[i] = nlls[r] if summed_nll[i] is None else summed_nll[i] + nlls[r]
    return SequenceLogps(torch.stack(summed), torch.stack(summed_nll), sum(len(row.input_ids) for _, row in rows))


class ActionTokenLogps(NamedTuple):
    """What `action_token_logps` returns, in the order of its sequences."""

    logps: list[Any]  # per sequence, [its action tokens]: log pi of each (with grad if enabled), rows in order
    entropies: list[Any]  # per sequence, the policy's entropy at each of those positions (no grad)
    tokens: int  # the non-pad tokens of the forward passes


def action_token_logps(model, sequences: Sequence[Encoded], pad_id: int, device,
                       same_passes: Callable[[int], int] | None = None) -> ActionTokenLogps:
    """Per-token log-probs and entropies of the sequences' action tokens (token t >= 1 with action_mask 1, in
    order, a sequence's rows one after another), from one forward pass per length group as `sequence_logps`.
    The softmax runs only at the positions that predict an action token."""
    import torch

    rows = [(i, row) for i, s in enumerate(sequences) for row in s.rows()]
    logps: list[Any] = [None] * len(rows)
    entropies: list[Any] = [None] * len(rows)
    for group, batch, logits in _forward_passes(model, rows, pad_id, device, same_passes):
        selected = batch["action_mask"][:, 1:].bool()
        b, t = selected.nonzero(as_tuple=True)  # row-major: each row's positions in order
        scores = logits[:, :-1][b, t].float().log_softmax(-1)  # [tokens, vocab]
        token_logps = scores.gather(-1, batch["input_ids"][:, 1:][b, t].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            token_entropies = -(scores.exp() * scores).sum(-1)
        counts = selected.sum(-1).tolist()
        for k, (lp, h) in enumerate(zip(token_logps.split(counts), token_entropies.split(counts), strict=True)):
            logps[group[k]], entropies[group[k]] = lp, h
    by_sequence: list[list[int]] = [[] for _ in sequences]
    for r, (i, _) in enumerate(rows):
        by_sequence[i].append(r)
    return ActionTokenLogps([torch.cat([logps[r] for r in mine]) for mine in by_sequence],
                            [torch.cat([entropies[r] for r in mine]) for mine in by_sequence],
                            sum(len(row.input_ids) for _, row in rows))


def recorded_action_logprobs(sequence: Encoded) -> list[float | None]:
    """The recorded sampling log-prob of each of the sequence's action tokens, in `action_token_logps`' order
    (None where none was recorded)."""
    out: list[float | None] = []
    for row in sequence.rows():
        for t in range(1, len(row.input_ids)):
            if row.action_mask[t]:
                out.append(row.logprobs[t] if row.logprobs is not None else None)
    return out
