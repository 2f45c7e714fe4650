import inspect
import logging
import math

import pytest
import torch

from simpo_lightning.losses.config import LossConfig
from simpo_lightning.losses.preference import (
    LOSSES,
    alphapo_loss,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    lndpo_loss,
    log1mexp,
    orpo_loss,
    rdpo_loss,
    simper_loss,
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
    assert {name for name, m in LOSSES.items() if m.reference} == {"dpo", "ipo", "kto", "lndpo", "rdpo"}
    assert {name for name, m in LOSSES.items() if m.average} == {"simpo", "ipo", "orpo", "alphapo", "simper", "lndpo"}
    assert {name for name, m in LOSSES.items() if m.lengths} == {"rdpo"}


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


def test_alphapo_by_hand():
    """α = 0.5, p_w = 0.5, p_l = 0.25: r = (1 - p^-α)/α gives r_w = (1 - √2)/0.5 = -0.828427 and
    r_l = (1 - 2)/0.5 = -2; β = 2, γ/β = 0.5: h = 2 · (-0.828427 + 2 - 0.5) = 1.343146,
    loss = log(1 + e^-h) = 0.231924."""
    losses, chosen, rejected = alphapo_loss(
        torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), beta=2.0, gamma_beta_ratio=0.5, alphapo_alpha=0.5
    )
    assert chosen.item() == pytest.approx(2 * (1 - math.sqrt(2)) / 0.5) and rejected.item() == pytest.approx(-4.0)
    assert losses.item() == pytest.approx(softplus(-2 * ((1 - math.sqrt(2)) / 0.5 + 2 - 0.5)), rel=1e-6)
    assert losses.item() == pytest.approx(0.231924, abs=1e-6)


def test_alphapo_at_alpha_zero_is_simpo_and_its_limit_is_continuous():
    for alpha in (0.0, 1e-6):
        torch.testing.assert_close(
            alphapo_loss(CHOSEN, REJECTED, alphapo_alpha=alpha)[0],
            simpo_loss(CHOSEN, REJECTED)[0],
            rtol=1e-5,
            atol=1e-5,
        )


def test_simper_by_hand():
    """exp(mean log-prob) 0.5 for chosen, 0.25 for rejected: loss = -0.5 + 0.25 = -0.25; the gradient on the
    chosen log-prob is -exp(logps_w) = -0.5, on the rejected +0.25."""
    chosen, rejected = (
        torch.tensor([math.log(0.5)], requires_grad=True),
        torch.tensor([math.log(0.25)], requires_grad=True),
    )
    losses, chosen_rewards, rejected_rewards = simper_loss(chosen, rejected)
    assert losses.item() == pytest.approx(-0.25) and (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx(
        (0.5, 0.25)
    )
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.25)


def test_lndpo_by_hand():
    """Averaged log-probs: ρ̄_w = -1 - (-1.5) = 0.5, ρ̄_l = -2 - (-1.5) = -0.5; β = 2: loss = log(1 + e^-2) = 0.126928."""
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    losses, chosen, rejected = lndpo_loss(*args, beta=2.0)
    assert losses.item() == pytest.approx(0.126928, abs=1e-6) and (chosen.item(), rejected.item()) == (1.0, -1.0)


def test_rdpo_by_hand_and_its_penalty_moves_the_gradient():
    """ρ_w = 1, ρ_l = -1 (SUMS), |y_w| = 10, |y_l| = 4; β = 0.5, α = 0.1: h = 0.5 · 2 - 0.1 · 6 = 0.4,
    loss = log(1 + e^-0.4) = 0.513015. The penalty sits inside the sigmoid, so it changes the gradient
    (-β σ(-h) on the chosen log-prob: 0.5 σ(-0.4) = 0.200656 against DPO's 0.5 σ(-1) = 0.134471)."""
    lengths = {"chosen_lengths": torch.tensor([10]), "rejected_lengths": torch.tensor([4])}
    chosen = SUMS["chosen_logps"].clone().requires_grad_()
    losses, chosen_rewards, _ = rdpo_loss(chosen, *list(SUMS.values())[1:], **lengths, beta=0.5, rdpo_alpha=0.1)
    assert losses.item() == pytest.approx(0.513015, abs=1e-6) and chosen_rewards.item() == 0.5
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.200656, abs=1e-6)
    assert rdpo_loss(**SUMS, **lengths, beta=0.5, rdpo_alpha=0.0)[0].item() == pytest.approx(
        dpo_loss(**SUMS, beta=0.5)[0].item()
    )


def test_every_method_names_its_parameters_without_collisions():
    """Each hyperparameter of a loss is a LossConfig field, and no two methods read one field in different senses:
    the method-specific ones carry their method's name (CPO's α is sft_weight, LoRA has its own alpha)."""
    fields = set(LossConfig.__dataclass_fields__) - {"name", "sft_weight"}
    inputs = {
        "chosen_logps",
        "rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "logps",
        "ref_logps",
        "desirable",
        "kl",
    }
    for name, method in LOSSES.items():
        parameters = set(inspect.signature(method.loss).parameters) - inputs
        assert parameters <= fields, (name, parameters - fields)
    assert {"alphapo_alpha", "rdpo_alpha"} <= fields and "alpha" not in fields
