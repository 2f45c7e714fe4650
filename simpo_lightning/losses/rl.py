"""Pure tensor functions of the online methods (GRPO, RLOO): advantages from a judge's rewards, the KL
estimator, the clipped policy objectives and how a loss over tokens becomes one number. They follow
TRL's ``GRPOTrainer``, ``RLOOTrainer`` and former ``PPOTrainer`` (names and defaults); ``methods.grpo``,
``methods.rloo`` and ``methods.ppo`` run them.

Shapes: P prompts with G samples each make N = P·G completions in prompt-major order (the G samples of a
prompt adjacent); completions are right-padded to T tokens, ``mask`` ``[N, T]`` is 1 on their tokens.
"""

from typing import Literal

import torch
from torch import Tensor

TokenReduction = Literal["grpo", "dr_grpo", "dapo"]
"""How a loss over completion tokens becomes one number (``reduce_token_loss``)."""
STD_EPSILON = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0/0


def group_advantages(
    rewards: Tensor, group: int, scale: Literal["group", "batch", "none"] = "group", batch_std: Tensor | None = None
) -> Tensor:
    """GRPO's advantages ``[N]``: each reward minus its group's mean, divided by a standard deviation (with
    Bessel's correction) plus 1e-4: the group's (``group``, TRL's default), the whole batch's (``batch``; pass
    ``batch_std``, over every process's rewards), or none (``none``, Dr. GRPO's advice)."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    std = grouped.std(1).repeat_interleave(group) if scale == "group" else batch_std
    return centred / (std + STD_EPSILON)


def rloo_advantages(rewards: Tensor, group: int) -> Tensor:
    """RLOO's advantages ``[N]``: each reward minus the mean of the other G - 1 rewards of its group."""
    grouped = rewards.view(-1, group)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).view(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(π‖π_ref) estimate k3 = exp(r) - r - 1 with r = log π_ref - log π (Schulman's; ≥ 0,
    unbiased under samples from π); GRPO adds β times it to each token's loss."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


def clipped_objective(
    log_ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate as a loss, -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A) with ρ = exp(log_ratio),
    elementwise (per token for GRPO, per sequence for RLOO; ``advantages`` broadcast). Returns (loss, ρ)."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def clip_fractions(ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float) -> dict[str, Tensor]:
    """Where the clip is active (the gradient is cut), as TRL counts: ``low`` ρ < 1 - ε with A < 0, ``high``
    ρ > 1 + ε with A > 0, ``region`` either; boolean tensors shaped like ``ratio``."""
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"low": low, "high": high, "region": low | high}


def reduce_token_loss(
    per_token: Tensor, mask: Tensor, loss_type: TokenReduction, sequences: int, max_length: int, tokens: float
) -> Tensor:
    """The loss of one micro-batch ``[n, T]`` as its share of an update over ``sequences`` completions that
    hold ``tokens`` tokens, so that summing the micro-batches' losses gives the update's loss:

    - ``grpo``: each sequence's token mean, averaged over the sequences (short answers weigh more per token);
    - ``dr_grpo``: the token sum over ``sequences · max_length`` (a constant: no length bias);
    - ``dapo``: the token sum over ``tokens`` (every token weighs the same; TRL's default).
    """
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    if loss_type == "dr_grpo":
        return masked.sum() / (sequences * max_length)
    return masked.sum() / max(tokens, 1.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------- PPO


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``values`` scaled to unit variance over the positions where ``mask`` is 1 (variance with Bessel's
    correction, + 1e-8), and centred unless ``shift_mean`` is false (TRL's ``masked_whiten``)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def ppo_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """PPO's per-token rewards ``[N, T]``: -kl_coef · (log π_old - log π_ref) at every response token, plus
    the judge's score at the sequence's last token; and the per-token KL estimate (k1) itself."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1) - 1).long()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded sequences ``[N, T]``: δ_t = r_t + γ·V_{t+1} - V_t
    (V after the last token is 0), A_t = δ_t + γλ·A_{t+1}; returns (A, A + V), 0 at padding."""
    rewards, values = rewards * mask, values * mask
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO's value loss per token, 0.5 · max((V - R)², (clip(V, V_old ± clip) - R)²), and where the clipped
    term is the larger (TRL's ``vf_clipfrac``)."""
    unclipped = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped
