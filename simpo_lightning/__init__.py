"""SimPO preference tuning for causal language models, on PyTorch Lightning."""

from simpo_lightning.data import PreferenceCollator, PreferenceDataModule
from simpo_lightning.losses import LOSSES, cpo_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from simpo_lightning.module import SimPOModule

__all__ = [
    "LOSSES",
    "PreferenceCollator",
    "PreferenceDataModule",
    "SimPOModule",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]
