"""The M-DPO / M-KTO objectives as pure functions: exact values against hand computations in float64."""

import math

import pytest
import torch

from mathagent import losses
from mathagent.errors import UserError


def _pairs():
    # summed action log-probs of 3 pairs: policy chosen/rejected, reference chosen/rejected
    pc = torch.tensor([-10.0, -4.0, -7.5], dtype=torch.float64)
    pr = torch.tensor([-12.0, -3.0, -7.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -4.5, -7.0], dtype=torch.float64)
    rr = torch.tensor([-11.5, -3.5, -8.0], dtype=torch.float64)
    return pc, pr, rc, rr


def _h(i):
    pc, pr, rc, rr = (x[i].item() for x in _pairs())
    return (pc - rc) - (pr - rr)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_margin(eps):
    beta = 0.1
    got = losses.pair_loss(*_pairs(), beta=beta, loss="sigmoid", label_smoothing=eps)
    want = [-(1 - eps) * _log_sigmoid(beta * _h(i)) - eps * _log_sigmoid(-beta * _h(i)) for i in range(3)]
    assert got.tolist() == pytest.approx(want, abs=1e-15)
    assert losses.pair_loss(*_pairs(), beta=beta)[0].item() == pytest.approx(math.log(1 + math.exp(-beta * 1.5)))


def test_ipo_and_hinge_losses():
    beta = 0.5
    ipo = losses.pair_loss(*_pairs(), beta=beta, loss="ipo")
    hinge = losses.pair_loss(*_pairs(), beta=beta, loss="hinge")
    assert ipo.tolist() == pytest.approx([(_h(i) - 1 / (2 * beta)) ** 2 for i in range(3)], abs=1e-15)
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - beta * _h(i)) for i in range(3)], abs=1e-15)
    with pytest.raises(UserError, match="^loss 'nope': choose from") as refused:
        losses.pair_loss(*_pairs(), beta=beta, loss="nope")
    assert refused.value.options == ("loss",)  # the CLI writes it as --loss


def test_rewards_are_beta_times_the_log_ratio():
    pc, _, rc, _ = _pairs()
    assert losses.rewards(pc, rc, 0.1).tolist() == pytest.approx([0.1, 0.05, -0.05], abs=1e-15)


def test_kto_loss_against_its_kl_baseline():
    policy = torch.tensor([-5.0, -6.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-6.0, -5.0, -2.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    kl = losses.kl_baseline(torch.tensor([-9.0, -8.0], dtype=torch.float64),
                            torch.tensor([-9.5, -8.1], dtype=torch.float64))
    assert kl.item() == pytest.approx(0.3)
    got = losses.kto_loss(policy, ref, desirable, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [1 - sig(0.2 * (1.0 - 0.3)), 1.5 * (1 - sig(0.2 * (0.3 - (-1.0)))), 1 - sig(0.2 * (0.5 - 0.3))]
    assert got.tolist() == pytest.approx(want, abs=1e-15)


def test_kto_kl_baseline_is_never_negative_and_carries_no_gradient():
    policy = torch.tensor([-9.0, -8.0], requires_grad=True)
    kl = losses.kl_baseline(policy, torch.tensor([-1.0, -1.0]))
    assert kl.item() == 0.0 and not kl.requires_grad


def test_kto_kl_baseline_is_clamped_once_after_the_mean_over_processes():
    """Under DDP z0 = max(0, mean of all processes' mismatched log-ratios): here this process's mean is -1 and
    the other's 2, so z0 = 0.5. Clamping each process's mean first would give (0 + 2) / 2 = 1."""
    other_process = torch.tensor(2.0, dtype=torch.float64)
    mean_over_processes = lambda mean: torch.stack([mean, other_process]).mean()  # noqa: E731
    kl = losses.kl_baseline(torch.tensor([-4.0, -3.0], dtype=torch.float64),
                            torch.tensor([-3.0, -2.0], dtype=torch.float64), mean_over_processes)
    assert kl.item() == pytest.approx(0.5, abs=1e-15)
    assert losses.kl_baseline(torch.tensor([-4.0, -3.0]), torch.tensor([-3.0, -2.0]),
                              lambda mean: torch.stack([mean, torch.tensor(0.5)]).mean()).item() == 0.0


def test_kto_needs_two_examples_per_micro_batch():
    with pytest.raises(UserError, match="at least 2 examples per micro-batch"):
        losses.kl_baseline(torch.tensor([-1.0]), torch.tensor([-1.0]))


def test_nll_is_the_mean_over_action_tokens():
    assert losses.nll_loss(torch.tensor([-6.0, -4.0]), 5).item() == pytest.approx(2.0)


def test_action_logps_sum_only_the_action_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]])
    logps, counts = losses.action_logps(logits, ids, mask)
    logp = torch.log_softmax(logits, -1)
    want0 = logp[0, 0, 2] + logp[0, 1, 3] + logp[0, 3, 5]
    want1 = logp[1, 1, 4] + logp[1, 2, 3]
    assert logps.tolist() == pytest.approx([want0.item(), want1.item()], abs=1e-12)
    assert counts.tolist() == [3, 2]


def test_masked_positions_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9, requires_grad=True)
    ids = torch.randint(0, 9, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 1, 1]])
    logps, _ = losses.action_logps(logits, ids, mask)
    loss = losses.pair_loss(logps[:1], logps[1:], torch.zeros(1), torch.zeros(1), beta=0.1).sum()
    loss.backward()
    grad = logits.grad
    for b in range(2):
        for t in range(5):  # logits at t predict token t + 1
            if mask[b, t + 1]:
                assert grad[b, t].abs().sum() > 0
            else:
                assert torch.equal(grad[b, t], torch.zeros(9))
        assert torch.equal(grad[b, 5], torch.zeros(9))
