"""The LightningModule: one shared step for train, validation and test."""

import copy
import gc
import hashlib
import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from simpo_lightning.data import PreferenceCollator, mismatched_batch
from simpo_lightning.logprobs import IGNORE_INDEX, at_least_float32, label_logps, sequence_logps
from simpo_lightning.losses import LOSSES, Method, kto_kl
from simpo_lightning.model import (
    LoraConfig, PolicyConfig, QuantizationConfig, build_policy, decoder_and_head, load_tokenizer, shard,
)
from simpo_lightning.optim import OptimizerInBackward

log = logging.getLogger(__name__)

METRICS = [f"{group}/{side}" for group in ("rewards", "logps", "logits", "lengths") for side in ("chosen", "rejected")]
METRICS += ["rewards/accuracies", "rewards/margins", "loss", "kl"]
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass
class LossConfig:
    """The preference loss and its hyperparameters. A field left null takes the method's default
    (the default of its loss function in ``simpo_lightning.losses``); a field the method does not
    use is ignored with a warning, so switching ``name`` alone is enough to change method."""

    name: Literal["simpo", "dpo", "ipo", "cpo", "orpo", "kto"] = "simpo"
    """Key in ``simpo_lightning.losses.LOSSES``. dpo, ipo and kto use a reference model."""
    beta: float | None = None
    """β (IPO's τ, ORPO's λ). Default: simpo 2.0, the others 0.1."""
    gamma_beta_ratio: float | None = None
    """simpo: target margin γ/β (default 0.5); the paper's γ and TRL's ``simpo_gamma`` are ``beta * gamma_beta_ratio``."""
    label_smoothing: float | None = None
    """simpo, dpo, cpo: probability that a preference label is flipped (default 0; sigmoid loss only)."""
    loss_type: Literal["sigmoid", "hinge"] | None = None
    """simpo, dpo, cpo: ``sigmoid`` (default) or ``hinge``."""
    sft_weight: float | None = None
    """Weight of an NLL term on the chosen (desirable) response tokens, token mean. Default: cpo and orpo 1, others 0."""
    desirable_weight: float | None = None
    """kto: λ_D, weight of desirable examples (default 1)."""
    undesirable_weight: float | None = None
    """kto: λ_U, weight of undesirable examples (default 1)."""

    def method(self) -> Method:
        return LOSSES[self.name]

    def hparams(self) -> dict[str, Any]:
        """The set fields the loss function takes; warns about set fields it does not take."""
        accepted = inspect.signature(self.method().loss).parameters
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "sft_weight") or value is None:
                continue
            if f.name in accepted:
                out[f.name] = value
            else:
                log.warning("loss.%s = %r is ignored: %s does not use it", f.name, value, self.name)
        return out


@dataclass
class ReferenceConfig:
    """The frozen reference policy of dpo, ipo and kto (simpo, cpo and orpo never build one). With
    LoRA it is the policy with its adapters disabled, so no second copy is held."""

    precompute: bool = False
    """Score every example with the reference once before training (cached on disk beside the data
    cache), then free the reference; not for kto, whose KL term depends on the batch."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Without LoRA: dtype of the frozen copy (bfloat16 halves its memory). None: the policy's."""


# Checkpoints record these in their hyperparameters; resuming loads with weights_only=True.
torch.serialization.add_safe_globals([PolicyConfig, QuantizationConfig, LoraConfig, LossConfig, ReferenceConfig])


class SimPOModule(L.LightningModule):
    """Preference-tunes a causal LM with SimPO or one of the methods it is measured against.

    Args:
        policy: which model to load and how.
        lora: LoRA adapters; null trains every weight.
        loss: the preference loss.
        reference: the reference model, for the methods that use one.
        optimizer: optimizer class and arguments, called with the trainable parameters.
        warmup_ratio: share of the steps with linear learning-rate warm-up from 0.
        lr_schedule: decay after warm-up.
        max_nonfinite_steps: a NaN/inf loss skips its step (counted, logged); this many in a row stops training.
        logits_chunk: response positions per chunk of the output head when computing log-probs, so the
            full-vocabulary logits of the batch never exist (forward or backward); null computes the
            model's full logits instead (also used where the head is not a plain linear layer, and
            under ModelParallelStrategy).
        optimizer_in_backward: step each parameter as soon as its gradient is complete and free the
            gradient (``OptimizerInBackward``): saves the memory of all gradients at once. One process
            only, and no gradient clipping, accumulation or 16-mixed precision.
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        loss: LossConfig = LossConfig(),
        reference: ReferenceConfig = ReferenceConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.1,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        max_nonfinite_steps: int = 10,
        logits_chunk: int | None = 1024,
        optimizer_in_backward: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])  # for the record: it stores dataclasses as dicts
        self.policy, self.lora, self.loss_config, self.reference, self.optimizer = policy, lora, loss, reference, optimizer
        self.method, self.loss_hparams = loss.method(), loss.hparams()
        self.logits_chunk = logits_chunk
        self.sft_weight = self.method.sft_weight if loss.sft_weight is None else loss.sft_weight
        if reference.precompute and self.method.reference and not self.method.paired:
            raise ValueError(f"reference.precompute does not apply to {loss.name}: its KL term pairs each prompt "
                             "with another example's completion, which changes with every batch")
        self.tokenizer = load_tokenizer(policy)
        self.model: nn.Module | None = None
        # The frozen copy is deliberately not a registered submodule: it stays out of the state dict,
        # the optimizer and the strategy's wrapping.
        self._reference: list[nn.Module] = []
        self.val_metrics = nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in METRICS})
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        # Checkpoints of a LoRA run hold only the trainable weights; the base reloads from its source.
        self.strict_loading = lora is None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = build_policy(self.policy, self.lora)
        if self.method.reference and self.lora is None:
            # A copy of the initial weights (also right for random_init and before a resume restores the policy).
            frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
            if self.reference.dtype is not None:
                frozen.to(getattr(torch, self.reference.dtype))
            self._reference = [frozen]
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            if self.policy.quantization is not None:
                raise ValueError("policy.quantization cannot be combined with ModelParallelStrategy (bitsandbytes weights do not shard)")
            mesh = self.device_mesh["data_parallel"]
            self.model = shard(self.model, mesh)
            self._reference = [shard(m, mesh) for m in self._reference]

    # ------------------------------------------------------------------ log-probs

    def sequence_stats(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Summed response log-prob (``sum_logps``), response length (``lengths``) and mean logit over
        response positions (``logits``) of each right-padded sequence, all ``[N]``."""
        head = self._chunked_head(model)
        if head is not None:
            scored = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
            rows, positions = scored.nonzero(as_tuple=True)
            index = rows * labels.shape[1] + positions
            logps, mean_logit = self._flat_logps(model, head, index, labels[:, 1:][scored], input_ids=input_ids,
                                                 attention_mask=attention_mask)
            return _per_sequence(logps, mean_logit, rows, len(input_ids))
        # Only positions that predict a response token need logits: skipping the output head over the
        # rest of the prompt saves most of its cost (by FLOPs the head is a fifth of SmolLM2's forward).
        first = int((labels != IGNORE_INDEX).int().argmax(-1).min())
        keep = min(labels.shape[1], labels.shape[1] - first + 1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        labels = labels[:, -keep:]
        sums, lengths = sequence_logps(logits, labels, average=False)
        mask = labels[:, 1:] != IGNORE_INDEX
        mean_logit = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1) / lengths
        return {"sum_logps": sums, "lengths": lengths, "logits": mean_logit}

    def packed_stats(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sequence_stats`` of chosen then rejected (``[2B]``) from shared-prompt sequences
        ``[prompt, chosen, rejected]``: rejected tokens attend to the prompt and to themselves, never to
        the chosen tokens, and their position ids continue from the end of the prompt, so each response
        is scored exactly as in its own sequence while the prompt is encoded once."""
        segments = batch["packed_segments"]  # 0 prompt, 1 chosen, 2 rejected, -1 padding
        width = segments.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
        key, query = segments[:, None, :], segments[:, :, None]
        visible = causal & ((key == 0) | (key == query)) & (key >= 0)
        visible |= torch.eye(width, dtype=torch.bool, device=segments.device)  # padding rows see themselves, not nothing
        logps, mean_logit = self._flat_logps(model, self._chunked_head(model), batch["packed_index"], batch["packed_targets"],
                                             input_ids=batch["packed_input_ids"],
                                             attention_mask=visible[:, None], position_ids=batch["packed_position_ids"])
        return _per_sequence(logps, mean_logit, batch["packed_sequence"], 2 * len(segments))

    def pair_stats(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sequence_stats`` of the chosen then the rejected responses of a batch of pairs, ``[2B]``."""
        if "packed_input_ids" in batch:
            return self.packed_stats(model, batch)
        return self.sequence_stats(model, **_concat(batch, ("chosen", "rejected")))

    def _chunked_head(self, model: nn.Module) -> tuple[nn.Module, Tensor] | None:
        """``decoder_and_head(model)`` where the chunked path applies, else None."""
        return decoder_and_head(model) if self.logits_chunk and self.device_mesh is None else None

    def _flat_logps(self, model: nn.Module, head: tuple[nn.Module, Tensor] | None, index: Tensor, targets: Tensor,
                    **inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Log-prob of ``targets`` ``[M]`` predicted at flat positions ``index`` ``[M]`` (row * width + position)
        of the model's output, and the mean logit there (no gradient). Given ``head`` (decoder, head weight)
        the logits exist a chunk at a time (``label_logps``), else the model's full logits are computed."""
        if head is not None:
            decoder, weight = head
            hidden = decoder(**inputs).last_hidden_state
            return label_logps(hidden.flatten(0, 1)[index], weight, targets, self.logits_chunk)
        logits = at_least_float32(model(**inputs).logits.flatten(0, 1)[index])
        logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        return logps, logits.detach().mean(-1)

    @torch.no_grad()
    def reference_logps(self, stats: Callable[[nn.Module], dict[str, Tensor]]) -> Tensor:
        """``stats(model)["sum_logps"]`` under the reference model, e.g. ``lambda m: self.pair_stats(m, batch)``."""
        if self.lora is not None:
            with self.model.disable_adapter():
                return stats(self.model)["sum_logps"]
        if not self._reference:
            raise RuntimeError("the reference model was freed after precomputing; the batch lacks ref_*_logps")
        # reference.dtype None: the policy's dtype, also after the Trainer's precision converted it (64-true, bf16-true)
        dtype = getattr(torch, self.reference.dtype) if self.reference.dtype else next(self.model.parameters()).dtype
        return stats(self._reference[0].to(self.device, dtype))["sum_logps"]

    def forward_logps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Chosen and rejected in one forward pass, concatenated on the batch axis (or packed, sharing
        their prompt: see ``packed_stats``).

        Returns per-example ``[B]`` tensors under ``chosen_`` and ``rejected_`` keys: summed and mean
        response log-prob (``sum_logps``, ``logps``), ``lengths`` and mean response ``logits``.
        """
        if "chosen_input_ids" not in batch:
            raise ValueError(f"loss {self.loss_config.name!r} needs paired data (prompt, chosen, rejected); "
                             "this batch holds unpaired completions, which only kto uses")
        out = self.pair_stats(self.model, batch)
        out["logps"] = out["sum_logps"] / out["lengths"]
        n = len(out["logps"]) // 2
        return {f"{side}_{k}": v[sl] for k, v in out.items() for side, sl in (("chosen", slice(0, n)), ("rejected", slice(n, None)))}

    # ------------------------------------------------------------------ the step

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics (``[B]`` each) for one batch."""
        return (self._paired_step if self.method.paired else self._unpaired_step)(batch)

    def _paired_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.forward_logps(batch)
        key = "logps" if self.method.average else "sum_logps"
        args = [out[f"chosen_{key}"], out[f"rejected_{key}"]]
        if self.method.reference:
            if "ref_chosen_logps" in batch:
                ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(args[0].dtype)
            else:
                ref = self.reference_logps(lambda model: self.pair_stats(model, batch))
            if self.method.average:
                ref = ref / torch.cat([out["chosen_lengths"], out["rejected_lengths"]])
            args += list(ref.chunk(2))
        losses, chosen_rewards, rejected_rewards = self.method.loss(*args, **self.loss_hparams)
        loss = losses.mean() + self._nll(out["chosen_sum_logps"], out["chosen_lengths"])
        metrics = {
            "loss": losses.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
        }
        for side in ("chosen", "rejected"):
            metrics[f"logps/{side}"] = out[f"{side}_{key}"].detach().float()
            for group in ("logits", "lengths"):
                metrics[f"{group}/{side}"] = out[f"{side}_{group}"].detach().float()
        return loss, metrics

    def _unpaired_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """KTO: completions with a desirable label; a paired batch gives its chosen as desirable and its
        rejected as undesirable completions."""
        paired = "chosen_input_ids" in batch
        if paired:
            seqs = _concat(batch, ("chosen", "rejected"))
            n = batch["chosen_input_ids"].shape[0]
            desirable = torch.arange(2 * n, device=self.device) < n
        else:
            seqs = {k: batch[f"completion_{k}"] for k in SEQUENCE_KEYS}
            desirable = batch["desirable"].bool()
        kl_seqs = mismatched_batch(**seqs, pad_token_id=self.tokenizer.pad_token_id)
        kl_seqs = {k: v.to(self.device) for k, v in kl_seqs.items()}
        out = self.sequence_stats(self.model, **seqs)
        with torch.no_grad():
            kl_logps = self.sequence_stats(self.model, **kl_seqs)["sum_logps"]
        both = _stack_padded(seqs, kl_seqs, self.tokenizer.pad_token_id)
        ref, ref_kl = self.reference_logps(lambda model: self.sequence_stats(model, **both)).split(
            [len(desirable), len(desirable)])
        kl = kto_kl(kl_logps, ref_kl)
        if self._trainer is not None and self.trainer.world_size > 1:  # one reference point for all processes
            kl = self.all_gather(kl).mean()
        kl = kl.clamp(min=0)
        losses, rewards = self.method.loss(out["sum_logps"], ref, desirable, kl, **self.loss_hparams)
        loss = losses.mean() + self._nll(out["sum_logps"][desirable], out["lengths"][desirable])
        metrics = {"loss": losses.detach(), "kl": kl.reshape(1)}
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            metrics[f"rewards/{side}"] = rewards[rows]
            metrics[f"logps/{side}"] = out["sum_logps"][rows].detach().float()
            for group in ("logits", "lengths"):
                metrics[f"{group}/{side}"] = out[group][rows].detach().float()
        if paired:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            metrics["rewards/accuracies"] = (metrics["rewards/margins"] > 0).float()
        return loss, metrics

    def _nll(self, sum_logps: Tensor, lengths: Tensor) -> Tensor | float:
        """``sft_weight`` times the token-mean NLL of the given responses (0 when the weight is 0)."""
        if not self.sft_weight or not len(lengths):
            return 0.0
        return -self.sft_weight * sum_logps.sum() / lengths.sum()

    # ------------------------------------------------------------------ reference precomputation

    @torch.no_grad()
    def precompute_reference(self, splits: dict[str, list[dict]], batch_size: int, cache_dir: str | None) -> None:
        """Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` to every pair of every split, then frees the
        frozen reference copy. Results are cached in ``cache_dir`` keyed by the model and the token ids."""
        collate = PreferenceCollator(self.tokenizer.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        for name, examples in splits.items():
            todo = [e for e in examples if "ref_chosen_logps" not in e]
            if not todo:
                continue
            cache = self._reference_cache(todo, cache_dir)
            cached = cache is not None and cache.is_file()
            if cached:
                values = torch.load(cache)
            else:
                values = []
                for start in range(0, len(todo), batch_size):
                    batch = {k: v.to(self.device) for k, v in collate(todo[start : start + batch_size]).items()}
                    values.append(self.reference_logps(lambda model: self.pair_stats(model, batch)).view(2, -1).T.cpu())
                values = torch.cat(values)
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(values, cache)
            for example, (chosen, rejected) in zip(todo, values.tolist()):
                example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected
            log.info("reference log-probs of %d %s pairs %s", len(todo), name, "loaded from cache" if cached else "computed")
        self.model.train(was_training)
        self._reference.clear()
        gc.collect()

    def _reference_cache(self, examples: list[dict], cache_dir: str | None) -> Path | None:
        if cache_dir is None or self.policy.random_init:  # random weights are not identified by the config
            return None
        h = hashlib.sha256(repr((asdict(self.policy), self.reference.dtype)).encode())
        for e in examples:
            h.update(repr((e["prompt"], e["chosen"], e["rejected"])).encode())
        return Path(cache_dir).expanduser() / f"ref-{h.hexdigest()[:24]}.pt"

    def _maybe_precompute(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not (self.method.reference and self.reference.precompute and datamodule is not None):
            return
        splits = getattr(datamodule, "splits", None)
        if splits is None:
            raise ValueError("reference.precompute needs a PreferenceDataModule (it scores the data's splits)")
        self.precompute_reference(splits, datamodule.hparams.batch_size, datamodule.hparams.cache_dir)

    def on_fit_start(self) -> None:
        self._maybe_precompute()

    def on_validation_start(self) -> None:
        self._maybe_precompute()

    def on_test_start(self) -> None:
        self._maybe_precompute()

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss, metrics = self.step(batch)
        if not torch.isfinite(loss):
            return self._skip_nonfinite(loss)
        self.nonfinite_in_a_row = 0
        n = len(metrics["loss"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)  # the mean over all processes
        self.log_dict({f"train/{k}": v.mean() for k, v in metrics.items() if k != "loss" and v.numel()}, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        tokens = sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask"))
        self.log("train/tokens_per_sec", tokens.float() / seconds, prog_bar=True)
        self.log("train/step_seconds", seconds)
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
            if not values.numel():
                continue
            metric = self.val_metrics[key.replace("/", "_")]
            metric.update(values)
            self.log(f"{prefix}/{key}", metric, prog_bar=key == "rewards/accuracies")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer_in_backward:
            self._check_in_backward()
            optimizer = OptimizerInBackward(params, self.optimizer)
        else:
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

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
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
        conflicts = {"more than one process": trainer.world_size > 1,
                     "trainer.accumulate_grad_batches > 1": trainer.accumulate_grad_batches > 1,
                     "trainer.gradient_clip_val": bool(trainer.gradient_clip_val),
                     "precision 16-mixed (loss scaling)": str(trainer.precision).startswith("16")}
        found = [name for name, present in conflicts.items() if present]
        if found:
            raise ValueError(f"model.optimizer_in_backward needs every gradient only once, at its own step; it cannot "
                             f"be combined with {', '.join(found)}")

    def on_train_end(self) -> None:
        for optimizer in self.trainer.optimizers:
            if isinstance(optimizer, OptimizerInBackward):
                optimizer.remove_hooks()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Sharded (distributed) checkpoints keep every key: their loader expects the model's full state dict.
        if self.lora is not None and self.device_mesh is None:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def _per_sequence(logps: Tensor, mean_logit: Tensor, rows: Tensor, n: int) -> dict[str, Tensor]:
    """Per-token values ``[M]`` of sequences ``rows`` ``[M]`` summed into ``sequence_stats``' ``[n]`` form."""
    lengths = torch.bincount(rows, minlength=n)
    if (lengths == 0).any():
        raise ValueError("a sequence has no response tokens; the data pipeline should have dropped it")
    total = lambda x: torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, x)  # noqa: E731
    return {"sum_logps": total(logps), "lengths": lengths, "logits": total(mean_logit) / lengths}


def _concat(batch: dict[str, Tensor], sides: tuple[str, ...]) -> dict[str, Tensor]:
    """``{input_ids, attention_mask, labels}`` of the given sides stacked on the batch axis."""
    return {k: torch.cat([batch[f"{side}_{k}"] for side in sides]) for k in SEQUENCE_KEYS}


def _stack_padded(a: dict[str, Tensor], b: dict[str, Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """Two right-padded sequence batches of different widths stacked into one (right padding
    changes nothing before it under causal attention)."""
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    pad = lambda x, k: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill[k])  # noqa: E731
    return {k: torch.cat([pad(a[k], k), pad(b[k], k)]) for k in SEQUENCE_KEYS}
