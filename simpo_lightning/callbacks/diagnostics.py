"""Diagnostics of paired preference training over the whole validation set, and warnings when it goes wrong.

Each validation, over every validation pair (all processes): the correlation between a pair's reward
margin and its length difference (chosen minus rejected, tokens), the share of pairs whose chosen
response is longer, and the reward accuracy on those and on the others; logged as ``diagnostics/…``.
At the end of fit a scatter of margin against length difference is written as a PNG (and logged to
W&B where a W&B logger runs).

Two warnings, each logged once (and optionally stopping the run):

- **likelihood displacement**: the chosen responses' mean log-prob per token fell at each of the last
  ``patience`` validations while the mean reward margin rose: the policy separates the pairs by lowering
  the chosen response too (Razin et al., 2024, "Unintentional Unalignment"); an SFT term (``sft_weight``),
  a lower learning rate or a smaller β are the usual remedies.
- **collapse**: both sides' mean log-prob per token within ``collapse_tolerance`` of -log V (the uniform
  distribution over the vocabulary), or no validation pair whose chosen and rejected log-probs differ:
  the model no longer tells responses apart, whatever the loss says. Not checked before the first
  optimizer step, nor for a randomly initialised policy (``random_init``), which starts uniform.
"""

import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

KEYS = ("rewards/margins", "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected")


def length_diagnostics(margins: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor) -> dict[str, float]:
    """Pearson correlation of margin and length difference (NaN where either is constant), the share of
    pairs with the longer chosen response, and the reward accuracy (margin > 0) of those, of the pairs with
    the shorter chosen response and of the pairs of equal length (NaN where there are none)."""
    margins, difference = margins.double(), (chosen_lengths - rejected_lengths).double()

    def accuracy(rows: Tensor) -> float:
        return (margins[rows] > 0).double().mean().item() if rows.any() else math.nan

    centred = torch.stack([margins - margins.mean(), difference - difference.mean()])
    norms = centred.norm(dim=1)
    correlation = (centred[0] @ centred[1] / (norms[0] * norms[1])).item() if (norms > 0).all() else math.nan
    return {
        "margin_length_correlation": correlation,
        "chosen_longer_share": (difference > 0).double().mean().item(),
        "accuracy_chosen_longer": accuracy(difference > 0),
        "accuracy_chosen_shorter": accuracy(difference < 0),
        "accuracy_same_length": accuracy(difference == 0),
    }


def collapse(chosen: Tensor, rejected: Tensor, vocab_size: int, tolerance: float) -> str | None:
    """Why the model looks collapsed, from the mean log-prob per token of each chosen and rejected
    response; None when it does not."""
    uniform = -math.log(vocab_size)
    means = chosen.double().mean().item(), rejected.double().mean().item()
    if all(abs(m - uniform) < tolerance for m in means):
        return (
            f"the mean log-prob per token is {means[0]:.3f} (chosen) and {means[1]:.3f} (rejected), within "
            f"{tolerance} of -log V = {uniform:.3f}: the model gives every token about the same probability"
        )
    if (chosen.double() - rejected.double()).abs().max().item() < 1e-6:
        return "every validation pair's chosen and rejected responses have the same log-prob per token"
    return None


def displaced(history: list[tuple[float, float]], patience: int) -> bool:
    """Over ``history`` of (chosen log-prob per token, mean margin) per validation: the chosen log-prob fell
    and the margin rose at each of the last ``patience`` validations."""
    if len(history) <= patience:
        return False
    recent = history[-patience - 1 :]
    return all(b[0] < a[0] and b[1] > a[1] for a, b in zip(recent, recent[1:]))


