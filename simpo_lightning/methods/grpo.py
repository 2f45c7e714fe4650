"""GRPOModule: Group Relative Policy Optimization, as TRL's ``GRPOTrainer``, on ``RolloutModule``.

Per rollout, G completions of each prompt (``sampling.n``); each completion's advantage is its reward minus its
group's mean, divided by the group's reward std, the batch's, or nothing (``scale_rewards``;
``rl.group_advantages``). The loss is PPO's clipped per-token objective, plus β times the k3 estimate of
KL(π‖π_ref) per token when β > 0 (then a reference model is loaded: with LoRA, the policy with its adapters off),
averaged over tokens as ``loss_type`` says (``rl.reduce_token_loss``). Logged besides the base's: ``clip_ratio/*``
and, with β > 0, ``kl`` (TRL's names).

    simpo-lightning fit --config configs/online/grpo-demo.yaml
"""

from dataclasses import dataclass, replace
from typing import Literal

from torch import Tensor

from simpo_lightning.errors import require
from simpo_lightning.losses import rl
from simpo_lightning.methods.rollout import Rollout, RolloutModule


@dataclass
class GRPOConfig:
    """GRPO's own settings (TRL's defaults); the update's are ``UpdateConfig``."""

    beta: float = 0.0
    """Weight of the per-token KL to the reference in the loss; 0: no reference model is loaded (TRL's default)."""
    loss_type: rl.TokenReduction = "dapo"
    """How token losses become the loss (``rl.reduce_token_loss``); TRL's default dapo."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std, the batch's, or not at all."""
    kl_bias_correction: bool = True
    """With β > 0: multiply the per-token KL by the ratio π/π_old (differentiable), which makes its gradient the
    unbiased reverse-KL gradient (TRL's ``use_bias_correction_kl``, on by default; DeepSeek-V3.2)."""

    def __post_init__(self) -> None:
        require(self.beta >= 0, f"model.method.beta = {self.beta}: must be ≥ 0")


class GRPOModule(RolloutModule):
    """GRPO on a prompt DataModule. Arguments as ``RolloutModule``'s, and ``method`` (``GRPOConfig``)."""

    def __init__(self, method: GRPOConfig = GRPOConfig(), **rollout):
        super().__init__(**rollout)
        self.config = method
        self.kl_weight = method.beta

    def advantages(self, rollout: Rollout) -> Rollout:
        config = self.config
        old, ref = self.old_and_reference_logps(rollout)
        std = self.reduced_std(rollout.rewards) if config.scale_rewards == "batch" else None
        advantages = rl.group_advantages(rollout.rewards, self.sampling.n, config.scale_rewards, std)
        return replace(rollout, advantages=advantages, old_logps=old if self.reuses_samples else None, ref_logps=ref)

    def micro_loss(self, rollout: Rollout, rows: Tensor, sequences: int, tokens: float) -> tuple[Tensor, dict]:
        prompts, completions, mask = rollout.take(rows)
        logps, width = self.logps(self.model, prompts, completions, mask), mask.shape[1]
        old = rollout.old_logps[rows, :width] if rollout.old_logps is not None else logps.detach()
        advantages = rollout.advantages[rows]
        eps_low, eps_high = self.update_config.epsilon, self.epsilon_high
        per_token, ratio = rl.clipped_objective(logps - old, advantages[:, None], eps_low, eps_high)
        clipped = rl.clip_fractions(ratio, advantages[:, None].expand_as(ratio), eps_low, eps_high)
        stats = {f"clip_ratio/{k}_mean": (v * mask).sum() for k, v in clipped.items()}
        if self.kl_weight:
            kl = rl.k3_kl(logps, rollout.ref_logps[rows, :width])
            if self.config.kl_bias_correction:
                kl = kl * ratio
            per_token = per_token + self.kl_weight * kl
            stats["kl"] = (kl.detach() * mask).sum()
        loss = rl.reduce_token_loss(
            per_token, mask, self.config.loss_type, sequences, self.sampling.max_new_tokens, tokens
        )
        return loss, {k: v.detach() for k, v in stats.items()} | {"weight": mask.sum()}
