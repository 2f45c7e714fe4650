"""SimPO's margin γ/β from the data: ``gamma_beta_ratio: auto`` (set once, before training, to the median of
|Δ| over a seeded sample of training pairs scored by the initial policy, clamped to ``max_gamma_beta_ratio``)
and ``adaptive`` (each step, the running mean of Δ, plus ``margin_spread`` running standard deviations, from the
batches before it), Δ = r̄(y_w) - r̄(y_l) the pair's gap of mean log-probs. Both are this project's rules; their
state lives in ``Margin``'s buffers, so checkpoints carry it. Reasons and measurements: docs/methods.md.
"""

import inspect
import logging
import math
from typing import Literal

import torch
from torch import Tensor, nn

from simpo_lightning.errors import UserError
from simpo_lightning.losses.config import LossConfig

log = logging.getLogger(__name__)

MarginMode = Literal["auto", "adaptive"]


def auto_gamma_beta_ratio(gaps: Tensor, max_ratio: float = 2.0) -> float:
    """γ/β of ``auto``: the median of |Δ| over the sampled pairs, clamped to [0, ``max_ratio``]. (torch's
    median: the lower of the two middle values for an even count.)"""
    return min(gaps.abs().median().item(), max_ratio)


def gap_summary(gaps: Tensor) -> dict[str, float]:
    """What ``auto`` logs about the distribution it was set from."""
    return {
        "median_abs_gap": gaps.abs().median().item(),
        "mean_gap": gaps.mean().item(),
        "std_gap": gaps.std().item() if len(gaps) > 1 else 0.0,
        "share_positive": (gaps > 0).double().mean().item(),
        "pairs": float(len(gaps)),
    }


def ema_moments(moments: Tensor, batch: Tensor, decay: float) -> Tensor:
    """Moving averages ``[E Δ, E Δ²]`` after one batch: decay · old + (1 - decay) · batch (uncorrected)."""
    return decay * moments + (1 - decay) * batch


def adaptive_gamma_beta_ratio(
    moments: Tensor, steps: int, decay: float, spread: float = 0.0, max_ratio: float = 2.0
) -> float:
    """γ/β of ``adaptive`` from the moving moments after ``steps`` batches: with bias-corrected mean m and
    second moment q (divided by 1 - decay^steps), clamp(m + spread · sqrt(max(q - m², 0)), 0, max_ratio);
    0 before any batch."""
    if steps == 0:
        return 0.0
    mean, square = (moments / (1 - decay**steps)).tolist()
    value = mean + spread * math.sqrt(max(square - mean * mean, 0.0))
    return min(max(value, 0.0), max_ratio)


class Margin(nn.Module):
    """The γ/β a SimPO (or AlphaPO) run trains with when it is ``auto`` or ``adaptive``: its state as
    buffers, so checkpoints carry it."""

    def __init__(self, mode: MarginMode, max_ratio: float, decay: float, spread: float):
        super().__init__()
        if mode not in ("auto", "adaptive"):
            raise UserError(f"gamma_beta_ratio must be a number, 'auto' or 'adaptive', got {mode!r}")
        if not 0 <= decay < 1 or max_ratio < 0:
            raise UserError(
                f"margin_decay must be in [0, 1) and max_gamma_beta_ratio at least 0, got {decay}, {max_ratio}"
            )
        self.mode, self.max_ratio, self.decay, self.spread = mode, max_ratio, decay, spread
        self.register_buffer("value", torch.tensor(float("nan"), dtype=torch.float64))  # auto: NaN until set
        self.register_buffer("moments", torch.zeros(2, dtype=torch.float64))  # adaptive: E Δ, E Δ² (moving)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def is_set(self) -> bool:
        return self.mode == "adaptive" or not math.isnan(self.value.item())

    def ratio(self) -> float:
        """The γ/β for the next batch."""
        if self.mode == "auto":
            if not self.is_set:
                raise UserError(
                    "loss.gamma_beta_ratio auto is set when fit starts: validate or test a checkpoint of such a "
                    "fit (--ckpt_path), or give a number"
                )
            return self.value.item()
        return adaptive_gamma_beta_ratio(self.moments, int(self.steps), self.decay, self.spread, self.max_ratio)

    def set_auto(self, gaps: Tensor) -> dict[str, float]:
        self.value.fill_(auto_gamma_beta_ratio(gaps, self.max_ratio))
        summary = {"gamma_beta_ratio": self.value.item(), **gap_summary(gaps)}
        log.info("gamma_beta_ratio auto = %.4f from %d pairs: %s", self.value.item(), len(gaps), summary)
        return summary

    def observe(self, batch_moments: Tensor) -> None:
        """Adaptive: one training batch's ``[mean Δ, mean Δ²]`` (over all processes)."""
        if self.mode == "adaptive":
            self.moments.copy_(ema_moments(self.moments, batch_moments.to(self.moments), self.decay))
            self.steps += 1


