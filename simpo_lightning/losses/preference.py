"""Preference losses as pure tensor functions, and the registry that names them.

A paired loss maps per-sequence log-probabilities of the chosen and rejected responses (and,
for methods with a reference model, the reference's) to per-example
``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. KTO, the one unpaired method, maps
each completion's log-probs and its desirable/undesirable label to ``(losses, rewards)``. A new
method is a new function plus an entry in ``LOSSES``; the LightningModule never branches on the
method's name, only on the entry's properties.

Margin convention (named once, here). SimPO's loss is

    L = -log σ(β · (r_w - r_l) - γ),   r = mean log-prob of the response tokens

and this package spells the margin as ``gamma_beta_ratio`` = γ / β, as the SimPO reference
code does, because the authors publish their tuned settings that way. The other spellings:

- the SimPO paper's γ (absolute margin)  = ``beta * gamma_beta_ratio``
- TRL's ``CPOConfig(loss_type="simpo", simpo_gamma=...)`` is the absolute γ as well.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

BinaryLoss = Literal["sigmoid", "hinge"]
"""How a binary preference margin h becomes a loss: ``sigmoid`` -log σ(h), ``hinge`` max(0, 1 - h)."""


def _binary(h: Tensor, label_smoothing: float, loss_type: BinaryLoss) -> Tensor:
    """-(1 - ε) log σ(h) - ε log σ(-h) for ``sigmoid``, max(0, 1 - h) for ``hinge``."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    if loss_type == "hinge":
        return torch.relu(1 - h)
    raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
    loss_type: BinaryLoss = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng, Xia and Chen, 2024, arXiv:2405.14734). No reference model.

    With Δ = chosen_logps - rejected_logps (both length-normalised) and h = β · (Δ - γ/β):
    ``sigmoid``: -(1 - ε) · log σ(h) - ε · log σ(-h), ε = ``label_smoothing`` (ε = 0 is the paper);
    ``hinge``: max(0, 1 - h).

    Args:
        chosen_logps: mean log-prob of each chosen response, ``[B]``.
        rejected_logps: mean log-prob of each rejected response, ``[B]``.
        beta: reward scale β.
        gamma_beta_ratio: target margin γ/β (see the module docstring for the other spellings).
        label_smoothing: ε, the assumed probability that a label is flipped.
        loss_type: ``sigmoid`` (the paper) or ``hinge``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · logps, detached.
    """
    h = beta * (chosen_logps - rejected_logps - gamma_beta_ratio)
    losses = _binary(h, label_smoothing, loss_type)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: BinaryLoss = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290), on summed response log-probs.

    With ρ_w = logπ(y_w|x) - logπ_ref(y_w|x), ρ_l likewise, and h = β · (ρ_w - ρ_l):
    ``sigmoid``: -log σ(h); with ``label_smoothing`` ε > 0 the conservative DPO of Mitchell (2023),
    -(1 - ε) · log σ(h) - ε · log σ(-h); ``hinge``: max(0, 1 - h) (SLiC, Zhao et al., 2023).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · ρ, detached.
    """
    chosen_ratios, rejected_ratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = _binary(beta * (chosen_ratios - rejected_ratios), label_smoothing, loss_type)
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., 2023, arXiv:2310.12036, Eq. 17), on length-averaged log-probs as in TRL.

    With ρ = mean log-prob under the policy minus under the reference, and τ = ``beta``:
    loss = (ρ_w - ρ_l - 1 / (2τ))².

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · ρ (of the
        averaged log-probs, the quantity the loss uses; TRL logs β times the summed ratio).
    """
    chosen_ratios, rejected_ratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = (chosen_ratios - rejected_ratios - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: BinaryLoss = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """CPO's preference term (Xu et al., 2024, arXiv:2401.08417): DPO without a reference model.

    h = β · (logπ(y_w|x) - logπ(y_l|x)) on summed log-probs; then as ``dpo_loss``. The method adds
    an NLL term on the chosen response, weighted by ``LossConfig.sft_weight`` (CPO's α, default 1).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · logps, detached.
    """
    losses = _binary(beta * (chosen_logps - rejected_logps), label_smoothing, loss_type)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Mächler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong, Lee and Thorne, 2024, arXiv:2403.07691, Eqs. 4-7). No reference.

    With P = exp(mean log-prob) and odds(y|x) = P / (1 - P):
    loss = -λ · log σ(log odds(y_w|x) - log odds(y_l|x)), λ = ``beta``. The method adds the NLL of
    the chosen response with weight 1 (``LossConfig.sft_weight``).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · logps, detached.
    """
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    return -beta * F.logsigmoid(log_odds), beta * chosen_logps.detach(), beta * rejected_logps.detach()


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z₀: the batch mean of logπ - logπ_ref over mismatched pairs
    (prompt i with completion i - 1), detached; clamp at 0 after averaging over processes."""
    return (kl_logps - ref_kl_logps).mean().detach()


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al., 2024, arXiv:2402.01306, Eq. 7), on unpaired completions.

    With ρ = logπ(y|x) - logπ_ref(y|x) (summed) and z₀ = ``kl`` (see ``kto_kl``):
    desirable: λ_D · (1 - σ(β · (ρ - z₀))); undesirable: λ_U · (1 - σ(β · (z₀ - ρ))).

    Args:
        logps: summed log-prob of each completion, ``[N]``.
        ref_logps: the same under the reference model, ``[N]``.
        desirable: ``[N]`` bool label.
        kl: scalar reference point z₀ ≥ 0, no gradient.

    Returns:
        ``(losses, rewards)``, each ``[N]``; rewards are β · ρ, detached.
    """
    ratios = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))),
    )
    return losses, beta * ratios.detach()


def alphapo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    alphapo_alpha: float = 0.25,
    label_smoothing: float = 0.0,
    loss_type: BinaryLoss = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """AlphaPO ("AlphaPO: Reward Shape Matters for LLM Alignment", 2025, arXiv:2501.03884): SimPO with the
    reward reshaped.

    With p = exp(mean log-prob), the length-normalised probability, the reward is
    r = (1 - p^(-α)) / α = -expm1(-α · logps) / α, α = ``alphapo_alpha``; α → 0 gives SimPO's
    r = logps, and α > 0 bends it so that the gradient weighs likely responses more. Then as
    ``simpo_loss``: h = β · (r_w - r_l - γ/β). TRL: ``CPOTrainer(loss_type="alphapo", alpha=α)``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · r, detached.
    """
    chosen_r, rejected_r = _alpha_reward(chosen_logps, alphapo_alpha), _alpha_reward(rejected_logps, alphapo_alpha)
    losses = _binary(beta * (chosen_r - rejected_r - gamma_beta_ratio), label_smoothing, loss_type)
    return losses, beta * chosen_r.detach(), beta * rejected_r.detach()


def _alpha_reward(logps: Tensor, alpha: float) -> Tensor:
    return logps if alpha == 0 else -torch.expm1(-alpha * logps) / alpha


def simper_loss(chosen_logps: Tensor, rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SimPER ("SimPER: A Minimalist Approach to Preference Alignment without Hyperparameters", ICLR 2025):
    no hyperparameters, no reference model.

    With the inverse perplexity exp(mean log-prob) of each response:
    loss = -exp(logps_w) + exp(logps_l), so the chosen response's perplexity falls and the rejected one's rises.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are the inverse perplexities, detached.
    """
    chosen, rejected = chosen_logps.exp(), rejected_logps.exp()
    return rejected - chosen, chosen.detach(), rejected.detach()


def lndpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """LN-DPO: DPO on length-normalised log-ratios ("A Practical Analysis of Human Alignment with *PO",
    2024), TRL's ``DPOTrainer(loss_type="sigmoid_norm")``.

    With ρ̄ = (log π(y|x) - log π_ref(y|x)) / |y|: loss = -log σ(β · (ρ̄_w - ρ̄_l)). Default β = 2.0, not DPO's
    0.1: ρ̄ is a per-token quantity, |y| times smaller than DPO's summed ρ, so β must be about |y| times
    larger to put the same pressure on a response of |y| tokens (0.1 × 20 tokens), the scale SimPO uses for
    its own per-token reward.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · ρ̄ (of the averaged
        ratios the loss uses; TRL logs β times the summed ratio), detached.
    """
    chosen_ratios, rejected_ratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratios - rejected_ratios))
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


def rdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
    rdpo_alpha: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """R-DPO (Park et al., 2024, arXiv:2403.19159): DPO with a length penalty inside the sigmoid.

    With ρ the summed log-ratios and |y| the response lengths in tokens:
    loss = -log σ(β · (ρ_w - ρ_l) - α · (|y_w| - |y_l|)), α = ``rdpo_alpha``. The penalty must sit inside
    the sigmoid: added outside it would be a constant of the parameters, with no gradient. α = 0 is DPO.
    Default α = 0.01 (with β = 0.1), untuned: the paper searches it per data set.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are β · ρ, detached.
    """
    chosen_ratios, rejected_ratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    penalty = rdpo_alpha * (chosen_lengths - rejected_lengths).to(chosen_ratios.dtype)
    losses = -F.logsigmoid(beta * (chosen_ratios - rejected_ratios) - penalty)
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


@dataclass(frozen=True)
class Method:
    """How the LightningModule feeds a loss."""

    loss: Callable[..., tuple[Tensor, ...]]
    average: bool
    """Inputs are length-normalised (mean) log-probs; otherwise summed."""
    reference: bool = False
    """Takes reference log-probs after the policy's."""
    sft_weight: float = 0.0
    """Default weight of the NLL term on the chosen (desirable) response tokens."""
    paired: bool = True
    """False: unpaired completions with a desirable label (KTO)."""
    lengths: bool = False
    """Takes the response lengths ``chosen_lengths``, ``rejected_lengths`` (tokens) as well."""


LOSSES: dict[str, Method] = {
    "simpo": Method(simpo_loss, average=True),
    "dpo": Method(dpo_loss, average=False, reference=True),
    "ipo": Method(ipo_loss, average=True, reference=True),
    "cpo": Method(cpo_loss, average=False, sft_weight=1.0),
    "orpo": Method(orpo_loss, average=True, sft_weight=1.0),
    "kto": Method(kto_loss, average=False, reference=True, paired=False),
    "alphapo": Method(alphapo_loss, average=True),
    "simper": Method(simper_loss, average=True),
    "lndpo": Method(lndpo_loss, average=True, reference=True),
    "rdpo": Method(rdpo_loss, average=False, reference=True, lengths=True),
}
