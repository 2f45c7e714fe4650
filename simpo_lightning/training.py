"""What every training LightningModule of this package shares, whatever it trains: the train,
validation and test steps around its own ``step``, the optimizer and learning-rate schedule, gradient
clipping where Lightning refuses it, the optimizer step in the backward pass, skipping non-finite
losses, step timing, and LoRA checkpoints that hold only the trainable weights.

A subclass implements ``step(batch) -> (loss, per-example metrics)``, sets ``self.optimizer`` (a
callable from parameters to an optimizer), ``self.policy`` and ``self.lora`` (the model's configs) and
``self.val_metrics = metric_states(names)``, and saves these hyperparameters: ``warmup_ratio``,
``lr_schedule``, ``max_nonfinite_steps``, ``optimizer_in_backward``, ``logits_chunk``.
"""

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from simpo_lightning.errors import UserError, require
from simpo_lightning.model import shard
from simpo_lightning.optim import OptimizerInBackward

log = logging.getLogger(__name__)


def metric_states(names: list[str]) -> nn.ModuleDict:
    """A running mean per logged metric name, so validation reports whole-set means (across processes)."""
    return nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in names})


def pair_reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """Per-pair metrics (TRL's names) of the chosen and rejected responses' rewards: ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins`` and ``rewards/accuracies`` (1 where r_w > r_l)."""
    margins = chosen - rejected
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
    }


class TrainingModule(L.LightningModule):
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and per-example metrics (each ``[B]``, under their logged names) of one batch."""
        raise NotImplementedError

    @property
    def chunk(self) -> int | None:
        """``logits_chunk``, except under ModelParallelStrategy (whose sharded head needs the model's own forward)."""
        return self.hparams.logits_chunk if self.device_mesh is None else None

    def sharded(self, model: nn.Module) -> nn.Module:
        """Under ModelParallelStrategy, ``model`` sharded with FSDP2 over the data-parallel dimension; else itself."""
        if self.device_mesh is None:
            return model
        if self.policy.quantization is not None:
            raise UserError(
                "model.policy.quantization cannot be combined with ModelParallelStrategy (bitsandbytes weights do not "
                "shard); use one device, or no quantization"
            )
        return shard(model, self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss, metrics = self.step(batch)
        if not torch.isfinite(loss):
            return self.skip_nonfinite(loss)
        self.nonfinite_in_a_row = 0
        n = len(metrics["loss"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)  # the mean over all processes
        self.log_dict({f"train/{k}": v.mean() for k, v in metrics.items() if k != "loss" and v.numel()}, batch_size=n)
        return loss

    def _eval_step(self, batch: Any, prefix: str) -> dict[str, Tensor]:
        """Updates the whole-set means; returns the per-example metrics (for callbacks such as diagnostics)."""
        _, metrics = self.step(batch)
        for key, values in metrics.items():
            if not values.numel():
                continue
            metric = self.val_metrics[key.replace("/", "_")]
            metric.update(values)
            self.log(f"{prefix}/{key}", metric, prog_bar=key == "rewards/accuracies")
        return metrics

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def setup(self, stage: str) -> None:
        """The shared settings, checked before anything is loaded or trained."""
        hp = self.hparams
        require(0 <= hp.warmup_ratio < 1, f"model.warmup_ratio = {hp.warmup_ratio}: must be in [0, 1)")
        require(hp.max_nonfinite_steps >= 1, f"model.max_nonfinite_steps = {hp.max_nonfinite_steps}: must be ≥ 1")
        chunk = hp.get("logits_chunk")
        require(chunk is None or chunk >= 1, f"model.logits_chunk = {chunk}: must be ≥ 1, or null for full logits")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.get("optimizer_in_backward"):
            self._check_in_backward()
            optimizer = OptimizerInBackward(params, self.optimizer)
        else:
            optimizer = self.optimizer(params)
        rates = [group["lr"] for group in optimizer.param_groups]
        require(all(rate > 0 for rate in rates), f"model.optimizer: learning rate {min(rates)}: must be > 0")
        schedule, estimated = self.hparams.lr_schedule, self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):  # no step limit (a run bounded by trainer.max_time only)
            if self.hparams.warmup_ratio or schedule != "constant":
                raise UserError(
                    "without trainer.max_steps (or max_epochs) the number of steps is unknown, so warm-up and "
                    "decay have no length: set model.warmup_ratio 0 and model.lr_schedule constant, or a step limit"
                )
            estimated = 1
        total = max(1, int(estimated))
        warmup = int(self.hparams.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[
                schedule
            ]

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clipping by global norm where Lightning's own path refuses two setups the configs use:
        FSDPStrategy (sharded gradients need the FSDP root's ``clip_grad_norm_``) and a fused optimizer
        under bf16-mixed (Lightning guards against float16 loss scaling, which bfloat16 does not use)."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            from torch.distributed.fsdp import FullyShardedDataParallel

            root = self.trainer.strategy.model
            if isinstance(root, FullyShardedDataParallel):
                root.clip_grad_norm_(gradient_clip_val)
                return
            if getattr(self.trainer.precision_plugin, "scaler", None) is None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _check_in_backward(self) -> None:
        trainer = self.trainer
        conflicts = {
            "more than one process": trainer.world_size > 1,
            "trainer.accumulate_grad_batches > 1": trainer.accumulate_grad_batches > 1,
            "trainer.gradient_clip_val": bool(trainer.gradient_clip_val),
            "precision 16-mixed (loss scaling)": str(trainer.precision).startswith("16"),
        }
        found = [name for name, present in conflicts.items() if present]
        if found:
            raise UserError(
                f"model.optimizer_in_backward needs every gradient only once, at its own step; it cannot "
                f"be combined with {', '.join(found)}"
            )

    def skip_nonfinite(self, loss: Tensor, what: str = "loss") -> None:
        """Counts and logs a non-finite loss (or other ``what``), whose step is then skipped (``training_step``
        returns None); ``max_nonfinite_steps`` of them in a row stop training."""
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning(
            "non-finite %s %s at step %d: skipped (%d so far)",
            what,
            loss.item(),
            self.global_step,
            self.nonfinite_steps,
        )
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise UserError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row: lower the learning rate, use float32 or "
                "bf16-mixed instead of 16-mixed, or check the data"
            )

    def reduced_mean(self, x: Tensor) -> Tensor:
        """The mean of every process's values of ``x``."""
        n, total, _ = self._reduced_sums(x)
        return (total / n).to(x.dtype)

    def reduced_std(self, x: Tensor) -> Tensor:
        """The standard deviation (Bessel's correction) of every process's values of ``x``."""
        n, total, squares = self._reduced_sums(x)
        return ((squares - total * total / n) / (n - 1)).clamp(min=0).sqrt().to(x.dtype)

    def _reduced_sums(self, x: Tensor) -> Tensor:
        """(count, Σx, Σx²) over every process, in float64."""
        sums = torch.stack([torch.tensor(float(len(x)), device=x.device), x.sum(), (x * x).sum()]).double()
        return self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        self.log("train/tokens_per_sec", batch.tokens() / seconds, prog_bar=True)
        self.log("train/step_seconds", seconds)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))

    def on_train_end(self) -> None:
        for optimizer in self.trainer.optimizers:
            if isinstance(optimizer, OptimizerInBackward):
                optimizer.remove_hooks()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["simpo_lightning_module"] = type(self).__name__  # export and loading tell reward models apart
        # A LoRA checkpoint holds the trainable weights only; the base reloads from its source. Sharded
        # (distributed) checkpoints keep every key: their loader expects the model's full state dict.
        if self.lora is not None and self.device_mesh is None:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            trainable |= {name for name, _ in self.named_buffers() if not name.startswith("model.")}  # e.g. margin
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
