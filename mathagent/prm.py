r"""The process reward model: its data, its objective, and one-pass scoring.

A generative PRM is a causal LM kept as a multi-turn chat: user turn h is step h of a trajectory (the first
one also carries the question), and the assistant answers one label token, '+' or '-'. Its prediction for
step h is read at the position just before that label:

    p_h = P_theta('+' | s_h, a_h) = exp(z_+) / (exp(z_+) + exp(z_-)) = sigmoid(z_+ - z_-)

where z is the logit vector at that position. Training puts the loss on the label tokens only:

    hard:  L = -(1/N) sum_h log softmax(z^h)[y_h]                    (standard SFT cross-entropy, y_h in {'+','-'})
    soft:  L = -(1/N) sum_h [q_h log p_h + (1 - q_h) log(1 - p_h)]   (binary cross-entropy against Q-hat)

with q_h the Monte-Carlo estimate of `mathagent.labeling`. Scoring a trajectory renders its chat with '+' in
every assistant turn (each step is judged given that the steps before it were accepted, as a per-prefix
scorer does) and reads every p_h from ONE forward pass: causal attention makes the logits at position t a
function of tokens 0..t only, so each label position sees exactly the prompt a per-prefix scorer would send.
The positions come from the chat template's structure (`mathagent.chat.label_positions`), never from a fixed
token offset; that the tokens before each position are exactly the per-prefix prompt is checked, and a
conversation for which it fails is scored prefix by prefix instead (counted, reported).

The aggregate of a trajectory's step scores is one of min (Math-Shepherd's, the default: our labels are its
labels), prod (PRM800K's, Lightman et al. 2023), mean (RLHFlow's released PRM code, the M-DPO authors'), or
last; docs/prm.md says why min is the default.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mathagent.errors import UserError
from mathagent.labeling import MINUS, PLUS, split_steps

LABEL_KINDS = ("hard", "soft")
AGGREGATES = ("min", "mean", "last", "prod")
DEFAULT_AGGREGATE = "min"  # Math-Shepherd's; see docs/prm.md
PRM_FILE = "prm.json"  # beside a trained PRM: its label strings and how it was trained


# --------------------------------------------------------------------------------------------------------
# Data: trajectories to PRM chats
# --------------------------------------------------------------------------------------------------------


def question_text(messages: Sequence[dict[str, str]]) -> str:
    """What comes before the first action, the system prompt left out (it instructs the policy, not the PRM)."""
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            break
        if m["role"] != "system":
            parts.append(m["content"])
    return "\n\n".join(parts)


def step_chat(messages: Sequence[dict[str, str]], labels: Sequence[str] | None = None,
              mode: str = "turns") -> list[dict[str, str]]:
    """The PRM chat of a trajectory: user = step text (the question before the first), assistant = label.

    Without `labels` every assistant turn is '+', the placeholder a scorer reads its predictions under."""
    steps = split_steps(messages, mode)
    if labels is None:
        labels = [PLUS] * len(steps)
    if len(labels) != len(steps):
        raise UserError(f"{len(labels)} labels for {len(steps)} steps (were the labels made with another --steps?)")
    question = question_text(messages)
    chat: list[dict[str, str]] = []
    for h, (step, label) in enumerate(zip(steps, labels, strict=True)):
        chat.append({"role": "user", "content": f"{question}\n\n{step.text}" if h == 0 else step.text})
        chat.append({"role": "assistant", "content": label})
    return chat


def prm_example(trajectory: dict[str, Any], mode: str = "turns") -> dict[str, Any]:
    """A labeled trajectory (with `steps` from mc-label) as a PRM training example: every field but `messages`
    and `steps` kept, `messages` = the PRM chat, `labels` = the hard labels, `q` = the soft ones (Q-hat)."""
    steps = trajectory["steps"]
    example = {k: v for k, v in trajectory.items() if k not in ("messages", "steps")}
    example["messages"] = step_chat(trajectory["messages"], [s["label"] for s in steps], mode)
    example["labels"] = [s["label"] for s in steps]
    example["q"] = [s["q"] for s in steps]
    return example


def check_training_record(record: dict[str, Any], mode: str, kind: str) -> str | None:
    """What train-prm accepts: a PRM example (`messages` alternating user / '+'|'-', `labels`, `q` for soft
    labels) or a labeled trajectory (`messages` and `steps`)."""
    if "steps" in record:
        steps = record["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, dict) and s.get("label") in (PLUS, MINUS)
                                                  and isinstance(s.get("q"), (int, float)) for s in steps):
            return "field 'steps' must be a list of {\"q\": number, \"label\": \"+\" or \"-\"}"
        if len(steps) != len(split_steps(record["messages"], mode)):
            return f"{len(steps)} step labels for {len(split_steps(record['messages'], mode))} steps (--steps {mode})"
        return None
    labels = record.get("labels")
    if not isinstance(labels, list) or not all(label in (PLUS, MINUS) for label in labels):
        return "expected a PRM example (field 'labels': a list of \"+\"/\"-\") or a labeled trajectory (field 'steps')"
    assistant = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    if assistant != labels:
        return "the assistant turns of 'messages' must be the 'labels', in order"
    if kind == "soft":
        q = record.get("q")
        if not isinstance(q, list) or len(q) != len(labels) or not all(
                isinstance(x, (int, float)) and 0 <= x <= 1 for x in q):
            return "--labels soft needs field 'q': one number in [0, 1] per label"
    return None


def training_chat(record: dict[str, Any], mode: str) -> tuple[list[dict[str, str]], list[str], list[float]]:
    """(chat, hard labels, soft labels) of a record accepted by `check_training_record`."""
    if "steps" in record:
        example = prm_example(record, mode)
        return example["messages"], example["labels"], example["q"]
    labels = record["labels"]
    q = record.get("q") or [1.0 if label == PLUS else 0.0 for label in labels]
    return record["messages"], labels, [float(x) for x in q]


# --------------------------------------------------------------------------------------------------------
# Tokens: where the labels are
# --------------------------------------------------------------------------------------------------------


def label_token_ids(tokenizer, plus: str = PLUS, minus: str = MINUS) -> tuple[int, int]:
    """The token ids of '+' and '-' as the chat template puts them in an assistant turn."""
    from mathagent.chat import tokenize_conversation

    ids = []
    for label in (plus, minus):
        conv = tokenize_conversation(tokenizer, [{"role": "user", "content": "1 + 1 = 2"},
                                                 {"role": "assistant", "content": label}])
        span = next(s for s in conv.spans if s.action_start is not None)
        if span.content_end - span.action_start != 1:
            raise UserError(f"the label {label!r} is not one token of its own under this tokenizer's chat template")
        ids.append(conv.input_ids[span.action_start])
    if ids[0] == ids[1]:
        raise UserError(f"the labels {plus!r} and {minus!r} are the same token")
    return ids[0], ids[1]


@dataclass
class EncodedChat:
    input_ids: list[int]
    positions: list[int]  # positions[h]: the logits there predict label h
    exact: bool = True  # every input_ids[:positions[h] + 1] is what a per-prefix scorer sends for step h


def encode_chat(tokenizer, chat: Sequence[dict[str, str]], label_ids: tuple[int, int], *,
                check_prefixes: bool = False) -> EncodedChat:
    """Token ids of a PRM chat and its label positions, found from the template's structure.

    With `check_prefixes`, also compare the tokens before each label with the tokenization of that step's
    prompt alone (`agent.prompt_ids`); a tokenizer whose merges cross the place where the prompt ends makes
    them differ, and then `exact` is False."""
    from mathagent.agent import prompt_ids
    from mathagent.chat import label_positions, tokenize_conversation

    conv = tokenize_conversation(tokenizer, chat)
    positions = label_positions(conv)
    expected = [label_ids[0] if m["content"] == PLUS else label_ids[1] for m in chat if m["role"] == "assistant"]
    found = [conv.input_ids[p + 1] for p in positions]
    if found != expected:
        raise UserError("a label token differs in context from the template's '+'/'-' token")
    exact = True
    if check_prefixes:
        assistant_turns = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
        for position, i in zip(positions, assistant_turns, strict=True):
            if prompt_ids(tokenizer, list(chat[:i])) != conv.input_ids[: position + 1]:
                exact = False
                break
    return EncodedChat(conv.input_ids, positions, exact)


# --------------------------------------------------------------------------------------------------------
# The objective (pure functions of logits)
# --------------------------------------------------------------------------------------------------------


def plus_probability(label_logits, plus_id: int, minus_id: int):
    """p = P('+') among {'+', '-'} = sigmoid(z_+ - z_-), for logits [..., V] at label positions."""
    import torch

    return torch.sigmoid(label_logits[..., plus_id] - label_logits[..., minus_id])


def prm_loss(label_logits, is_plus, q, plus_id: int, minus_id: int, kind: str = "hard"):
    """The PRM loss over N labels, averaged: `label_logits` [N, V], `is_plus` [N] bool (hard labels), `q` [N]
    in [0, 1] (soft labels).

    hard: -(1/N) sum log softmax(z)[y]                            (cross-entropy over the whole vocabulary)
    soft: -(1/N) sum q log sigmoid(d) + (1 - q) log(1 - sigmoid(d)),   d = z_+ - z_-
    """
    import torch
    import torch.nn.functional as F

    if kind == "hard":
        targets = torch.where(is_plus, torch.tensor(plus_id), torch.tensor(minus_id)).to(label_logits.device)
        return F.cross_entropy(label_logits.float(), targets)
    if kind == "soft":
        margin = (label_logits[:, plus_id] - label_logits[:, minus_id]).float()
        return F.binary_cross_entropy_with_logits(margin, q.to(margin))
    raise UserError(f"--labels {kind!r}: choose from {', '.join(LABEL_KINDS)}")


def aggregate(step_scores: Sequence[float], how: str = DEFAULT_AGGREGATE) -> float | None:
    """One trajectory score from its step scores: min, mean, last or prod; None without steps."""
    if how not in AGGREGATES:
        raise UserError(f"--aggregate {how!r}: choose from {', '.join(AGGREGATES)}")
    if not step_scores:
        return None
    if how == "min":
        return min(step_scores)
    if how == "mean":
        return sum(step_scores) / len(step_scores)
    if how == "last":
        return step_scores[-1]
    return math.prod(step_scores)


# --------------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------------


def _label_logits(model, rows: Sequence[EncodedChat], device) -> list:
    """One forward pass over a right-padded batch; the logits [n_labels, V] at each row's label positions.

    Only the label positions go through the LM head (`logits_to_keep`), not the whole sequence."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: a causal model's real positions never see the pads
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    keep = sorted({p for r in rows for p in r.positions})
    column = {p: j for j, p in enumerate(keep)}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   logits_to_keep=torch.tensor(keep, device=device)).logits
    return [logits[i, [column[p] for p in r.positions]] for i, r in enumerate(rows)]


