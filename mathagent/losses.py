"""The multi-turn preference objectives (M-DPO, M-KTO) as pure functions of summed action log-probs.

For a trajectory tau = (x, a_1, o_1, ..., a_H) the policy's log-probability that matters is that of its own
actions only:

    log pi(tau) = sum_h log pi(a_h | s_h) = sum over action tokens t of log pi(y_t | y_<t)

The observations o_h come from the code interpreter, deterministic given the state: their tokens are masked
(`action_mask` = 0), so the model is pushed neither toward nor away from text it did not write. With
r(tau) = beta * (log pi(tau) - log pi_ref(tau)) (beta is the paper's eta, the KL coefficient) and a pair
(tau_w, tau_l) sharing the prompt x, h = (log pi(tau_w) - log pi_ref(tau_w)) - (log pi(tau_l) - log pi_ref(tau_l)):

    sigmoid (M-DPO):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: --label-smoothing,
                      conservative DPO; eps = 0 is the paper's loss)
    ipo:              (h - 1 / (2 beta))^2        (on summed log-ratios, as in the IPO paper; TRL averages
                                                   them over tokens)
    hinge:            max(0, 1 - beta h)
    kto (M-KTO):      desirable:   lambda_D (1 - sigmoid(beta (log-ratio(tau) - z0)))
                      undesirable: lambda_U (1 - sigmoid(beta (z0 - log-ratio(tau))))
                      z0 = max(0, mean over mismatched (x_i, completion_j) of the log-ratio), x_i never the
                      prompt of completion j: the KL baseline, a constant (no gradient), estimated from the
                      micro-batches of all processes and clamped once, after their mean
    nll (optional):   -sum of log pi over the chosen action tokens / their number, added with --nll-weight
                      (action tokens also where the loss reads every token after the prompt: the single-turn
                      baseline's NLL term is the same as M-DPO's)

GRPO (train-grpo) is a policy gradient on the same action tokens. A trajectory i of a group (the samples of
one problem) has the advantage A_i = r_i - mean(r) (divided by std(r) + 1e-4 with --scale-rewards group, the
std with Bessel's correction, as TRL's); each of its action tokens t the ratio rho_t = pi(y_t) / pi_old(y_t)
against the sampling policy's recorded log-prob, and the loss

    l_t = -min(rho_t A_i, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A_i) + beta k3_t,
    k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1     (the KL estimator; beta = 0 by default)

reduced by --loss-type: grpo, each trajectory's mean over its tokens, then the mean over trajectories; dapo,
the mean over all the step's tokens; dr-grpo, the sum over tokens divided by trajectories x a constant length.

Every function returns per-example values; the caller reduces them (mean over the pairs of an optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mathagent.errors import UserError

PAIR_LOSSES = ("sigmoid", "ipo", "hinge")
LOSSES = PAIR_LOSSES + ("kto",)
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr-grpo")
REWARD_SCALES = ("group", "none")


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | y_<t) for t = 1..T-1: [B, T-1], in float32 at least (logits [B, T, V], ids [B, T])."""
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    return torch.gather(logits.log_softmax(-1), -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def action_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, action_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probs of the action tokens, and the number of action tokens.

        logp(seq) = sum_t action_mask[t] * log pi(input_ids[t] | input_ids[<t]),  t >= 1

    The logits at position t-1 predict token t. Positions whose next token is not an action (observations,
    prompt, scaffolding, padding) are selected away by `torch.where`, so the loss has exactly zero gradient
    with respect to their logits.
    """
    return masked_sum(token_logps(logits, input_ids), action_mask), action_mask[:, 1:].sum(-1)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of `token_logps`' values [B, T-1] at the positions whose token is 1 in `mask` [B, T],
    by `torch.where` (zero gradient elsewhere)."""
    selected = mask[:, 1:].bool()
    return torch.where(selected, per_token, torch.zeros_like(per_token)).sum(-1)


def rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The implicit reward r(tau) = beta * (log pi(tau) - log pi_ref(tau)), detached (a metric)."""
    return beta * (policy_logps - ref_logps).detach()


def pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair preference loss from summed action log-probs (see the module docstring for the equations)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * h)
    raise UserError(f"loss {loss!r}: choose from {', '.join(LOSSES)}", options=("loss",))


def kl_baseline(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """M-KTO's z0 = max(0, mean log-ratio of mismatched (prompt, completion) pairs), detached.

    The mismatched pairs are the micro-batch's own prompts with other examples' completions, so a micro-batch
    of one example is a `UserError`. Under DDP, `mean_over_processes` averages this process's mean with the
    others' (every micro-batch has as many pairs), and the clamp comes once, after it: clamping each process's
    mean first would move z0 up whenever some of them are negative.
    """
    if policy_kl_logps.numel() < 2:
        raise UserError(
            "loss kto needs at least 2 examples per micro-batch: its KL baseline pairs each prompt with another "
            "example's completion (raise batch_size or lower grad_accum / the number of processes)",
            options=("loss", "batch_size", "grad_accum"),
        )
    mean = (policy_kl_logps - ref_kl_logps).detach().mean()
    if mean_over_processes is not None:
        mean = mean_over_processes(mean)
    return mean.clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example M-KTO loss (desirable: a trajectory labelled good) with the KL baseline z0 = `kl`."""
    ratio = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable.bool(), good, bad)


def nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor | int) -> torch.Tensor:
    """Mean negative log-likelihood per chosen action token: -sum logp / number of tokens."""
    return -chosen_logps.sum() / chosen_tokens


def group_advantages(rewards: list[float], *, scale: bool) -> list[float]:
    """GRPO's advantages of one group's rewards: reward minus the group mean, divided by the group's std (with
    Bessel's correction) + 1e-4 when `scale`. A group needs two samples or more."""
    n = len(rewards)
    mean = sum(rewards) / n
    centred = [r - mean for r in rewards]
    if not scale:
        return centred
    std = (sum(c * c for c in centred) / (n - 1)) ** 0.5
    return [c / (std + 1e-4) for c in centred]


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantage: torch.Tensor | float, *,
                      epsilon: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token clipped policy-gradient loss -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A), and
    the ratios rho = exp(logps - old_logps) (old_logps: the sampling policy's, no gradient)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    return -torch.min(ratio * advantage, clipped * advantage), ratio


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1, d = log pi_ref - log pi."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1
