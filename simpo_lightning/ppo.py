"""PPOModule: PPO with a value model, as in "The N Implementation Details of RLHF with PPO" (Huang et al.,
2024) and TRL's former ``PPOTrainer``, on ``OnlineModule``'s rollouts, update loop, checkpoints and resume.

Per rollout: one completion per prompt (``sampling.n``, 1 by default) at ``sampling.temperature``; the judge's
score, less ``missing_eos_penalty`` for a completion that ran out of tokens without end-of-sequence; per-token
log-probs of the policy (at the temperature) and of the reference; per-token values. Rewards are -kl_coef ·
(log π_old - log π_ref) at every token plus the score at the last one (optionally whitened without shifting
their mean), advantages by GAE (γ, λ) and whitened, returns = advantages + values. The update: ``num_iterations``
epochs (TRL's ``num_ppo_epochs``, 4) over shuffled minibatches (``updates_per_rollout``, TRL's
``num_mini_batches``), each the token mean of the clipped policy loss plus ``vf_coef`` times the clipped value
loss, one optimizer over the policy and the value model, gradient norm clipped.

The value model is the policy's backbone under a one-output head (``AutoModelForSequenceClassification``),
read at every position: from ``value_model`` (a reward model, such as one ``RewardModule`` trained and
``export`` wrote, as TRL initialises it from the reward model) or, by default, from the policy's own weights
with the head set to zero. With LoRA it gets its own adapters, and its head is trained and saved in the
checkpoint (the trainable weights of both models). Four models: policy, reference (with LoRA the policy with
its adapters off, no copy), value model (a second copy of the backbone) and the judge.

One difference from TRL on purpose: where pad = eos (SmolLM2, Llama) TRL scores the final eos as padding for
the policy loss but not for the value loss; here a completion's tokens, its eos included, are one mask for both.

Logged under ``train/`` with TRL's names: ``objective/kl`` (Σ_t k1 per sequence, mean), ``objective/entropy``
(Σ_t -log π of the sampled tokens, mean), ``objective/non_score_reward``, ``objective/rlhf_reward``,
``objective/scores``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``, ``loss/policy_avg``, ``loss/value_avg``;
TRL's ``val/*`` value-function metrics as ``value/clipfrac_avg``, ``value/ratio``, ``value/num_eos_tokens``
(``val/`` is this package's validation prefix). Plus ``OnlineModule``'s completion and speed metrics.

    simpo-lightning fit --config configs/ppo-demo.yaml
"""

from dataclasses import dataclass, replace
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from simpo_lightning import rl
from simpo_lightning.errors import UserError, require
from simpo_lightning.generation import SamplingConfig
from simpo_lightning.judges import Judge
from simpo_lightning.model import LoraConfig, PolicyConfig, build_policy, without_peft
from simpo_lightning.online import OnlineConfig, OnlineModule, Rollout
from simpo_lightning.reference import ReferenceConfig
from simpo_lightning.scoring import pack_completions


@dataclass
class PPOConfig(OnlineConfig):
    """PPO's settings (TRL's defaults) and the update's (``OnlineConfig``: ``num_iterations`` is the number
    of PPO epochs, ``updates_per_rollout`` the minibatches, ``epsilon`` the policy's clip range)."""

    method: Literal["ppo"] = "ppo"
    """Fixed: ``ppo``."""
    num_iterations: int = 4
    """PPO epochs over each rollout (TRL's num_ppo_epochs)."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty in the reward."""
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
    """A reward model (folder or hub id) to start the value model from; None: the policy with a zero head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, f"model.method.{name} = {getattr(self, name)}: must be in [0, 1]")
        for name in ("kl_coef", "cliprange_value", "vf_coef"):
            require(getattr(self, name) >= 0, f"model.method.{name} = {getattr(self, name)}: must be ≥ 0")


torch.serialization.add_safe_globals([PPOConfig])  # recorded in checkpoints' hyperparameters


class PPOModule(OnlineModule):
    """PPO with a value model on a prompt DataModule. Arguments as ``OnlineModule``'s, with ``method`` a
    ``PPOConfig`` and one sample per prompt by default (TRL's temperature 0.7)."""

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        method: PPOConfig = PPOConfig(),
        sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.7, max_new_tokens=16),
        judge: Judge | None = None,
        reference: ReferenceConfig = ReferenceConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "linear",
        max_nonfinite_steps: int = 10,
        logits_chunk: int | None = 1024,
    ):
        super().__init__(
            policy, lora, method, sampling, judge, reference, optimizer, warmup_ratio, lr_schedule,
            max_nonfinite_steps, logits_chunk,
        )  # fmt: skip
        self.beta = method.kl_coef  # the reference is loaded when the KL penalty is on
        self.value_model: nn.Module | None = None

    def check_sampling(self, sampling: SamplingConfig, method: OnlineConfig) -> None:
        if sampling.n < 1:
            raise UserError(f"sampling.n = {sampling.n}: PPO needs at least one sample per prompt")

    def configure_model(self) -> None:
        if self.value_model is None:
            source = self.policy  # the value model is loaded as the policy is (dtype, attention, dropout off)
            if self.config.value_model is not None:
                source = replace(self.policy, name_or_path=self.config.value_model, gguf_file=None, random_init=False)
            value = build_policy(source, self.lora, head="reward")
            if self.config.value_model is None:
                with torch.no_grad():
                    for name, p in value.named_parameters():
                        if "score" in name:
                            p.zero_()
            self.value_model = self.sharded(value)
        super().configure_model()

    def values(self, prompts: list[list[int]], completions: Tensor, mask: Tensor) -> Tensor:
        """The value model's prediction ``[n, T]`` at the position before each completion token (its state)."""
        packed = pack_completions(prompts, completions, mask, self.tokenizer.pad_token_id, self.config.shared_prompt)
        base = without_peft(self.value_model)
        hidden = getattr(base, base.base_model_prefix)(**packed.inputs).last_hidden_state
        return packed.unflatten(base.score(hidden.flatten(0, 1)[packed.index]).squeeze(-1).float())

    def advantages(self, rollout: Rollout) -> Rollout:
        config, mask = self.config, rollout.mask.float()
        old = self.rollout_logps(rollout)
        ref = self.rollout_logps(rollout, reference=True) if self.beta else old
        values = self.no_grad_per_token(self.values, rollout) * mask
        scores = rollout.rewards
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
        rewards, kl = rl.ppo_rewards(scores, old, ref, mask, self.beta)
        if config.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
        advantages = rl.whiten(advantages, mask) * mask
        self.rollout_stats |= {
            "objective/kl": kl.sum(-1).mean(),
            "objective/entropy": (-old * mask).sum(-1).mean(),
            "objective/non_score_reward": (-self.beta * kl).sum(-1).mean(),
            "objective/rlhf_reward": scores.mean() + (-self.beta * kl).sum(-1).mean(),
            "objective/scores": scores.mean(),
            "value/num_eos_tokens": rollout.ended.float().sum(),
        }
        return replace(rollout, advantages=advantages, old_logps=old, ref_logps=ref, values=values, returns=returns)

    def _micro_loss(
        self, rollout: Rollout, rows: Tensor, sequences: int, tokens: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Token mean over the minibatch (``tokens``) of the clipped policy loss plus vf_coef times the
        clipped value loss; statistics as token-weighted sums."""
        prompts, completions, mask = rollout.take(rows)
        logps, width = self.logps(self.model, prompts, completions, mask), mask.shape[1]
        values = self.values(prompts, completions, mask)
        old, advantages = rollout.old_logps[rows, :width], rollout.advantages[rows, :width]
        eps = self.config.epsilon
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
