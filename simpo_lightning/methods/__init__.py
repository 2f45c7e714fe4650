"""The training methods, as LightningModules on one contract (``base``): offline preference tuning (``preference``:
SimPO and the losses it is measured against), supervised fine-tuning (``sft``), reward models (``reward``), and
online RL on one rollout base (``rollout``) with GRPO, RLOO and PPO; with the pieces they share (the reference
model, SimPO's margin from data, the optimizer step in the backward pass)."""

from simpo_lightning.methods.base import SupervisedModule, TrainingModule
from simpo_lightning.methods.grpo import GRPOConfig, GRPOModule
from simpo_lightning.methods.margin import Margin
from simpo_lightning.methods.optim import OptimizerInBackward
from simpo_lightning.methods.ppo import PPOConfig, PPOModule
from simpo_lightning.methods.preference import SimPOModule
from simpo_lightning.methods.reference import Reference, ReferenceConfig
from simpo_lightning.methods.reward import RewardModule
from simpo_lightning.methods.rloo import RLOOConfig, RLOOModule
from simpo_lightning.methods.rollout import Rollout, RolloutModule, UpdateConfig
from simpo_lightning.methods.sft import SFTModule

__all__ = [
    "GRPOConfig",
    "GRPOModule",
    "Margin",
    "OptimizerInBackward",
    "PPOConfig",
    "PPOModule",
    "RLOOConfig",
    "RLOOModule",
    "Reference",
    "ReferenceConfig",
    "RewardModule",
    "Rollout",
    "RolloutModule",
    "SFTModule",
    "SimPOModule",
    "SupervisedModule",
    "TrainingModule",
    "UpdateConfig",
]
