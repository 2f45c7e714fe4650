import math

import pytest
import torch

from simpo_lightning.losses import LOSSES, simpo_loss

CHOSEN = torch.tensor([-1.0, -2.0])
REJECTED = torch.tensor([-2.0, -1.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_simpo_sigmoid_by_hand():
    """β = 2, γ/β = 0.5: h = 2 · (Δ - 0.5) is 1 for Δ = +1 and -3 for Δ = -1.
    loss = -log σ(h) = log(1 + e^-h): log(1 + e^-1) = 0.31326, log(1 + e^3) = 3.04859."""
    losses, chosen, rejected = simpo_loss(CHOSEN, REJECTED, beta=2.0, gamma_beta_ratio=0.5)
    assert losses.tolist() == pytest.approx([softplus(-1.0), softplus(3.0)])
    assert losses.tolist() == pytest.approx([0.313262, 3.048587], abs=1e-6)
    assert chosen.tolist() == [-2.0, -4.0] and rejected.tolist() == [-4.0, -2.0]


def test_simpo_label_smoothing_by_hand():
    """ε = 0.1, h = 1: 0.9 · log(1 + e^-1) + 0.1 · log(1 + e^1) = 0.9 · 0.31326 + 0.1 · 1.31326 = 0.41326."""
    losses, _, _ = simpo_loss(CHOSEN[:1], REJECTED[:1], beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.413262, abs=1e-6)


def test_simpo_hinge_by_hand():
    """hinge = max(0, 1 - h): h = 1 gives 0, h = -3 gives 4."""
    losses, _, _ = simpo_loss(CHOSEN, REJECTED, beta=2.0, gamma_beta_ratio=0.5, loss_type="hinge")
    assert losses.tolist() == [0.0, 4.0]


def test_margin_is_subtracted_after_scaling():
    """γ/β = 0 and Δ = 0 give log 2; γ/β = 1, β = 3 gives log(1 + e^3) (absolute γ = 3)."""
    zero = torch.zeros(1)
    assert simpo_loss(zero, zero, beta=3.0, gamma_beta_ratio=0.0)[0].item() == pytest.approx(math.log(2))
    assert simpo_loss(zero, zero, beta=3.0, gamma_beta_ratio=1.0)[0].item() == pytest.approx(softplus(3.0))


def test_gradient_direction():
    """The loss must push chosen log-probs up and rejected down."""
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    simpo_loss(chosen, rejected)[0].sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid"):
        simpo_loss(CHOSEN, REJECTED, loss_type="ipo")


def test_registry():
    assert LOSSES["simpo"] is simpo_loss
