"""PPOModule: PPO with a value model, as in "The N Implementation Details of RLHF with PPO" (Huang et al.,
2024) and TRL's former ``PPOTrainer``, on ``RolloutModule``.

Per rollout: the judge's score less ``missing_eos_penalty`` where a completion ran out of tokens; per-token rewards
-kl_coef · (log π_old - log π_ref) plus the score at the last token; values from the value model: with LoRA the
policy's own base with a second set of adapters under a zero-initialised one-output head (one backbone in memory),
without LoRA or with ``value_model`` a second backbone under a one-output head; GAE advantages, whitened; the
clipped policy loss plus ``vf_coef`` times the clipped value loss, a token mean over each minibatch. TRL's metric
names and the one difference from TRL: docs/online.md ("PPO").

    simpo-lightning fit --config configs/online/ppo-demo.yaml
"""

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from simpo_lightning.errors import UserError, require
from simpo_lightning.generation.sampling import SamplingConfig
from simpo_lightning.losses import rl
from simpo_lightning.methods.rollout import Rollout, RolloutModule, UpdateConfig
from simpo_lightning.models.loading import VALUE_ADAPTER, active_adapter, add_adapter, build_policy, without_peft
from simpo_lightning.scoring.sequences import pack_completions


@dataclass
class PPOConfig:
    """PPO's own settings (TRL's defaults); the update's are ``UpdateConfig`` (``num_iterations`` is the number
    of PPO epochs, ``updates_per_rollout`` the minibatches, ``epsilon`` the policy's clip range)."""

    kl_coef: float = 0.05
    """Weight of the per-token KL penalty in the reward; 0: no reference model is loaded."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around the rollout's value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE's λ."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (keeping their mean) before GAE."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a completion without end-of-sequence; None: no penalty."""
    value_model: str | None = None
    """A reward model (folder or hub id) to start the value model from, a second model; None: the policy's own
    base under a zero head, with LoRA a second set of adapters on it (no second model), without LoRA a copy."""

    def __post_init__(self) -> None:
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, f"model.method.{name} = {getattr(self, name)}: must be in [0, 1]")
        for name in ("kl_coef", "cliprange_value", "vf_coef"):
            require(getattr(self, name) >= 0, f"model.method.{name} = {getattr(self, name)}: must be ≥ 0")


@dataclass
class PPORollout(Rollout):
    """A rollout with what PPO adds: the value model's ``values`` and the ``returns`` (GAE's), ``[N, T]``."""

    values: Tensor | None = None
    returns: Tensor | None = None