def _device(model):
    return next(model.parameters()).device


@dataclass
class ScoreReport:
    trajectories: int = 0
    steps: int = 0
    forward_passes: int = 0
    per_prefix: int = 0  # conversations scored prefix by prefix: their template tokenizes a prompt differently
    seconds: float = 0.0


def score_chats(model, tokenizer, chats: Sequence[Sequence[dict[str, str]]], *, batch_size: int = 8,
                label_ids: tuple[int, int] | None = None, report: ScoreReport | None = None) -> list[list[float]]:
    """p_h = P('+') at every label of every chat, one forward pass per chat (batched)."""
    import torch

    from mathagent.agent import prompt_ids

    label_ids = label_ids or label_token_ids(tokenizer)
    report = report if report is not None else ScoreReport()
    device = _device(model)
    encoded = [encode_chat(tokenizer, chat, label_ids, check_prefixes=True) for chat in chats]
    scores: list[list[float]] = [[] for _ in chats]
    one_pass = [i for i, e in enumerate(encoded) if e.exact and e.positions]
    # Longest first, so that a batch holds rows of similar length and padding stays small.
    one_pass.sort(key=lambda i: -len(encoded[i].input_ids))
    with torch.inference_mode():
        for lo in range(0, len(one_pass), batch_size):
            rows = one_pass[lo : lo + batch_size]
            for i, logits in zip(rows, _label_logits(model, [encoded[i] for i in rows], device), strict=True):
                scores[i] = plus_probability(logits.float(), *label_ids).tolist()
            report.forward_passes += 1
        for i, e in enumerate(encoded):
            if e.exact or not e.positions:
                continue
            report.per_prefix += 1
            chat = chats[i]
            for turn, m in enumerate(chat):
                if m["role"] != "assistant":
                    continue
                ids = prompt_ids(tokenizer, list(chat[:turn]))
                row = EncodedChat(ids, [len(ids) - 1])
                (logits,) = _label_logits(model, [row], device)
                scores[i].append(plus_probability(logits.float(), *label_ids).item())
                report.forward_passes += 1
    report.steps += sum(len(s) for s in scores)
    return scores


