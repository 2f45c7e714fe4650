"""The LightningModule: one shared step for train, validation and test."""

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from simpo_lightning.logprobs import IGNORE_INDEX, sequence_logps
from simpo_lightning.losses import LOSSES
from simpo_lightning.model import LoraConfig, PolicyConfig, build_policy, load_tokenizer

log = logging.getLogger(__name__)

METRICS = [f"{group}/{side}" for group in ("rewards", "logps", "logits", "lengths") for side in ("chosen", "rejected")]
METRICS += ["rewards/accuracies", "rewards/margins", "loss"]


@dataclass
class LossConfig:
    """The preference loss and its hyperparameters."""

    name: Literal["simpo"] = "simpo"
    """Key in ``simpo_lightning.losses.LOSSES``."""
    beta: float = 2.0
    """Reward scale β (the SimPO reference's default)."""
    gamma_beta_ratio: float = 0.5
    """Target margin γ/β; the paper's γ and TRL's ``simpo_gamma`` are ``beta * gamma_beta_ratio``."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (sigmoid loss only)."""
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen response tokens (token mean), off by default."""


# Checkpoints record these in their hyperparameters; resuming loads with weights_only=True.
torch.serialization.add_safe_globals([PolicyConfig, LoraConfig, LossConfig])


class SimPOModule(L.LightningModule):
    """Preference-tunes a causal LM.

    Args:
        policy: which model to load and how.
        lora: LoRA adapters; null trains every weight.
        loss: the preference loss.
        optimizer: optimizer class and arguments, called with the trainable parameters.
        warmup_ratio: share of the steps with linear learning-rate warm-up from 0.
        lr_schedule: decay after warm-up.
        max_nonfinite_steps: a NaN/inf loss skips its step (counted, logged); this many in a row stops training.
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        loss: LossConfig = LossConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.1,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        max_nonfinite_steps: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])  # for the record: it stores dataclasses as dicts
        self.policy, self.lora, self.loss_config, self.optimizer = policy, lora, loss, optimizer
        self.tokenizer = load_tokenizer(policy)
        self.model: nn.Module | None = None
        self.val_metrics = nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in METRICS})
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        # Checkpoints of a LoRA run hold only the trainable weights; the base reloads from its source.
        self.strict_loading = lora is None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_policy(self.policy, self.lora)

    # ------------------------------------------------------------------ the step

    def forward_logps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One forward pass over chosen and rejected, concatenated on the batch axis.

        Returns per-example ``[B]`` tensors: mean response log-prob (``logps``), summed log-prob
        (``sum_logps``), response length (``lengths``) and mean logit over response positions
        (``logits``), each under ``chosen_`` and ``rejected_`` keys.
        """
        n = batch["chosen_input_ids"].shape[0]
        cat = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")}
        # Only positions that predict a response token need logits: skipping the output head over the
        # rest of the prompt saves most of its cost (by FLOPs the head is a fifth of SmolLM2's forward).
        labels = cat["labels"]
        first = int((labels != IGNORE_INDEX).int().argmax(-1).min())
        keep = min(labels.shape[1], labels.shape[1] - first + 1)
        logits = self.model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], logits_to_keep=keep).logits
        labels = labels[:, -keep:]
        sums, lengths = sequence_logps(logits, labels, average=False)
        mask = labels[:, 1:] != IGNORE_INDEX
        mean_logit = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1) / lengths
        out = {"logps": sums / lengths, "sum_logps": sums, "lengths": lengths, "logits": mean_logit}
        return {f"{side}_{k}": v[sl] for k, v in out.items() for side, sl in (("chosen", slice(0, n)), ("rejected", slice(n, None)))}

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics ``[B]`` for one batch of pairs."""
        out = self.forward_logps(batch)
        cfg = self.loss_config
        hparams = {k: v for k, v in asdict(cfg).items() if k not in ("name", "sft_weight")}
        losses, chosen_rewards, rejected_rewards = LOSSES[cfg.name](out["chosen_logps"], out["rejected_logps"], **hparams)
        loss = losses.mean()
        if cfg.sft_weight:
            nll = -out["chosen_sum_logps"].sum() / out["chosen_lengths"].sum()
            loss = loss + cfg.sft_weight * nll
        metrics = {
            "loss": losses.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
        }
        for side in ("chosen", "rejected"):
            for group in ("logps", "logits", "lengths"):
                metrics[f"{group}/{side}"] = out[f"{side}_{group}"].detach().float()
        return loss, metrics

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss, metrics = self.step(batch)
        if not torch.isfinite(loss):
            return self._skip_nonfinite(loss)
        self.nonfinite_in_a_row = 0
        n = batch["chosen_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v.mean() for k, v in metrics.items() if k != "loss"}, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
        self.log("train/tokens_per_sec", tokens.float() / seconds, prog_bar=True)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))

    def _skip_nonfinite(self, loss: Tensor) -> None:
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning("non-finite loss %s at step %d: skipped (%d so far)", loss.item(), self.global_step, self.nonfinite_steps)
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row: lower the learning rate, use float32 or "
                "bf16-mixed instead of 16-mixed, or check the data"
            )
        return None

    def _eval_step(self, batch: dict[str, Tensor], prefix: str) -> None:
        _, metrics = self.step(batch)
        for key, values in metrics.items():
            metric = self.val_metrics[key.replace("/", "_")]
            metric.update(values)
            self.log(f"{prefix}/{key}", metric, prog_bar=key == "rewards/accuracies")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        schedule = self.hparams.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora is not None:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