class PreferenceDiagnostics(L.Callback):
    """Length diagnostics and the displacement and collapse warnings (see the module docstring) for
    methods trained on pairs; does nothing for unpaired data or modules without reward margins.

    Args:
        patience: validations in a row with falling chosen log-probs and rising margins before the
            displacement warning.
        collapse_tolerance: nats from -log V within which both sides count as uniform.
        stop_on: warnings that also stop training (``collapse``, ``displacement``).
        scatter: write the margin-against-length-difference PNG at the end of fit.
    """

    def __init__(
        self,
        patience: int = 2,
        collapse_tolerance: float = 0.05,
        stop_on: tuple[Literal["collapse", "displacement"], ...] = (),
        scatter: bool = True,
    ):
        self.patience, self.collapse_tolerance, self.stop_on, self.scatter = (
            patience,
            collapse_tolerance,
            stop_on,
            scatter,
        )
        self.history: list[tuple[float, float]] = []
        self.warned: dict[str, str] = {}
        self.pairs: dict[str, list[Tensor]] = {}
        self.last: dict[str, Tensor] = {}

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.pairs = {key: [] for key in KEYS}

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and all(key in outputs for key in KEYS):
            for key in KEYS:
                self.pairs[key].append(outputs[key].detach().double().cpu())

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not self.pairs or not self.pairs["rewards/margins"]:
            return
        pairs = self.last = _gathered({key: torch.cat(values) for key, values in self.pairs.items()})
        summed = not getattr(getattr(module, "method", None), "average", True)  # per token for the checks
        per_token = {
            side: pairs[f"logps/{side}"] / (pairs[f"lengths/{side}"].clamp(min=1) if summed else 1)
            for side in ("chosen", "rejected")
        }
        values = length_diagnostics(pairs["rewards/margins"], pairs["lengths/chosen"], pairs["lengths/rejected"])
        module.log_dict({f"diagnostics/{k}": v for k, v in values.items() if not math.isnan(v)})
        self.history.append((per_token["chosen"].mean().item(), pairs["rewards/margins"].mean().item()))
        if displaced(self.history, self.patience):
            falls = " -> ".join(f"{c:.3f}" for c, _ in self.history[-self.patience - 1 :])
            rises = " -> ".join(f"{m:.3f}" for _, m in self.history[-self.patience - 1 :])
            self._warn(
                trainer,
                "displacement",
                f"likelihood displacement: the chosen responses' log-prob per token fell over the last "
                f"{self.patience + 1} validations ({falls}) while the reward margin rose ({rises}): the policy "
                "lowers the chosen responses too; consider loss.sft_weight, a lower learning rate or a smaller beta",
            )
        if trainer.global_step == 0 or getattr(getattr(module, "policy", None), "random_init", False):
            return  # a random model starts uniform: collapse is something training does
        vocab = module.model.config.vocab_size if hasattr(module.model, "config") else len(module.tokenizer)
        why = collapse(per_token["chosen"], per_token["rejected"], vocab, self.collapse_tolerance)
        if why is not None:
            self._warn(trainer, "collapse", f"collapse: {why}; lower the learning rate or restart from a checkpoint")

    def _warn(self, trainer, kind: str, message: str) -> None:
        stop = kind in self.stop_on
        if kind not in self.warned:
            self.warned[kind] = message
            log.warning("%s%s", message, " (stopping: diagnostics stop_on)" if stop else "")
        if stop:
            trainer.should_stop = True

    def on_fit_end(self, trainer, module) -> None:
        if not self.scatter or not self.last or not trainer.is_global_zero:
            return
        path = Path(trainer.log_dir or trainer.default_root_dir) / "margin_vs_length.png"
        write_scatter(self.last, path)
        log.info("wrote %s", path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="diagnostics/margin_vs_length", images=[str(path)])

    def state_dict(self) -> dict:
        return {"history": self.history, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.warned = [tuple(h) for h in state["history"]], dict(state["warned"])


def _gathered(pairs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every process's validation pairs (processes may hold different numbers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return pairs
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, pairs)
    return {key: torch.cat([part[key] for part in parts]) for key in pairs}


def write_scatter(pairs: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    difference = (pairs["lengths/chosen"] - pairs["lengths/rejected"]).numpy()
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.scatter(difference, pairs["rewards/margins"].numpy(), s=12, alpha=0.6)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("length difference, chosen - rejected (tokens)")
    axes.set_ylabel("reward margin")
    axes.set_title("validation pairs at the end of fit")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