def score_trajectories(model, tokenizer, trajectories: list[dict[str, Any]], *, mode: str = "turns",
                       how: str = DEFAULT_AGGREGATE, field: str = "score", batch_size: int = 8) -> ScoreReport:
    """Set `step_scores` (p_h per step) and `field` (their aggregate) on every trajectory, in place."""
    start = time.perf_counter()
    report = ScoreReport(trajectories=len(trajectories))
    chats = [step_chat(t["messages"], mode=mode) for t in trajectories]
    scores = score_chats(model, tokenizer, chats, batch_size=batch_size, report=report)
    for t, step_scores in zip(trajectories, scores, strict=True):
        t["step_scores"] = step_scores
        t[field] = aggregate(step_scores, how)
    report.seconds = time.perf_counter() - start
    return report


def label_accuracy(model, tokenizer, examples: Sequence[tuple[list[dict[str, str]], list[str]]], *,
                   batch_size: int = 8) -> float:
    """Fraction of labels predicted right (p > 0.5 iff '+') when each chat is scored as a scorer does, with
    '+' placeholders in the assistant turns."""
    chats = [[{**m, "content": PLUS} if m["role"] == "assistant" else m for m in chat] for chat, _ in examples]
    scores = score_chats(model, tokenizer, chats, batch_size=batch_size)
    right = [(p > 0.5) == (label == PLUS) for s, (_, labels) in zip(scores, examples, strict=True)
             for p, label in zip(s, labels, strict=True)]
    return sum(right) / len(right) if right else float("nan")


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    labels: str = "hard"  # hard: cross-entropy on the label token; soft: BCE of P('+') against Q-hat
    lora: bool = False  # a peft LoRA on every linear layer instead of all weights
    lora_rank: int = 16
    lora_alpha: int = 32
    merge_lora: bool = False  # save the LoRA merged into the base model (loads without peft)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    max_length: int | None = None  # longer examples are dropped (counted)
    save_every: int = 0  # a checkpoint every this many steps (0: only the final model)
    seed: int = 0
    precision: str = "auto"  # see training.choose_precision: bf16 autocast on a GPU that has it, else fp32
    report_to: str = "none"  # trackers beside OUTPUT_DIR/metrics.jsonl (see training.report_targets)


