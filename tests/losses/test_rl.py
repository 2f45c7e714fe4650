"""The online methods' tensor functions against hand-computed values (the arithmetic in each docstring)."""

import math

import pytest
import torch

from simpo_lightning.losses import rl


def test_group_advantages_normalise_within_each_group():
    """Rewards [1, 0 | 3, 3 | 0, 2] in groups of 2: means 0.5, 3, 1; stds (Bessel, n - 1 = 1) √0.5, 0, √2:
    advantages ±0.5/(√0.5 + 1e-4), 0 (equal rewards), ∓1/(√2 + 1e-4)."""
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    a, b = 0.5 / (math.sqrt(0.5) + 1e-4), 1 / (math.sqrt(2) + 1e-4)
    expected = torch.tensor([a, -a, 0.0, 0.0, -b, b], dtype=torch.float64)
    torch.testing.assert_close(rl.group_advantages(rewards, 2), expected)
    # none: centred only; batch: the given (all-process) std for every group
    torch.testing.assert_close(
        rl.group_advantages(rewards, 2, "none"), torch.tensor([0.5, -0.5, 0, 0, -1, 1], dtype=torch.float64)
    )
    std = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(
        rl.group_advantages(rewards, 2, "batch", std), torch.tensor([0.5, -0.5, 0, 0, -1, 1]).double() / 2.0001
    )


def test_rloo_baseline_leaves_each_sample_out():
    """Group [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5, so advantages -3, -1.5, 4.5;
    group [5, 5, 5]: 0 each."""
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    torch.testing.assert_close(rl.rloo_advantages(rewards, 3), torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))


def test_k3_is_an_unbiased_kl_estimate_under_the_policy():
    """k3 at π = 0.5, π_ref = 0.25: r = log 0.5, e^r - r - 1 = 0.5 + log 2 - 1. Its expectation under π is
    exactly KL(π‖π_ref): Σ π·(π_ref/π) - Σ π·log(π_ref/π) - 1 = 1 + KL - 1."""
    value = rl.k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-7)
    pi = torch.softmax(torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0)
    ref = torch.softmax(torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), 0)
    expected = (pi * (pi.log() - ref.log())).sum()
    assert (pi * rl.k3_kl(pi.log(), ref.log())).sum().item() == pytest.approx(expected.item(), rel=1e-12)
    assert (rl.k3_kl(pi.log(), ref.log()) >= 0).all()


def test_clipped_objective_and_where_it_clips():
    """ε = 0.2. ρ 1.5, A +1: min(1.5, 1.2) → loss -1.2, clipped high (no gradient). ρ 0.5, A -1: min(-0.5, -0.8)
    → loss 0.8, clipped low. ρ 0.5, A +1: min(0.5, 0.8) → loss -0.5, not clipped (gradient -A·ρ = -0.5).
    ρ 1.1, A -2: inside the range → loss 2.2, gradient -A·ρ = 2.2."""
    log_ratio = torch.tensor([1.5, 0.5, 0.5, 1.1]).log().requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 1.0, -2.0])
    loss, ratio = rl.clipped_objective(log_ratio, advantages, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 0.8, -0.5, 2.2]))
    loss.sum().backward()
    torch.testing.assert_close(log_ratio.grad, torch.tensor([0.0, 0.0, -0.5, 2.2]))
    clipped = rl.clip_fractions(ratio, advantages, 0.2, 0.2)
    assert clipped["high"].tolist() == [True, False, False, False]
    assert clipped["low"].tolist() == [False, True, False, False]
    assert clipped["region"].tolist() == [True, True, False, False]
    # an asymmetric range (DAPO's ε_high 0.28): ρ 1.25 is not clipped, ρ 1.3 is (loss -1.28)
    loss, _ = rl.clipped_objective(torch.tensor([1.25, 1.3]).log(), torch.ones(2), 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.25, -1.28]))


