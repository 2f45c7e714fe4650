"""RLOOModule: REINFORCE Leave-One-Out, as TRL's ``RLOOTrainer``, on ``RolloutModule``.

Per rollout, G completions of each prompt (``sampling.n``); each completion's reward first loses β times its
summed log-ratio to the reference (TRL's first-order sequence KL; β > 0 loads a reference model: with LoRA, the
policy with its adapters off), and its advantage is that reward minus the mean of the other G - 1 rewards of its
group (``rl.rloo_advantages``), optionally whitened over the batch. The loss is PPO's clipped objective on the
sequence's probability ratio. Logged besides the base's: ``clip_ratio/*`` and, with β > 0, ``kl`` (the mean
per-token log-ratio, TRL's).

    simpo-lightning fit --config configs/online/rloo-demo.yaml
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from simpo_lightning.errors import require
from simpo_lightning.losses import rl
from simpo_lightning.methods.rollout import Rollout, RolloutModule


@dataclass
class RLOOConfig:
    """RLOO's own settings (TRL's defaults); the update's are ``UpdateConfig``."""

    beta: float = 0.05
    """Weight of the summed log-ratio to the reference subtracted from each reward; 0: no reference model."""
    normalize_advantages: bool = False
    """Whiten advantages over the batch (TRL's option, off by default)."""

    def __post_init__(self) -> None:
        require(self.beta >= 0, f"model.method.beta = {self.beta}: must be ≥ 0")


class RLOOModule(RolloutModule):
    """RLOO on a prompt DataModule. Arguments as ``RolloutModule``'s, and ``method`` (``RLOOConfig``)."""

    def __init__(self, method: RLOOConfig = RLOOConfig(), **rollout):
        super().__init__(**rollout)
        self.config = method
        self.kl_weight = method.beta

    def advantages(self, rollout: Rollout) -> Rollout:
        rewards, mask, beta = rollout.rewards, rollout.mask, self.kl_weight
        old, ref = self.old_and_reference_logps(rollout)
        if beta:  # TRL's RLOO logs the mean per-token log-ratio to the reference as kl
            self.rollout_stats["kl"] = rl.masked_mean(old - ref, mask)
        shaped = rewards - beta * ((old - ref) * mask).sum(-1) if beta else rewards
        advantages = rl.rloo_advantages(shaped, self.sampling.n)
        if self.config.normalize_advantages:
            spread = self.reduced_std(advantages) + rl.STD_EPSILON
            advantages = (advantages - self.reduced_mean(advantages)) / spread
        return replace(rollout, advantages=advantages, old_logps=old if self.reuses_samples else None, ref_logps=ref)

    def micro_loss(self, rollout: Rollout, rows: Tensor, sequences: int, tokens: float) -> tuple[Tensor, dict]:
        prompts, completions, mask = rollout.take(rows)
        logps, width = self.logps(self.model, prompts, completions, mask), mask.shape[1]
        old = rollout.old_logps[rows, :width] if rollout.old_logps is not None else logps.detach()
        advantages = rollout.advantages[rows]
        eps_low, eps_high = self.update_config.epsilon, self.epsilon_high
        log_ratio = ((logps - old) * mask).sum(-1)
        per_sequence, ratio = rl.clipped_objective(log_ratio, advantages, eps_low, eps_high)
        clipped = rl.clip_fractions(ratio, advantages, eps_low, eps_high)
        stats = {f"clip_ratio/{k}_mean": v.float().sum() for k, v in clipped.items()}
        return per_sequence.sum() / sequences, {k: v.detach() for k, v in stats.items()} | {
            "weight": torch.tensor(float(len(rows)))
        }