def margin_of(loss: LossConfig) -> Margin | None:
    """The ``Margin`` of ``gamma_beta_ratio`` auto or adaptive, for losses with a margin; else None (a number is
    a plain hyperparameter; ``LossConfig.hparams`` warns when a loss has no margin to take)."""
    if not isinstance(loss.gamma_beta_ratio, str):
        return None
    if "gamma_beta_ratio" not in inspect.signature(loss.method().loss).parameters:
        return None

    def value(name: str, default: float) -> float:
        return default if getattr(loss, name) is None else getattr(loss, name)

    return Margin(
        loss.gamma_beta_ratio,
        value("max_gamma_beta_ratio", 2.0),
        value("margin_decay", 0.9),
        value("margin_spread", 0.0),
    )


@torch.no_grad()
def sample_gaps(model: nn.Module, rows, collate, pairs: int, seed: int, batch_size: int, chunk, device) -> Tensor:
    """Δ of a seeded sample of ``pairs`` rows of a split, scored by ``model`` (every process scores the
    same rows, so every process gets the same value with no communication, and sharded models stay in
    lockstep)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from simpo_lightning.scoring.sequences import score_pair_batch

    generator = torch.Generator().manual_seed(seed)
    chosen_rows = torch.randperm(len(rows), generator=generator)[:pairs].sort().values.tolist()
    was_training = model.training
    model.eval()
    gaps = []
    for start in range(0, len(chosen_rows), batch_size):
        batch = collate(rows.select(chosen_rows[start : start + batch_size]).to_list())
        chosen, rejected = score_pair_batch(model, move_data_to_device(batch, device), chunk).halves()
        gaps.append((chosen.mean_logps - rejected.mean_logps).double().cpu())
    model.train(was_training)
    return torch.cat(gaps)


def set_auto_margin(module, pairs: int | None) -> None:
    """At the start of fit: an ``auto`` margin that is not set yet (a resumed run's checkpoint holds it) is
    set from the training split of the module's ``PreferenceDataModule``, and logged."""
    from simpo_lightning.data import PreferenceCollator

    margin, trainer = module.margin, module.trainer
    if margin is None or margin.is_set:
        return
    datamodule = getattr(trainer, "datamodule", None)
    if getattr(datamodule, "splits", None) is None or "train" not in datamodule.splits:
        raise UserError(
            "model.loss.gamma_beta_ratio auto needs a PreferenceDataModule with training data (it scores its pairs)"
        )
    hp = datamodule.hparams
    collate = PreferenceCollator(module.tokenizer.pad_token_id, hp.shared_prompt)
    with trainer.precision_plugin.forward_context():  # as the training steps will score
        gaps = sample_gaps(
            module.model,
            datamodule.splits["train"],
            collate,
            pairs or 256,
            hp.seed,
            hp.batch_size,
            module.chunk,
            module.device,
        )
    summary = margin.set_auto(gaps)
    for logger in module.loggers:
        logger.log_metrics({f"margin/auto/{k}": v for k, v in summary.items()}, step=0)
