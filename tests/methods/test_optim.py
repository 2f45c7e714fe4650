"""The optimizer step in the backward pass: the same steps as the plain optimizer, no gradients held."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from simpo_lightning.errors import UserError

from helpers import GradientsHeld, demo_data, tiny_module, trainer


def in_backward_run(tiny_dir, in_backward: bool, steps: int, ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = tiny_module(tiny_dir, lora=None, optimizer_in_backward=in_backward)
    module.optimizer = lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)
    module.warmup_ratio = 0.5
    held = GradientsHeld()
    t = trainer(
        max_steps=steps, limit_val_batches=0, callbacks=[held, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs
    )
    t.fit(module, demo_data(module), ckpt_path=ckpt_path)
    return module, held.counts


def test_optimizer_in_backward_takes_the_same_steps_without_holding_gradients(tiny_dir):
    """The same arithmetic per weight, so the same weights exactly."""
    plain, plain_held = in_backward_run(tiny_dir, False, 4)
    fused, fused_held = in_backward_run(tiny_dir, True, 4)
    n = sum(p.requires_grad for p in plain.parameters())
    assert plain_held == [n] * 4 and fused_held == [0] * 4
    weights = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert torch.equal(p, weights[name]), name
    # the hooks are gone after fit: a later backward changes no weight
    before = {k: v.detach().clone() for k, v in fused.named_parameters()}
    sum(p.sum() for p in fused.parameters()).backward()
    assert all(torch.equal(before[k], v) for k, v in fused.named_parameters())


def test_optimizer_in_backward_resumes_exactly(tiny_dir, tmp_path):
    """Optimizer states and learning-rate schedule come back from a checkpoint (warm-up spans the resume)."""
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    straight, _ = in_backward_run(tiny_dir, True, 6, enable_checkpointing=True, callbacks=[save])
    resumed, _ = in_backward_run(tiny_dir, True, 6, ckpt_path=next(tmp_path.glob("*step=3.ckpt")))
    weights = dict(straight.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_optimizer_in_backward_refuses_gradient_clipping(tiny_dir):
    with pytest.raises(UserError, match="gradient_clip_val"):
        in_backward_run(tiny_dir, True, 1, gradient_clip_val=1.0)
