"""SimPO preference tuning for causal language models, on PyTorch Lightning.

What a user builds a run from, in one place: the training modules, the DataModules, their configs, the losses,
the callbacks and the judges. The layers below (``docs/architecture.md``): ``losses``, ``data``, ``models``;
``scoring``; ``generation``; ``evaluation`` and ``methods``; ``callbacks``; the ``cli`` and ``rounds``.
"""

from simpo_lightning import _compat
from simpo_lightning.callbacks import GenerationMonitor, HeldOutReport, PeakMemory, PreferenceDiagnostics
from simpo_lightning.data import (
    Columns,
    PreferenceCollator,
    PreferenceDataModule,
    PromptDataModule,
    Truncation,
)
from simpo_lightning.generation import (
    CallableJudge,
    Judge,
    NumberJudge,
    RewardModelJudge,
    RuleJudge,
    SamplingConfig,
)
from simpo_lightning.losses import (
    LOSSES,
    LossConfig,
    alphapo_loss,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    lndpo_loss,
    orpo_loss,
    rdpo_loss,
    simper_loss,
    simpo_loss,
)
from simpo_lightning.methods import (
    GRPOConfig,
    GRPOModule,
    PPOConfig,
    PPOModule,
    ReferenceConfig,
    RewardModule,
    RLOOConfig,
    RLOOModule,
    SFTModule,
    SimPOModule,
    UpdateConfig,
)
from simpo_lightning.models import LoraConfig, PolicyConfig, QuantizationConfig

_compat.install()
_compat.register_checkpoint_classes()

__all__ = [
    "LOSSES",
    "CallableJudge",
    "Columns",
    "GRPOConfig",
    "GRPOModule",
    "GenerationMonitor",
    "HeldOutReport",
    "Judge",
    "LoraConfig",
    "LossConfig",
    "PPOConfig",
    "PPOModule",
    "PeakMemory",
    "PolicyConfig",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PreferenceDiagnostics",
    "PromptDataModule",
    "QuantizationConfig",
    "RLOOConfig",
    "RLOOModule",
    "ReferenceConfig",
    "RewardModelJudge",
    "RewardModule",
    "NumberJudge",
    "RuleJudge",
    "SFTModule",
    "SamplingConfig",
    "SimPOModule",
    "Truncation",
    "UpdateConfig",
    "alphapo_loss",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "lndpo_loss",
    "orpo_loss",
    "rdpo_loss",
    "simper_loss",
    "simpo_loss",
]
