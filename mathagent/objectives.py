"""The training objectives: how a record becomes training examples, and a micro-batch its share of the loss.

One class per objective, built by its command and handed to the recipe (`training.train`): `PairObjective`
(M-DPO, IPO, hinge), `KTOObjective` (M-KTO), `SFTObjective` and `PRMObjective` (the generative PRM). Their
losses are the pure functions of `losses` and `prm`; each class says at its top where it departs from its
paper. An objective's loss is a sum over the micro-batch's examples divided by the step's totals
(`StepTotals`: its examples, or the action tokens or labels it averages over), so the loss of a step is the
same however it is split across micro-batches and processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mathagent import labeling, losses, prm
from mathagent.batches import (Encoded, Plan, action_token_logps, forward_groups, recorded_action_logprobs,
                               sequence_logps)
from mathagent.chat import RewrittenHistory, completion_mask, tokenize_conversation, tokenize_per_action
from mathagent.chat import prompt_ids as chat_prompt_ids
from mathagent.errors import UserError
from mathagent.labeling import PLUS
from mathagent.records import (check_messages, check_prompt, first_action, group_by_problem, messages_key,
                               split_prompt)
from mathagent.tokens import PROMPT_IDS, TOKEN_IDS, complete_ids, conversation_from_ids
from mathagent.train_config import TrainConfig

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
    prompt_ids: list[int] | None = None  # kto: the prompt's recorded ids, for the mismatched KL pairs
    plus: list[bool] = field(default_factory=list)  # prm: the hard labels, True for '+'
    advantage: float = 0.0  # grpo: of its group
    recorded: list[float] = field(default_factory=list)  # grpo: each action token's sampling log-prob (nan: none)
    q: list[float] = field(default_factory=list)  # prm: the soft labels (Q-hat)


# ---- the records each objective reads ----------------------------------------------------------------------


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


def check_rewarded(record: dict[str, Any]) -> str | None:
    """GRPO reads rollout trajectories with a numeric `reward` and their `problem_id` (the group)."""
    reward = record.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or reward != reward:
        return "field 'reward' must be a number (rollout writes it where the problem has an answer)"
    if "problem_id" not in record:
        return "field 'problem_id' is missing: GRPO groups a problem's samples by it"
    return check_trajectory(record)


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
    from_ids: int = 0  # conversations trained on their recorded token ids (`tokens`)
    per_action: int = 0  # conversations without ids whose template rewrites history: one context per action
    flat_groups: int = 0  # GRPO: groups (problems) whose rewards are all equal, or of one sample: no signal, dropped


class Encoder:
    """How a conversation becomes training tokens, for one tokenizer.

    A conversation that carries its token ids (`prompt_ids`, and `token_ids` on its messages, as rollout
    writes them) is trained on exactly those ids, the mask 1 on its actions' (`tokens.conversation_from_ids`);
    ids a message lacks (an observation `execute` added) are computed first, as rollout would
    (`tokens.complete_ids`). Its `prompt_ids` must be this tokenizer's rendering of its prompt: ids from
    another model's tokenizer would train on nonsense. A conversation without ids is rendered with the chat
    template (`chat.tokenize_conversation`), or, where the template rewrites history, as one context per
    action (`chat.tokenize_per_action`)."""

    def __init__(self, tokenizer, config: TrainConfig):
        self.tokenizer = tokenizer
        self.config = config
        self._prompts: dict[str, list[int]] = {}  # prompt (as a key) -> this tokenizer's prompt_ids

    def __call__(self, prompt: list[dict[str, Any]], response: list[dict[str, Any]], report: EncodeReport,
                 prompt_ids: list[int] | None = None) -> Encoded:
        if prompt_ids is not None:
            return self._from_ids(prompt, response, report, prompt_ids)
        messages = [*prompt, *response]
        try:
            conv = tokenize_conversation(self.tokenizer, messages)
        except RewrittenHistory as e:
            if not self.config.mask_observations:
                raise UserError(f"{e}; the single-turn baseline (mask_observations off) needs one rendering of "
                                "the whole conversation: train it on records with token ids (rollout writes "
                                "them)", options=("mask_observations",)) from None
            rows = tokenize_per_action(self.tokenizer, messages)
            report.per_action += 1
            report.straddling += sum(r.straddling for r in rows)
            encoded = Encoded(rows[0].input_ids, rows[0].action_mask,
                              more=[Encoded(r.input_ids, r.action_mask) for r in rows[1:]])
        else:
            report.straddling += conv.straddling
            encoded = self._masked(conv.input_ids, conv.action_mask)
        if not encoded.predicted:
            report.no_actions += 1
        return encoded

    def _from_ids(self, prompt, response, report: EncodeReport, prompt_ids: list[int]) -> Encoded:
        key = messages_key(prompt)
        if key not in self._prompts:
            self._prompts[key] = chat_prompt_ids(self.tokenizer, prompt)
        if self._prompts[key] != list(prompt_ids):
            raise UserError("its prompt_ids are not this tokenizer's rendering of its prompt (were its trajectories "
                            "sampled with another model's tokenizer?): train with that model's tokenizer, or drop "
                            "the token-id fields to have the messages rendered")
        if any(TOKEN_IDS not in m for m in response):
            trajectory = {PROMPT_IDS: prompt_ids, "messages": [*prompt, *(dict(m) for m in response)]}
            complete_ids(self.tokenizer, trajectory)
            response = trajectory["messages"][len(prompt):]
        conv = conversation_from_ids(prompt_ids, response)
        report.from_ids += 1
        logprobs = conv.logprobs if any(x is not None for x in conv.logprobs) else None
        encoded = self._masked(conv.input_ids, conv.action_mask, logprobs)
        if not encoded.predicted:
            report.no_actions += 1
        return encoded

    def _masked(self, input_ids: list[int], actions: list[int], logprobs=None) -> Encoded:
        """The sequence with its loss mask: the actions, or under the single-turn baseline every token from the
        first action on, its NLL term still on the actions alone (`Encoded.nll_mask`)."""
        if self.config.mask_observations:
            return Encoded(input_ids, actions, logprobs=logprobs)
        return Encoded(input_ids, completion_mask(actions), logprobs=logprobs, nll_mask=actions)


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
    """What `training.train` asks of a training objective, built by its command from the run's `TrainConfig`
    (it checks the options only it reads) and given the tokenizer by the recipe (`setup`).

    - `name`: the objective in the run's identity (a checkpoint resumes only a run of the same one).
    - `encode(record, report)`: the record's training examples (token ids and masks from the chat template).
    - `needs_reference`: whether log pi_ref of its sequences is computed, once, before training (summed over
      the actions, or with `reference_tokens` per action token).
    - `loss(model, batch)`: the micro-batch's forward pass and its share of the step's loss, a sum over its
      examples divided by the step's totals (so the step's loss is exact however it is split across
      micro-batches and processes), with the micro-batch's metric sums ('tokens': its non-pad tokens).
    - `metrics(sums, totals)`: the step's metrics row from the sums of all its micro-batches and processes.
    """

    name = ""
    needs_reference = False
    reference_tokens = False  # the reference pass keeps each action token's log pi_ref (`Encoded.ref_token_logps`)

    def __init__(self, config: TrainConfig):
        self.config = config

    def setup(self, tokenizer) -> None:
        """Take the tokenizer of the model to train (the recipe loads it once the model is resolved)."""
        self.tokenizer = tokenizer
        self.encode_conversation = Encoder(tokenizer, self.config)

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        raise NotImplementedError

    def encode_records(self, records: Sequence[dict[str, Any]]) -> tuple[list[Example], EncodeReport]:
        """The examples of all records, those with a sequence longer than `max_length` dropped and counted, never
        cut: cutting the end of a trajectory removes its answer, and a pair whose answers are gone teaches the
        opposite of its label (make-pairs --max-length drops the same pairs earlier, with the same default)."""
        report = EncodeReport()
        examples: list[Example] = []
        for record in records:
            try:
                encoded = self.encode(record, report)
            except UserError as e:
                raise UserError(f"record {record['id']}: {e}", options=e.options) from None
            for example in encoded:
                if any(s.longest > self.config.max_length for s in example.sequences):
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
    chosen actions, averaged over the step's chosen action tokens, as in RPO; on the action tokens also under
    `--no-mask-observations`, so that both arms of the comparison get the same term) are additions, off by
    default; IPO's margin is on summed log-ratios, as in the IPO paper (TRL averages them per token); pi_ref's
    log-probs are computed once before training, not in each step (the same values: pi_ref is fixed); dropout
    is off in both passes (as TRL does).
    """

    name = "pairs"
    needs_reference = True

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if config.loss not in losses.PAIR_LOSSES:
            raise UserError(f"loss {config.loss!r}: choose from {', '.join(losses.LOSSES)}", options=("loss",))

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        prompt_ids = record.get(PROMPT_IDS)
        chosen = self.encode_conversation(record["prompt"], record["chosen"], report, prompt_ids)
        rejected = self.encode_conversation(record["prompt"], record["rejected"], report, prompt_ids)
        # the NLL term's tokens: the chosen actions that have a token before them
        return [Example(record["id"], [chosen, rejected], targets=chosen.nll_targets)]

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        config = self.config
        sequences = [e.sequences[0] for e in batch.examples] + [e.sequences[1] for e in batch.examples]
        logps, nlls, tokens = sequence_logps(model, sequences, batch.pad_id, batch.device, batch.same_passes)
        refs = _reference(sequences, logps)
        m = len(batch.examples)
        pc, pr, rc, rr = logps[:m], logps[m:], refs[:m], refs[m:]
        ell = losses.pair_loss(pc, pr, rc, rr, beta=config.beta, loss=config.loss,
                               label_smoothing=config.label_smoothing)
        loss = ell.sum() / batch.totals.examples
        nll = losses.nll_loss(nlls[:m], batch.totals.targets)
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

    name = "kto"
    needs_reference = True

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if config.nll_weight:
            raise UserError("nll_weight applies to the pair losses (sigmoid, ipo, hinge), not kto",
                            options=("nll_weight",))

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        units = ([(record["chosen"], True), (record["rejected"], False)] if "chosen" in record
                 else [(record["completion"], record["label"])])
        prompt_ids = record.get(PROMPT_IDS)
        return [Example(record["id"], [self.encode_conversation(record["prompt"], completion, report, prompt_ids)],
                        desirable=label, prompt=record["prompt"], completion=completion, prompt_ids=prompt_ids)
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
                            # ids where both sides have them: the prompt's, then the completion's
                            ids = examples[i].prompt_ids if examples[j].prompt_ids is not None else None
                            self.partners[i, j] = self.encode_conversation(
                                examples[i].prompt, examples[j].completion, EncodeReport(), ids)
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

    name = "sft"

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        prompt, response = split_prompt(record["messages"])
        sequence = self.encode_conversation(prompt, response, report, record.get(PROMPT_IDS))
        return [Example(record["id"], [sequence], targets=sequence.predicted)]

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        logps, _, tokens = sequence_logps(model, [e.sequences[0] for e in batch.examples], batch.pad_id,
                                          batch.device, batch.same_passes)
        return losses.nll_loss(logps, batch.totals.targets), {"tokens": tokens}

class GRPOObjective(Objective):
    """GRPO (Shao et al. 2024, DeepSeekMath) on multi-turn trajectories: the clipped policy gradient of
    `losses.clipped_surrogate` on the action tokens only, observations masked as in M-DPO, the importance ratio
    against the log-probs the rollout recorded, with the loss types of TRL's GRPOTrainer (grpo, dapo, dr-grpo:
    see `losses`) and DAPO's clip-higher (`epsilon_high`).

    Departures: the old policy is the sampling policy itself (its recorded log-probs, so a pass over the batch
    and the next see the same ratio denominators, as in TRL with vLLM's log-probs); a token without a recorded
    log-prob (one the agent wrote, or a trajectory of another source) has ratio 1; groups whose rewards are all
    equal carry no signal and are dropped before batching (DAPO's dynamic-sampling filter), so they count in no
    denominator; the dr-grpo length constant is `max_completion_length`, by default the most action tokens of
    any trajectory of the run."""

    name = "grpo"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if config.loss not in losses.GRPO_LOSS_TYPES:
            raise UserError(f"loss {config.loss!r}: choose from {', '.join(losses.GRPO_LOSS_TYPES)}",
                            options=("loss",))
        if config.scale_rewards not in losses.REWARD_SCALES:
            raise UserError(f"scale_rewards {config.scale_rewards!r}: choose from {', '.join(losses.REWARD_SCALES)}",
                            options=("scale_rewards",))
        self.needs_reference = config.kl_beta > 0
        self.reference_tokens = True
        self.epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        self.length = config.max_completion_length

    def encode_records(self, records: Sequence[dict[str, Any]]) -> tuple[list[Example], EncodeReport]:
        flat = 0
        advantages: dict[str, float] = {}
        for group in group_by_problem(records).values():
            rewards = [float(r["reward"]) for r in group]
            if len(group) < 2 or max(rewards) == min(rewards):
                flat += 1
                continue
            scaled = losses.group_advantages(rewards, scale=self.config.scale_rewards == "group")
            advantages.update((str(r["id"]), a) for r, a in zip(group, scaled, strict=True))
        kept = [r for r in records if str(r["id"]) in advantages]
        if not kept:
            raise UserError(f"no group has rewards that differ ({flat} group(s), by problem_id): nothing to "
                            "learn; sample more per problem (rollout --n) or harder problems")
        examples, report = super().encode_records(kept)
        for example in examples:
            example.advantage = advantages[example.id]
        if self.length is None and examples:
            self.length = max(e.sequences[0].predicted for e in examples)
        return examples, replace(report, flat_groups=flat)

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        prompt, response = split_prompt(record["messages"])
        sequence = self.encode_conversation(prompt, response, report, record.get(PROMPT_IDS))
        recorded = [float("nan") if x is None else x for x in recorded_action_logprobs(sequence)]
        return [Example(str(record["id"]), [sequence], targets=sequence.predicted, recorded=recorded)]

    def identity(self, examples: list[Example]) -> dict[str, Any]:
        return {"advantages": fingerprint([e.advantage for e in examples]), "length": self.length,
                "epsilon": [self.config.epsilon, self.epsilon_high], "kl_beta": self.config.kl_beta}

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        import torch

        config, totals = self.config, batch.totals
        sequences = [e.sequences[0] for e in batch.examples]
        out = action_token_logps(model, sequences, batch.pad_id, batch.device, batch.same_passes)
        loss = out.logps[0].new_zeros(())
        sums = {name: 0.0 for name in ("advantage", "clip/low", "clip/high", "entropy", "action_tokens", "kl",
                                       "logprob_diff", "recorded_tokens")}
        for example, sequence, logps, entropy in zip(batch.examples, sequences, out.logps, out.entropies,
                                                     strict=True):
            recorded = torch.tensor(example.recorded, device=logps.device, dtype=logps.dtype)
            has = ~torch.isnan(recorded)
            old = torch.where(has, recorded, logps.detach())
            per_token, ratio = losses.clipped_surrogate(logps, old, example.advantage, epsilon=config.epsilon,
                                                        epsilon_high=self.epsilon_high)
            if config.kl_beta:
                kl = losses.k3_kl(logps, torch.tensor(sequence.ref_token_logps, device=logps.device,
                                                       dtype=logps.dtype))
                per_token = per_token + config.kl_beta * kl
                sums["kl"] += kl.detach().sum()
            n = logps.numel()
            if config.loss == "grpo":
                loss = loss + per_token.sum() / max(n, 1) / totals.examples
            elif config.loss == "dapo":
                loss = loss + per_token.sum() / totals.targets
            else:  # dr-grpo
                loss = loss + per_token.sum() / (totals.examples * self.length)
            with torch.no_grad():
                sums["advantage"] += example.advantage
                sums["clip/low"] += ((ratio < 1 - config.epsilon) & (example.advantage < 0)).sum()
                sums["clip/high"] += ((ratio > 1 + self.epsilon_high) & (example.advantage > 0)).sum()
                sums["entropy"] += entropy.sum()
                sums["action_tokens"] += n
                sums["logprob_diff"] += (logps.detach() - old).abs()[has].sum()
                sums["recorded_tokens"] += has.sum()
        return loss, {"tokens": out.tokens, **sums}

    def metrics(self, sums: dict[str, float], totals: StepTotals) -> dict[str, Any]:
        tokens = max(sums["action_tokens"], 1)
        row = {"advantage": sums["advantage"] / totals.examples, "clip_ratio/low": sums["clip/low"] / tokens,
               "clip_ratio/high": sums["clip/high"] / tokens, "entropy": sums["entropy"] / tokens,
               "logprob_diff": sums["logprob_diff"] / sums["recorded_tokens"] if sums["recorded_tokens"] else None}
        if self.config.kl_beta:
            row["kl"] = sums["kl"] / tokens
        return row


class PRMObjective(Objective):
    """The generative PRM's objective (train-prm): the loss on the '+'/'-' label tokens of PRM chats
    (`prm.prm_loss`), read from the logits at the positions before them, averaged over the step's labels.

    Departures from Math-Shepherd (Wang et al. 2024), whose PRM learns its '+'/'-' label tokens by cross-entropy
    (our `--labels hard`): `--labels soft` instead fits P('+') among {'+', '-'} to Q-hat by binary
    cross-entropy, the rest of the vocabulary left out; each step is judged with the true labels of the steps
    before it in context (teacher forcing, as in the published PRM data), while a scorer puts '+' there; a
    trajectory weighs in the mean by its number of steps (the mean is over a step's labels, not its chats).
    """

    name = "prm"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if config.labels not in prm.LABEL_KINDS:
            raise UserError(f"labels {config.labels!r}: choose from {', '.join(prm.LABEL_KINDS)}",
                            options=("labels",))
        if config.steps_mode not in labeling.STEP_MODES:
            raise UserError(f"steps_mode {config.steps_mode!r}: choose from {', '.join(labeling.STEP_MODES)}",
                            options=("steps_mode",))

    def setup(self, tokenizer) -> None:
        super().setup(tokenizer)
        self.label_ids = prm.label_token_ids(tokenizer)

    def encode(self, record: dict[str, Any], report: EncodeReport) -> list[Example]:
        chat, labels, q = prm.training_chat(record, self.config.steps_mode)
        if not labels:  # nothing to learn: counted with the sequences without actions
            report.no_actions += 1
            return []
        encoded = prm.encode_chat(self.tokenizer, chat, self.label_ids)
        label_mask = [0] * len(encoded.input_ids)
        for position in encoded.positions:
            label_mask[position + 1] = 1
        return [Example(record["id"], [Encoded(encoded.input_ids, label_mask)], targets=len(labels),
                        plus=[label == PLUS for label in labels], q=list(q))]

    def identity(self, examples: list[Example]) -> dict[str, Any]:
        return {"labels": self.config.labels, "steps_mode": self.config.steps_mode,
                "q": fingerprint([e.q for e in examples])}

    def loss(self, model, batch: MicroBatch) -> tuple[Any, dict[str, Any]]:
        import torch

        rows = []
        for e in batch.examples:
            chat = e.sequences[0]
            rows.append(prm.EncodedChat(chat.input_ids, [t - 1 for t, label in enumerate(chat.action_mask) if label]))
        logits: list[Any] = [None] * len(rows)
        for group in forward_groups([len(r.input_ids) for r in rows], batch.same_passes):
            for i, z in zip(group, prm.logits_at_labels(model, [rows[i] for i in group], batch.device), strict=True):
                logits[i] = z
        is_plus = torch.tensor([x for e in batch.examples for x in e.plus], device=batch.device)
        q = torch.tensor([x for e in batch.examples for x in e.q], device=batch.device)
        ell = prm.prm_loss(torch.cat(logits), is_plus, q, *self.label_ids, kind=self.config.labels)
        return ell.sum() / batch.totals.targets, {"tokens": sum(len(r.input_ids) for r in rows)}

    def save(self, output_dir: Path, model_path: str, steps: int) -> None:
        prm.write_prm_file(output_dir, label_ids=self.label_ids, base_model=model_path,
                           steps_mode=self.config.steps_mode, labels=self.config.labels, trained_steps=steps)


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
            raise UserError("loss kto needs at least two different prompts: its KL baseline pairs a prompt with "
                            "the completion of another", options=("loss",))
        out.append((i, j))
    return out


def fingerprint(*parts: Any) -> str:
    """sha256 of JSON-able parts: what a run, a cache or a checkpoint is made of."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
