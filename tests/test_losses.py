import logging
import math

import pytest
import torch

from simpo_lightning.losses import (
    LOSSES,
    LossConfig,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)

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
    assert LOSSES["simpo"].loss is simpo_loss
    assert {name for name, m in LOSSES.items() if m.reference} == {"dpo", "ipo", "kto"}
    assert {name for name, m in LOSSES.items() if m.average} == {"simpo", "ipo", "orpo"}


SUMS = dict(
    chosen_logps=torch.tensor([-10.0]),
    rejected_logps=torch.tensor([-12.0]),
    ref_chosen_logps=torch.tensor([-11.0]),
    ref_rejected_logps=torch.tensor([-11.0]),
)


def test_dpo_by_hand():
    """β = 0.5, ρ_w = -10 - (-11) = 1, ρ_l = -12 - (-11) = -1, h = 0.5 · 2 = 1: -log σ(1) = 0.31326."""
    losses, chosen, rejected = dpo_loss(**SUMS, beta=0.5)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    assert dpo_loss(**SUMS, beta=0.5, loss_type="hinge")[0].item() == 0.0  # max(0, 1 - 1)


def test_conservative_dpo_against_a_slow_reference():
    """TRL's DPOTrainer no longer has label smoothing for the sigmoid loss, so the reference is the
    formula of Mitchell (2023), written out: the expected DPO loss when a label is flipped with probability ε."""
    torch.manual_seed(0)
    c, r, rc, rr = (torch.randn(5) * 5 for _ in range(4))
    beta, eps = 0.3, 0.2
    losses, _, _ = dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(5):
        h = beta * ((c[i] - rc[i]) - (r[i] - rr[i])).item()
        expected = (1 - eps) * math.log(1 + math.exp(-h)) + eps * math.log(1 + math.exp(h))
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)


def test_ipo_by_hand():
    """Averaged log-probs: ρ_w = -1 - (-1.5) = 0.5, ρ_l = -0.5; (1 - 1/(2τ))² is 0 for τ = 0.5 and 1 for τ = 0.25."""
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    assert ipo_loss(*args, beta=0.5)[0].item() == 0.0
    losses, chosen, rejected = ipo_loss(*args, beta=0.25)
    assert losses.item() == 1.0 and (chosen.item(), rejected.item()) == (0.125, -0.125)


def test_cpo_is_dpo_without_a_reference():
    losses, chosen, _ = cpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), beta=0.5)
    assert losses.item() == pytest.approx(softplus(-1.0)) and chosen.item() == -5.0


def test_orpo_by_hand():
    """P_w = 0.5 (odds 1), P_l = 0.25 (odds 1/3): log odds ratio = log 3,
    loss = -0.1 · log σ(log 3) = -0.1 · log 0.75."""
    losses, chosen, _ = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), beta=0.1)
    assert losses.item() == pytest.approx(-0.1 * math.log(0.75), rel=1e-6)
    assert chosen.item() == pytest.approx(0.1 * math.log(0.5))


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0])
    expected = [math.log(-math.expm1(v)) for v in x.double().tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-5)


def test_kto_by_hand():
    """β = 1, z₀ = 0.2, ρ = (0.5, -0.5): desirable 1 - σ(0.5 - 0.2) = 0.42556; undesirable with λ_U = 2:
    2 · (1 - σ(0.2 + 0.5)) = 0.66362."""
    losses, rewards = kto_loss(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-1.5, -1.5]),
        torch.tensor([True, False]),
        torch.tensor(0.2),
        beta=1.0,
        undesirable_weight=2.0,
    )
    assert losses.tolist() == pytest.approx([0.425557, 0.663624], abs=1e-6)
    assert rewards.tolist() == [0.5, -0.5]
    assert kto_kl(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -3.0])).item() == -0.5  # clamped by the caller


def test_loss_settings_take_method_defaults_and_warn_when_ignored(caplog):
    assert LossConfig(name="dpo").hparams() == {}  # β from dpo_loss's signature: 0.1
    with caplog.at_level(logging.WARNING):
        assert LossConfig(name="dpo", beta=0.2, gamma_beta_ratio=0.5).hparams() == {"beta": 0.2}
    assert "gamma_beta_ratio" in caplog.text and "dpo" in caplog.text
    assert LossConfig(name="cpo").nll_weight() == 1.0 and LossConfig(name="simpo").nll_weight() == 0.0
    assert LossConfig(name="orpo", sft_weight=0.3).nll_weight() == 0.3
