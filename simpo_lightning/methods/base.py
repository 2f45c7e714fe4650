"""The training-module contract: what every LightningModule of this package is given and does.

``TrainingModule`` takes what every method takes — the policy, its LoRA adapters, the optimizer and the shared
training settings, declared once here (a subclass passes them on with ``**training``, and a config gives them as
``model.warmup_ratio`` and so on) — and does what every method does: it records them as hyperparameters (plain
values, so checkpoints load with ``weights_only``), checks them, loads the tokenizer, builds the model once in
``configure_model`` (sharded under ModelParallelStrategy), runs the learning-rate schedule, skips non-finite
losses, validates and tests with whole-set means, and saves LoRA checkpoints that hold the trainable weights
only and record the model's head. A subclass provides:

- ``metrics``: the per-example metric names its validation reports (a class attribute);
- ``build_model()``: its model, built once; ``shard_parts(shard)`` shards anything else it built beside it;
- ``evaluate(batch)``: the per-example metrics (``[B]`` each) of a held-out batch, for validation, test and
  ``HeldOutReport``.

Two families build on it. ``SupervisedModule``, a loss per batch in Lightning's own loop (preference methods,
SFT, reward models), adds ``step(batch) -> (loss, metrics)``; ``methods.rollout.RolloutModule`` (online RL) samples,
judges and updates by hand. Neither overrides the other's loop.
"""

import logging
import math
import time
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from simpo_lightning.errors import UserError, require
from simpo_lightning.methods.optim import OptimizerInBackward
from simpo_lightning.models.loading import Head, LoraConfig, PolicyConfig, load_tokenizer
from simpo_lightning.models.parallel import shard

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
    """The shared part of every training module (the module docstring gives the contract).

    Args:
        policy: which model to load and how.
        lora: LoRA adapters; null trains every weight.
        optimizer: optimizer class and arguments, called with the trainable parameters.
        warmup_ratio: share of the steps with linear learning-rate warm-up from 0.
        lr_schedule: decay after warm-up.
        max_nonfinite_steps: a NaN/inf loss skips its step (counted, logged); this many in a row stops training.
        optimizer_in_backward: step each parameter as soon as its gradient is complete and free the
            gradient (``OptimizerInBackward``): saves the memory of all gradients at once. One process
            only, and no gradient clipping, accumulation or 16-mixed precision.
        logits_chunk: response positions per chunk of the output head when computing log-probs, so the
            full-vocabulary logits of the batch never exist (forward or backward); null computes the
            model's full logits instead (also used where the head is not a plain linear layer, and
            under ModelParallelStrategy).
    """

    metrics: ClassVar[list[str]]
    """The per-example metrics ``evaluate`` returns, by their logged names."""
    head: ClassVar[Head] = "causal"
    """The model's head, recorded in checkpoints (``models.checkpoints``)."""
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.1,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        max_nonfinite_steps: int = 10,
        optimizer_in_backward: bool = False,
        logits_chunk: int | None = 1024,
    ):
        super().__init__()
        # Lightning collects the arguments of every __init__ on the stack, the subclass's included.
        self.save_hyperparameters(ignore=["optimizer", "judge"])
        for hparams in (self._hparams, self._hparams_initial):
            hparams.update({k: asdict(v) for k, v in hparams.items() if is_dataclass(v)})
        require(0 <= warmup_ratio < 1, f"model.warmup_ratio = {warmup_ratio}: must be in [0, 1)")
        require(max_nonfinite_steps >= 1, f"model.max_nonfinite_steps = {max_nonfinite_steps}: must be ≥ 1")
        require(
            logits_chunk is None or logits_chunk >= 1,
            f"model.logits_chunk = {logits_chunk}: must be ≥ 1, or null for full logits",
        )
        self.policy, self.lora, self.optimizer = policy, lora, optimizer
        # The settings as given (hparams may be the config file's record instead, under LightningCLI).
        self.warmup_ratio, self.lr_schedule, self.max_nonfinite_steps = warmup_ratio, lr_schedule, max_nonfinite_steps
        self.optimizer_in_backward, self.logits_chunk = optimizer_in_backward, logits_chunk
        self.tokenizer = load_tokenizer(policy)
        self.model: nn.Module | None = None
        self.val_metrics = metric_states(self.metrics)
        # Checkpoints of a LoRA run hold only the trainable weights; the base reloads from its source.
        self.strict_loading = lora is None

    # ------------------------------------------------------------------ what a subclass provides

    def build_model(self) -> nn.Module:
        """The model, built once (before any sharding)."""
        raise NotImplementedError

    def shard_parts(self) -> None:
        """Under ModelParallelStrategy, shards what ``build_model`` built beside the model (``self.sharded``)."""

    def evaluate(self, batch: Any) -> dict[str, Tensor]:
        """The per-example metrics (each ``[B]``, under their logged names) of a held-out batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the model

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.sharded(self.build_model())
            self.shard_parts()

    @property
    def chunk(self) -> int | None:
        """``logits_chunk``, except under ModelParallelStrategy (whose sharded head needs the model's own forward)."""
        return self.logits_chunk if self.device_mesh is None else None

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

    # ------------------------------------------------------------------ validation and test

    def _eval_step(self, batch: Any, prefix: str) -> dict[str, Tensor]:
        """Updates the whole-set means; returns the per-example metrics (for callbacks such as diagnostics)."""
        metrics = self.evaluate(batch)
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

    # ------------------------------------------------------------------ optimizer and schedule

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_in_backward:
            self._check_in_backward()
            optimizer = OptimizerInBackward(params, self.optimizer)
        else:
            optimizer = self.optimizer(params)
        rates = [group["lr"] for group in optimizer.param_groups]
        require(all(rate > 0 for rate in rates), f"model.optimizer: learning rate {min(rates)}: must be > 0")
        schedule, estimated = self.lr_schedule, self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):  # no step limit (a run bounded by trainer.max_time only)
            if self.warmup_ratio or schedule != "constant":
                raise UserError(
                    "without trainer.max_steps (or max_epochs) the number of steps is unknown, so warm-up and "
                    "decay have no length: set model.warmup_ratio 0 and model.lr_schedule constant, or a step limit"
                )
            estimated = 1
        total = max(1, int(estimated))
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[
                schedule
            ]

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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

    def on_train_end(self) -> None:
        for optimizer in self.trainer.optimizers:
            if isinstance(optimizer, OptimizerInBackward):
                optimizer.remove_hooks()

    # ------------------------------------------------------------------ non-finite losses, cross-process statistics

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
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
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

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["head"] = self.head  # export and loading build the model with this head
        if self._trainer is not None:  # the last held-out metrics, for the model card export writes
            metrics = self.trainer.callback_metrics.items()
            checkpoint["metrics"] = {k: float(v) for k, v in metrics if k.startswith(("val/", "heldout/"))}
        # A LoRA checkpoint holds the trainable weights only; the base reloads from its source. Sharded
        # (distributed) checkpoints keep every key: their loader expects the model's full state dict.
        if self.lora is not None and self.device_mesh is None:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            trainable |= {name for name, _ in self.named_buffers() if not name.startswith("model.")}  # e.g. margin
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


class SupervisedModule(TrainingModule):
    """A loss per batch, in Lightning's loop: ``step(batch) -> (loss, per-example metrics)``, the same step for
    training (non-finite losses skipped), validation and test; gradient clipping where Lightning refuses it;
    tokens per second."""

    def step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and per-example metrics (each ``[B]``, under their logged names) of one batch."""
        raise NotImplementedError

    def evaluate(self, batch: Any) -> dict[str, Tensor]:
        return self.step(batch)[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss, metrics = self.step(batch)
        if not torch.isfinite(loss):
            return self.skip_nonfinite(loss)
        self.nonfinite_in_a_row = 0
        n = len(metrics["loss"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)  # the mean over all processes
        self.log_dict({f"train/{k}": v.mean() for k, v in metrics.items() if k != "loss" and v.numel()}, batch_size=n)
        return loss

    def pair_mean(self, losses: Tensor) -> Tensor:
        """The training loss from per-pair ``losses``: their mean over the pairs of every process's batch. Data
        parallelism averages the processes' gradients, and packed batches (``data.max_tokens_per_row``) hold
        different numbers of pairs, so each process's sum is scaled by the processes' count over the pairs of all."""
        if not self.training or self._trainer is None or self.trainer.world_size == 1:
            return losses.mean()
        count = self.trainer.strategy.reduce(torch.tensor(float(len(losses)), device=losses.device), reduce_op="sum")
        return losses.sum() * self.trainer.world_size / count

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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        self.log("train/tokens_per_sec", batch.tokens() / seconds, prog_bar=True)
        self.log("train/step_seconds", seconds)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
