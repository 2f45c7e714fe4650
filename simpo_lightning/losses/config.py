"""``LossConfig``: which preference loss trains, and its hyperparameters as a config file gives them (a field left
null takes the loss function's default). The margin convention is in ``losses.preference``'s docstring."""

import inspect
import logging
from dataclasses import dataclass, fields
from typing import Any, Literal

from simpo_lightning.errors import require
from simpo_lightning.losses.preference import LOSSES, Method

log = logging.getLogger(__name__)


@dataclass
class LossConfig:
    """The preference loss and its hyperparameters. A field left null takes the method's default
    (the default of its loss function above); a field the method does not use is ignored with a
    warning, so switching ``name`` alone is enough to change method."""

    name: Literal["simpo", "dpo", "ipo", "cpo", "orpo", "kto", "alphapo", "simper", "lndpo", "rdpo"] = "simpo"
    """Key in ``LOSSES``. dpo, ipo, kto, lndpo and rdpo use a reference model."""
    beta: float | None = None
    """β (IPO's τ, ORPO's λ). Default: simpo, alphapo and lndpo 2.0, the others 0.1; simper has none."""
    gamma_beta_ratio: float | Literal["auto", "adaptive"] | None = None
    """simpo, alphapo: target margin γ/β (default 0.5); the paper's γ and TRL's ``simpo_gamma`` are
    ``beta * gamma_beta_ratio``. ``auto``: set once from the initial policy's reward gaps on a sample of the
    training pairs; ``adaptive``: follows the running reward gap of the training batches (both in
    ``simpo_lightning/margin.py``)."""
    max_gamma_beta_ratio: float | None = None
    """auto, adaptive: the largest γ/β they may choose (default 2.0)."""
    auto_pairs: int | None = None
    """auto: training pairs scored to set γ/β (default 256)."""
    margin_decay: float | None = None
    """adaptive: decay of the moving averages of the reward gap per training batch (default 0.9)."""
    margin_spread: float | None = None
    """adaptive: κ, standard deviations of the gap added to its running mean (default 0)."""
    label_smoothing: float | None = None
    """simpo, alphapo, dpo, cpo: probability that a preference label is flipped (default 0; sigmoid loss only)."""
    loss_type: Literal["sigmoid", "hinge"] | None = None
    """simpo, alphapo, dpo, cpo: ``sigmoid`` (default) or ``hinge``."""
    alphapo_alpha: float | None = None
    """alphapo: α, the shape of the reward (1 - p^(-α)) / α (default 0.25; 0 is SimPO); TRL's ``alpha``."""
    rdpo_alpha: float | None = None
    """rdpo: α, the weight of the length difference inside the sigmoid (default 0.01)."""
    sft_weight: float | None = None
    """Weight of an NLL term on the chosen (desirable) response tokens, token mean. Default: cpo and orpo 1,
    the others 0."""
    desirable_weight: float | None = None
    """kto: λ_D, weight of desirable examples (default 1)."""
    undesirable_weight: float | None = None
    """kto: λ_U, weight of undesirable examples (default 1)."""

    def __post_init__(self) -> None:
        require(
            self.beta is None or self.beta > 0,
            f"model.loss.beta = {self.beta}: must be > 0 (β ≤ 0 inverts or removes the preference)",
        )
        ratio = self.gamma_beta_ratio
        require(
            isinstance(ratio, str) or ratio is None or ratio >= 0,
            f"model.loss.gamma_beta_ratio = {ratio}: must be ≥ 0, auto or adaptive",
        )
        smoothing = self.label_smoothing
        require(
            smoothing is None or 0 <= smoothing < 0.5, f"model.loss.label_smoothing = {smoothing}: must be in [0, 0.5)"
        )
        for name in ("max_gamma_beta_ratio", "rdpo_alpha", "sft_weight", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"model.loss.{name} = {value}: must be ≥ 0")
        require(
            self.auto_pairs is None or self.auto_pairs >= 1, f"model.loss.auto_pairs = {self.auto_pairs}: must be ≥ 1"
        )
        decay = self.margin_decay
        require(decay is None or 0 <= decay < 1, f"model.loss.margin_decay = {decay}: must be in [0, 1)")

    def method(self) -> Method:
        return LOSSES[self.name]

    def hparams(self) -> dict[str, Any]:
        """The set fields the loss function takes; warns about set fields it does not take."""
        accepted = inspect.signature(self.method().loss).parameters
        margin = "gamma_beta_ratio" in accepted and isinstance(self.gamma_beta_ratio, str)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "sft_weight") or value is None or (margin and f.name in MARGIN_FIELDS):
                continue
            if f.name in accepted:
                out[f.name] = value
            else:
                log.warning("loss.%s = %r is ignored: %s does not use it", f.name, value, self.name)
        return out

    def nll_weight(self) -> float:
        """``sft_weight``, or the method's default."""
        return self.method().sft_weight if self.sft_weight is None else self.sft_weight


MARGIN_FIELDS = ("gamma_beta_ratio", "max_gamma_beta_ratio", "auto_pairs", "margin_decay", "margin_spread")