def test_token_losses_reduce_as_each_loss_type_and_add_up_over_micro_batches():
    """Token losses [[1, 2, ·], [3, ·, ·]] (· masked), 2 sequences, 3 tokens, max length 3:
    grpo (1+2)/2 and 3/1 averaged = 2.25; dr_grpo 6/(2·3) = 1; dapo 6/3 = 2. Each micro-batch of one
    sequence, given the update's totals, contributes its share, and the shares add up to the same."""
    per_token = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for loss_type, expected in (("grpo", 2.25), ("dr_grpo", 1.0), ("dapo", 2.0)):
        whole = rl.reduce_token_loss(per_token, mask, loss_type, sequences=2, max_length=3, tokens=3)
        parts = sum(rl.reduce_token_loss(per_token[i : i + 1], mask[i : i + 1], loss_type, 2, 3, 3) for i in (0, 1))
        assert whole.item() == pytest.approx(expected) and parts.item() == pytest.approx(expected), loss_type
    assert rl.masked_mean(per_token, mask).item() == pytest.approx(2.0)


def test_gae_on_a_five_token_toy():
    """Rewards [0, 0, 0, 0, 1], values [.1, .2, .3, .4, .5], γ 1, λ 0.95, V after the end 0:
    δ = [.1, .1, .1, .1, .5]; A_4 = .5, A_3 = .1 + .95·.5 = .575, A_2 = .1 + .95·.575 = .64625,
    A_1 = .7139375, A_0 = .778240625; returns A + V. With λ 1 the returns are the reward to go (1 each).
    A second row of 3 tokens and 2 of padding ends at its third token."""
    rewards = torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 2.0, 9, 9]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 9, 9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float64)
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    expected = torch.tensor([0.778240625, 0.7139375, 0.64625, 0.575, 0.5], dtype=torch.float64)
    torch.testing.assert_close(advantages[0], expected)
    torch.testing.assert_close(returns[0], expected + values[0])
    # row 2: δ = [.1, .1, 1.7]; A_2 = 1.7, A_1 = .1 + .95·1.7 = 1.715, A_0 = .1 + .95·1.715 = 1.72925
    torch.testing.assert_close(advantages[1], torch.tensor([1.72925, 1.715, 1.7, 0, 0], dtype=torch.float64))
    _, monte_carlo = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(monte_carlo, torch.tensor([[1.0] * 5, [2, 2, 2, 0, 0]], dtype=torch.float64))


def test_whitening_over_the_mask():
    """[1, 2, 3, 4] (and a masked 100): mean 2.5, variance with Bessel 5/3, so (x - 2.5)/√(5/3 + 1e-8);
    without shifting the mean, 2.5 is added back."""
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.float64)
    expected = (values[0, :4] - 2.5) / math.sqrt(5 / 3 + 1e-8)
    torch.testing.assert_close(rl.whiten(values, mask)[0, :4], expected)
    torch.testing.assert_close(rl.whiten(values, mask, shift_mean=False)[0, :4], expected + 2.5)


def test_ppo_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    """log π_old [-1, -2, -3], log π_ref [-1.5, -2, -2]: k1 KL [.5, 0, -1]; kl_coef .05: rewards
    [-.025, 0, .05 + score 1]; a second row ends after one token (score 2 there, padding 0)."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = rl.ppo_rewards(torch.tensor([1.0, 2.0]), logps, ref, mask, kl_coef=0.05)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.025, 0.0, 1.05], [2.0, 0.0, 0.0]]))


def test_clipped_value_loss():
    """V 1, V_old .5, R 2, clip .2: unclipped (1 - 2)² = 1, clipped V .7: (.7 - 2)² = 1.69, loss .5·1.69 and
    clipped; V .6, V_old .5, R 0: both .36 (inside the range), loss .18, not clipped."""
    loss, clipped = rl.clipped_value_loss(
        torch.tensor([1.0, 0.6]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0]), 0.2
    )
    torch.testing.assert_close(loss, torch.tensor([0.845, 0.18]))
    assert clipped.tolist() == [True, False]
