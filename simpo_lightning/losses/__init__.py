"""Losses as pure tensor functions: the preference losses and their registry (``preference``), the configuration
that picks one (``config``), and the online methods' advantages, KL and clipped objectives (``rl``)."""

from simpo_lightning.losses.config import LossConfig
from simpo_lightning.losses.preference import (
    LOSSES,
    BinaryLoss,
    Method,
    alphapo_loss,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    lndpo_loss,
    orpo_loss,
    rdpo_loss,
    simper_loss,
    simpo_loss,
)

__all__ = [
    "LOSSES",
    "BinaryLoss",
    "LossConfig",
    "Method",
    "alphapo_loss",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "lndpo_loss",
    "orpo_loss",
    "rdpo_loss",
    "simper_loss",
    "simpo_loss",
]
