"""PRIME's implicit process reward (Cui et al. 2025, "Process Reinforcement through Implicit Rewards"): a policy
trained with a log-ratio objective (M-DPO, M-KTO) against its reference is a process reward model for free.

The reward of step h of a trajectory (its action a_h; observations carry none, as in M-DPO) is

    r_h = beta * sum over a_h's tokens t of (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))

so summed over the steps it is the trajectory's implicit reward beta * log pi(tau)/pi_ref(tau), the quantity
M-DPO's loss ranks. The step scores aggregate like a trained PRM's (`AGGREGATES`), and `mathagent evaluate
--score-field` reranks best-of-n with them. Both models read the trajectory's own token ids (`tokens`), so the
scores are of the tokens that were sampled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mathagent.batches import Encoded, action_token_logps
from mathagent.errors import UserError
from mathagent.prm import ScoreReport
from mathagent.records import PROMPT_IDS, TOKEN_IDS, split_prompt
from mathagent.tokens import complete_ids, conversation_from_ids

AGGREGATES = ("min", "mean", "last", "sum")


def aggregate(step_scores: Sequence[float], how: str) -> float | None:
    """One trajectory score from its step rewards; None without steps."""
    if how not in AGGREGATES:
        raise UserError(f"aggregate {how!r}: choose from {', '.join(AGGREGATES)} (implicit rewards are log-ratios)",
                        options=("aggregate",))
    if not step_scores:
        return None
    return {"min": min, "sum": sum, "last": lambda s: s[-1],
            "mean": lambda s: sum(s) / len(s)}[how](step_scores)


def _encoded(tokenizer, trajectory: dict[str, Any]) -> tuple[Encoded, list[int]]:
    """The trajectory as its ids (those it lacks computed as rollout would) and the token count of each action."""
    t = {PROMPT_IDS: trajectory.get(PROMPT_IDS), "messages": [dict(m) for m in trajectory["messages"]]}
    complete_ids(tokenizer, t)
    _, response = split_prompt(t["messages"])
    conv = conversation_from_ids(t[PROMPT_IDS], response)
    return Encoded(conv.input_ids, conv.action_mask), [len(m[TOKEN_IDS]) for m in response if m["role"] == "assistant"]


def step_rewards(policy, reference, tokenizer, trajectories: Sequence[dict[str, Any]], *, beta: float,
                 batch_size: int = 8, report: ScoreReport | None = None) -> list[list[float]]:
    """r_h of every action of every trajectory, in order (one forward pass of each model per batch)."""
    import torch

    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encoded(tokenizer, t) for t in trajectories]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0].input_ids))  # less padding
    out: list[list[float]] = [[] for _ in trajectories]
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            sequences = [encoded[i][0] for i in chunk]
            mine = action_token_logps(policy, sequences, pad_id, device).logps
            theirs = action_token_logps(reference, sequences, pad_id, device).logps
            for i, lp, ref in zip(chunk, mine, theirs, strict=True):
                ratios = (lp.double() - ref.double()).split(encoded[i][1])
                out[i] = [beta * r.sum().item() for r in ratios]
            if report is not None:
                report.forward_passes += 2
    if report is not None:
        report.steps += sum(len(s) for s in out)
    return out


def score_trajectories(policy, reference, tokenizer, trajectories: list[dict[str, Any]], *, beta: float, how: str,
                       field: str, batch_size: int = 8) -> ScoreReport:
    """Set `step_scores` (r_h per action) and `field` (their aggregate) on every trajectory, in place."""
    start = time.perf_counter()
    report = ScoreReport(trajectories=len(trajectories))
    for t, scores in zip(trajectories, step_rewards(policy, reference, tokenizer, trajectories, beta=beta,
                                                    batch_size=batch_size, report=report), strict=True):
        t["step_scores"] = scores
        t[field] = aggregate(scores, how)
    report.seconds = time.perf_counter() - start
    return report
