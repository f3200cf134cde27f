r"""The process reward model: its data, its loss, and one-pass scoring.

A generative PRM is a causal LM kept as a multi-turn chat: user turn h is step h of a trajectory (the first
one also carries the question), and the assistant answers one label token, '+' or '-'. Its prediction for
step h is read at the position just before that label:

    p_h = P_theta('+' | s_h, a_h) = exp(z_+) / (exp(z_+) + exp(z_-)) = sigmoid(z_+ - z_-)

where z is the logit vector at that position. Training puts the loss on the label tokens only, over the N
labels of an optimizer step:

    hard:  L = -(1/N) sum_h log softmax(z^h)[y_h]                    (standard SFT cross-entropy, y_h in {'+','-'})
    soft:  L = -(1/N) sum_h [q_h log p_h + (1 - q_h) log(1 - p_h)]   (binary cross-entropy against Q-hat)

with q_h the Monte-Carlo estimate of `mathagent.labeling`. This module owns the PRM's data, its loss, prm.json
beside a trained PRM, and scoring; train-prm trains it with `objectives.PRMObjective` in the recipe of every
training command (`training.train`: DDP, accumulation, checkpoints).

Scoring a trajectory renders its chat with '+' in every assistant turn (each step is judged given that the
steps before it were accepted, as a per-prefix scorer does) and reads every p_h from ONE forward pass: causal
attention makes the logits at position t a function of tokens 0..t only, so each label position sees exactly
the prompt a per-prefix scorer would send.
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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathagent.chat import prompt_ids, right_pad
from mathagent.errors import UserError
from mathagent.labeling import MINUS, PLUS, split_steps
from mathagent.records import split_prompt

LABEL_KINDS = ("hard", "soft")
AGGREGATES = ("min", "mean", "last", "prod")
DEFAULT_AGGREGATE = "min"  # Math-Shepherd's; see docs/prm.md
PRM_FILE = "prm.json"  # beside a trained PRM: its label strings and how it was trained


# --------------------------------------------------------------------------------------------------------
# Data: trajectories to PRM chats
# --------------------------------------------------------------------------------------------------------


def question_text(messages: Sequence[dict[str, str]]) -> str:
    """The prompt (what comes before the first action), the system prompt left out (it instructs the policy, not
    the PRM)."""
    return "\n\n".join(m["content"] for m in split_prompt(messages)[0] if m["role"] != "system")


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
    prompt alone (`chat.prompt_ids`); a tokenizer whose merges cross the place where the prompt ends makes
    them differ, and then `exact` is False."""
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
    """The PRM loss of each of N labels: `label_logits` [N, V], `is_plus` [N] bool (hard labels), `q` [N] in
    [0, 1] (soft labels); the caller averages them (over the labels of an optimizer step).

    hard: -log softmax(z)[y]                            (cross-entropy over the whole vocabulary)
    soft: -q log sigmoid(d) - (1 - q) log(1 - sigmoid(d)),   d = z_+ - z_-
    """
    import torch
    import torch.nn.functional as F

    if kind == "hard":
        targets = torch.where(is_plus, torch.tensor(plus_id), torch.tensor(minus_id)).to(label_logits.device)
        return F.cross_entropy(label_logits.float(), targets, reduction="none")
    if kind == "soft":
        margin = (label_logits[:, plus_id] - label_logits[:, minus_id]).float()
        return F.binary_cross_entropy_with_logits(margin, q.to(margin), reduction="none")
    raise UserError(f"labels {kind!r}: choose from {', '.join(LABEL_KINDS)}", options=("labels",))


def aggregate(step_scores: Sequence[float], how: str = DEFAULT_AGGREGATE) -> float | None:
    """One trajectory score from its step scores: min, mean, last or prod; None without steps."""
    if how not in AGGREGATES:
        raise UserError(f"aggregate {how!r}: choose from {', '.join(AGGREGATES)}", options=("aggregate",))
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


def logits_at_labels(model, rows: Sequence[EncodedChat], device) -> list:
    """One forward pass over a right-padded batch; the logits [n_labels, V] at each row's label positions.

    Only the label positions go through the LM head (`logits_to_keep`), not the whole sequence."""
    import torch

    ids, mask = right_pad([r.input_ids for r in rows], 0)
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
            for i, logits in zip(rows, logits_at_labels(model, [encoded[i] for i in rows], device), strict=True):
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
                (logits,) = logits_at_labels(model, [row], device)
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
# Training: what train-prm writes and reads beside its objective (`objectives.PRMObjective`)
# --------------------------------------------------------------------------------------------------------


def held_out_accuracy(model_dir: str, records: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    """train-prm --eval: the label accuracy of the saved PRM on held-out records, and how many labels it read."""
    model, tokenizer = load_prm(model_dir)
    examples = [training_chat(r, mode)[:2] for r in records]
    return {"eval_accuracy": label_accuracy(model, tokenizer, examples),
            "eval_labels": sum(len(step_labels) for _, step_labels in examples)}


def write_prm_file(output_dir: Path, *, label_ids: tuple[int, int], base_model: str, steps_mode: str, labels: str,
                   trained_steps: int) -> None:
    """OUTPUT_DIR/prm.json beside a trained PRM: its label strings and token ids, and how it was trained."""
    (Path(output_dir) / PRM_FILE).write_text(json.dumps({
        "plus": PLUS, "minus": MINUS, "label_token_ids": list(label_ids), "base_model": base_model,
        "steps_mode": steps_mode, "labels": labels, "trained_steps": trained_steps,
    }, indent=2))


def trained_steps_mode(model: str) -> str:
    """What a step was for the PRM in directory `model` (its prm.json's `steps_mode`); 'turns' without one."""
    path = Path(model) / PRM_FILE
    return json.loads(path.read_text()).get("steps_mode", "turns") if path.is_file() else "turns"


def load_prm(path: str, dtype: str = "auto"):
    """(model, tokenizer) of a saved PRM: a full model, or a LoRA adapter on its base (with peft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathagent.engines.hf import pick_dtype

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (Path(path) / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"model {path!r}: cannot load: {e}", options=("model",)) from None
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer
