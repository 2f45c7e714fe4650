"""Preference losses as pure tensor functions.

Every loss maps per-sequence log-probabilities to per-example ``(losses, chosen_rewards,
rejected_rewards)``, each of shape ``[B]``. A new method is a new function plus an entry in
``LOSSES``; the LightningModule never branches on the method's name.

Margin convention (named once, here). SimPO's loss is

    L = -log σ(β · (r_w - r_l) - γ),   r = mean log-prob of the response tokens

and this package spells the margin as ``gamma_beta_ratio`` = γ / β, as the SimPO reference
code does, because the authors publish their tuned settings that way. The other spellings:

- the SimPO paper's γ (absolute margin)  = ``beta * gamma_beta_ratio``
- TRL's ``CPOConfig(loss_type="simpo", simpo_gamma=...)`` is the absolute γ as well.
"""

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLoss(Protocol):
    def __call__(self, chosen_logps: Tensor, rejected_logps: Tensor, **hparams) -> tuple[Tensor, Tensor, Tensor]: ...


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng, Xia and Chen, 2024, arXiv:2405.14734).

    With Δ = chosen_logps - rejected_logps (both already length-normalised) and
    h = β · (Δ - gamma_beta_ratio):

    - ``sigmoid``: -(1 - ε) · log σ(h) - ε · log σ(-h), ε = ``label_smoothing`` (ε = 0 is the paper's loss);
    - ``hinge``: max(0, 1 - h).

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
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


LOSSES: dict[str, PreferenceLoss] = {"simpo": simpo_loss}