class PPOModule(RolloutModule):
    """PPO with a value model on a prompt DataModule. Arguments as ``RolloutModule``'s, and ``method``
    (``PPOConfig``); one sample per prompt (TRL's temperature 0.7) and 4 epochs over each rollout by default."""

    min_samples = 1  # the value model is the baseline

    def __init__(
        self,
        method: PPOConfig = PPOConfig(),
        sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.7, max_new_tokens=16),
        update: UpdateConfig = UpdateConfig(num_iterations=4),
        **rollout,
    ):
        super().__init__(sampling=sampling, update=update, **rollout)
        self.config = method
        self.kl_weight = method.kl_coef  # the reference is loaded when the KL penalty is on
        self.value_model: nn.Module | None = None  # a second model (``value_model``, or no LoRA)
        self.value_head: nn.Module | None = None  # the head on the policy's base (LoRA)

    @property
    def shares_base(self) -> bool:
        """Whether the value model is the policy's base with adapters of its own (LoRA, no ``value_model``)."""
        return self.lora is not None and self.config.value_model is None

    def build_model(self) -> nn.Module:
        if self.shares_base:
            if self.policy.gradient_checkpointing:
                raise UserError(
                    "PPO's value adapters share the policy's base, and gradient checkpointing would recompute them "
                    "under the policy's adapters: set model.policy.gradient_checkpointing false, or give "
                    "model.method.value_model (a second model)"
                )
            model = super().build_model()
            add_adapter(model, self.lora, VALUE_ADAPTER)
            hidden = without_peft(model).config.hidden_size
            self.value_head = nn.Linear(hidden, 1, bias=False, dtype=getattr(torch, self.policy.dtype))
            nn.init.zeros_(self.value_head.weight)
            return model
        source = self.policy  # the value model is loaded as the policy is (dtype, attention, dropout off)
        if self.config.value_model is not None:
            source = replace(self.policy, name_or_path=self.config.value_model, gguf_file=None, random_init=False)
        self.value_model = build_policy(source, self.lora, head="reward")
        if self.config.value_model is None:
            with torch.no_grad():
                for name, p in self.value_model.named_parameters():
                    if "score" in name:
                        p.zero_()
        return super().build_model()

    def shard_parts(self) -> None:
        if self.shares_base and self.device_mesh is not None:
            raise UserError(
                "PPO's value adapters on the policy's base are not sharded yet: use one device or DDP, or give "
                "model.method.value_model"
            )
        if self.value_model is not None:
            self.value_model = self.sharded(self.value_model)
        super().shard_parts()

    def values(self, prompts: list[list[int]], completions: Tensor, mask: Tensor) -> Tensor:
        """The value model's prediction ``[n, T]`` at the position before each completion token (its state)."""
        packed = pack_completions(
            prompts, completions, mask, self.tokenizer.pad_token_id, self.update_config.shared_prompt
        )
        model = self.model if self.shares_base else self.value_model
        base = without_peft(model)
        running = active_adapter(model, VALUE_ADAPTER) if self.shares_base else nullcontext()
        with running:
            hidden = getattr(base, base.base_model_prefix)(**packed.inputs).last_hidden_state
        head = self.value_head if self.shares_base else base.score
        return packed.unflatten(head(hidden.flatten(0, 1)[packed.index]).squeeze(-1).float())

    def advantages(self, rollout: Rollout) -> PPORollout:
        config, mask = self.config, rollout.mask.float()
        old = self.rollout_logps(rollout)
        ref = self.rollout_logps(rollout, reference=True) if self.kl_weight else old
        values = self.no_grad_per_token(self.values, rollout) * mask
        scores = rollout.rewards
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
        rewards, kl = rl.ppo_rewards(scores, old, ref, mask, self.kl_weight)
        if config.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
        advantages = rl.whiten(advantages, mask) * mask
        self.rollout_stats |= {
            "objective/kl": kl.sum(-1).mean(),
            "objective/entropy": (-old * mask).sum(-1).mean(),
            "objective/non_score_reward": (-self.kl_weight * kl).sum(-1).mean(),
            "objective/rlhf_reward": scores.mean() + (-self.kl_weight * kl).sum(-1).mean(),
            "objective/scores": scores.mean(),
            "value/num_eos_tokens": rollout.ended.float().sum(),
        }
        return PPORollout(
            **vars(rollout) | dict(advantages=advantages, old_logps=old, ref_logps=ref, values=values, returns=returns)
        )

    def micro_loss(self, rollout: PPORollout, rows: Tensor, sequences: int, tokens: float) -> tuple[Tensor, dict]:
        """Token mean over the minibatch (``tokens``) of the clipped policy loss plus vf_coef times the
        clipped value loss; statistics as token-weighted sums."""
        prompts, completions, mask = rollout.take(rows)
        logps, width = self.logps(self.model, prompts, completions, mask), mask.shape[1]
        values = self.values(prompts, completions, mask)
        old, advantages = rollout.old_logps[rows, :width], rollout.advantages[rows, :width]
        eps = self.update_config.epsilon
        policy, ratio = rl.clipped_objective(logps - old, advantages, eps, self.epsilon_high)
        value, value_clipped = rl.clipped_value_loss(
            values, rollout.values[rows, :width], rollout.returns[rows, :width], self.config.cliprange_value
        )
        total = max(tokens, 1.0)
        loss = ((policy + self.config.vf_coef * value) * mask).sum() / total
        unclipped = -advantages * ratio
        stats = {
            "policy/approxkl_avg": (0.5 * (logps - old) ** 2 * mask).sum(),
            "policy/clipfrac_avg": ((policy > unclipped).float() * mask).sum(),
            "loss/policy_avg": (policy * mask).sum(),
            "loss/value_avg": (value * mask).sum(),
            "value/clipfrac_avg": (value_clipped.float() * mask).sum(),
            "value/ratio": (ratio * mask).sum(),
        }
        return loss, {k: v.detach() for k, v in stats.items()} | {"weight": mask.sum()}
