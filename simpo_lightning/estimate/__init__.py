"""Will it fit, and how long will it take: a fit config's real training step on fake tensors (``command.estimate``)."""

from simpo_lightning.estimate.command import Estimate, estimate, predict, read_config

__all__ = ["Estimate", "estimate", "predict", "read_config"]