@dataclass
class TrainReport:
    examples: int = 0
    labels: int = 0
    too_long: int = 0
    steps: int = 0
    resumed_from: int = 0
    loss: float = float("nan")  # mean loss over the last tenth of the steps
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def _load_model(model_path: str, config: TrainConfig, checkpoint: Path | None):
    """The model to train, fp32 weights (as `training.load_model` gives them), from a checkpoint if any."""
    import torch

    from mathagent.training import load_model

    model = load_model(str(checkpoint) if checkpoint is not None and not config.lora else model_path)
    if config.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                task_type="CAUSAL_LM"))
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _save_checkpoint(model, optimizer, out_dir: Path, step: int, config: TrainConfig) -> None:
    """OUT/checkpoints/step-N (as mathagent.training lays them out): weights or adapter, optimizer, step.
    Written beside and renamed, so a killed save never leaves a checkpoint that looks complete."""
    import torch

    from mathagent.training import CHECKPOINTS_KEPT, checkpoints

    root = out_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    path, staging = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(config)}))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    for old in checkpoints(out_dir)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old)


def train_prm(
    records: Sequence[dict[str, Any]],
    model_path: str,
    out_dir: str,
    config: TrainConfig,
    *,
    mode: str = "turns",
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainReport:
    """Fine-tune `model_path` as a PRM on `records` (PRM examples or labeled trajectories) and save it to
    `out_dir` (a model transformers loads, its tokenizer, and prm.json); checkpoints go to
    `out_dir/checkpoints/step-N`, and `resume` continues from the latest one. One row per step (step, loss,
    grad_norm, learning_rate, epoch) goes to `out_dir/metrics.jsonl` and the trackers of `config.report_to`."""
    import contextlib

    import torch
    from transformers import AutoTokenizer

    from mathagent.training import MetricsLog, checkpoints, choose_precision, report_targets

    if config.labels not in LABEL_KINDS:
        raise UserError(f"--labels {config.labels!r}: choose from {', '.join(LABEL_KINDS)}")
    report_targets(config.report_to)
    start = time.perf_counter()
    log = log or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    label_ids = label_token_ids(tokenizer)
    report = TrainReport()
    data = []  # (encoded chat, is_plus, q)
    for record in records:
        chat, labels, q = training_chat(record, mode)
        if not labels:
            continue
        encoded = encode_chat(tokenizer, chat, label_ids)
        if config.max_length is not None and len(encoded.input_ids) > config.max_length:
            report.too_long += 1
            continue
        data.append((encoded, [label == PLUS for label in labels], q))
    if not data:
        raise UserError("no training example with a label (after the --max-length filter)")
    report.examples = len(data)
    report.labels = sum(len(d[1]) for d in data)

    batches_per_epoch = math.ceil(len(data) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * batches_per_epoch))
    precision = choose_precision(config.precision)
    checkpoint, first_step = None, 0
    if resume and not checkpoints(out) and (out / PRM_FILE).exists():
        log(f"train-prm: {out} already holds a finished PRM; nothing to resume")
        report.resumed_from = json.loads((out / PRM_FILE).read_text()).get("trained_steps", 0)
        report.seconds = time.perf_counter() - start
        return report
    if resume and checkpoints(out):
        checkpoint = checkpoints(out)[-1]
        first_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
        for name in ("labels", "lora", "lora_rank", "batch_size", "seed"):
            if saved[name] != getattr(config, name):
                raise UserError(f"--resume: {checkpoint} was trained with {name}={saved[name]!r}, not {getattr(config, name)!r}")
        report.resumed_from = first_step
        log(f"train-prm: resuming from {checkpoint}")
    torch.manual_seed(config.seed)
    model = _load_model(model_path, config, checkpoint)
    device = _device(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    if checkpoint is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device))
    model.train()
    metrics_log = MetricsLog(out, config.report_to, start_step=first_step, config=asdict(config))
    try:
        order: list[int] = []
        for step in range(first_step, total):
            epoch, index = divmod(step, batches_per_epoch)
            if index == 0 or not order:  # the epoch's order depends on (seed, epoch) alone: resuming replays it
                order = list(range(len(data)))
                random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
            batch = [data[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * min(1.0, (step + 1) / max(1, config.warmup_steps))
            autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                logits = torch.cat(_label_logits(model, [b[0] for b in batch], device))
            is_plus = torch.tensor([x for b in batch for x in b[1]], device=device)
            q = torch.tensor([x for b in batch for x in b[2]], device=device)
            loss = prm_loss(logits, is_plus, q, *label_ids, kind=config.labels)
            loss.backward()
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report.losses.append(loss.item())
            done = step + 1
            metrics_log.write({"step": done, "loss": loss.item(), "grad_norm": grad_norm, "learning_rate": lr,
                               "epoch": done / batches_per_epoch})
            if done % max(1, total // 10) == 0 or done == total:
                log(f"train-prm: step {done}/{total} loss {loss.item():.4f}")
            if config.save_every and done % config.save_every == 0 and done < total:
                _save_checkpoint(model, optimizer, out, done, config)
    finally:
        metrics_log.close()
    report.steps = total - first_step
    tail = report.losses[-max(1, len(report.losses) // 10):]
    report.loss = sum(tail) / len(tail) if tail else float("nan")

    model.eval()
    if config.lora and config.merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / PRM_FILE).write_text(json.dumps({
        "plus": PLUS, "minus": MINUS, "label_token_ids": list(label_ids), "base_model": model_path,
        "steps_mode": mode, "trained_steps": total, "config": asdict(config),
    }, indent=2))
    for old in checkpoints(out):  # the final model supersedes them
        shutil.rmtree(old)
    report.seconds = time.perf_counter() - start
    return report


def load_prm(path: str, dtype: str = "auto"):
    """(model, tokenizer) of a saved PRM: a full model, or a LoRA adapter on its base (with peft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathagent.engines.hf import _pick_dtype

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (Path(path) / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=_pick_dtype(dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_pick_dtype(dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {path!r}: cannot load: {e}") from None
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer
