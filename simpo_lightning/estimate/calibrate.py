"""The estimate against reality: the same config's step run by Lightning on real tensors, its peak of live tensors
recorded by the same trackers (``TrackedStep``), and the step's FLOPs by the usual count (``analytic_flops``)."""

import json
from pathlib import Path

import lightning as L
import torch
from torch import nn

from simpo_lightning.estimate.command import Setup
from simpo_lightning.estimate.fake import ShardedTracker, Tracker, by_category


class TrackedStep(L.Callback):
    """Records the peak of live tensors, by category and in total, of training step ``index`` (forward, backward,
    clipping and the optimizer step, as Lightning runs them) on global rank 0; also written as JSON to ``path``."""

    def __init__(self, index: int = 1, path: str | None = None):
        self.index, self.path, self.tracker, self.peak = index, path, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx != self.index or not trainer.is_global_zero:
            return
        optimizer = trainer.optimizers[0]
        frozen = getattr(getattr(pl_module, "reference", None), "frozen", None)
        extra = [frozen] if frozen is not None else []
        if pl_module.device_mesh is not None:
            self.tracker = ShardedTracker(pl_module.model, optimizer)
            self.tracker.track_external(pl_module, *extra)
        else:
            self.tracker = Tracker()
            self.tracker.track_external(pl_module, optimizer, *extra)
        self.tracker.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.tracker is None:
            return
        self.tracker.__exit__(None, None, None)
        peak, total = by_category(self.tracker)
        self.peak, self.tracker = {**peak, "total": total}, None
        if self.path is not None:
            Path(self.path).write_text(json.dumps(self.peak))


def real_step(s: Setup, steps: int = 2, strategy="auto", devices: int = 1, path: str | None = None) -> dict | None:
    """Trains ``s``'s module on its worst-case batch with a CPU Trainer for ``steps`` steps; the peak of live tensors
    of the last (``TrackedStep``; None on the other ranks)."""
    tracked = TrackedStep(steps - 1, path)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        precision=s.precision,
        gradient_clip_val=s.clip,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[tracked],
        **quiet,
    )
    batches = torch.utils.data.DataLoader([s.batch] * steps * devices, batch_size=None)  # a share for each process
    trainer.fit(s.module, train_dataloaders=batches)
    return tracked.peak


def analytic_flops(
    model: nn.Module, positions: int, responses: int | None, attended: int, checkpointing: bool, reference: bool
) -> int:
    """A step's FLOPs by the usual count. Linear layers: 2 a weight a position forward, again when checkpointing
    recomputes, and backward 2 for the input's gradient plus 2 for the weight's where it trains. The output head at
    the ``responses`` positions only, its logits recomputed in the backward pass (the chunked head), or with
    ``responses`` None at every position (the model's own logits). Attention: 4·d a query-key pair forward
    (``attended``: the pairs, over sequences and layers), again when recomputed, and 10·d backward (PyTorch's
    count: the scores recomputed, four products). ``reference``: plus a reference model's forward pass."""
    head = model.get_output_embeddings()
    trains = head.weight.requires_grad
    forward, extra = (4 if checkpointing else 2), 2 * reference  # per weight per position
    if responses is None:
        total = (4 + 2 * trains + extra) * head.weight.numel() * positions
    else:
        total = (6 + 2 * trains + extra) * head.weight.numel() * responses
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and layer is not head:
            total += (forward + 2 + 2 * layer.weight.requires_grad + extra) * layer.weight.numel() * positions
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return total + (forward * 2 + 10 + 2 * extra) * config.num_attention_heads * head_dim * attended
