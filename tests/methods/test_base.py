"""What every training module shares: LoRA checkpoints, gradient clipping, the learning-rate schedule."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import GradientsHeld, Interrupt, StepsTaken, demo_data, tiny_module, trainer


def test_lora_checkpoint_holds_only_adapters_and_resumes(tiny_dir, tmp_path):
    """A run of 3 steps interrupted after its second: its checkpoint (of step 1, saved after the interrupting
    callback) holds the adapters only, and resumed from it the run ends with the adapters of 3 uninterrupted
    steps exactly (the optimizer state, the schedule and the data order come back too)."""

    def fit(callbacks=(), **kwargs):
        torch.manual_seed(0)  # the same LoRA initialisation
        module = tiny_module(tiny_dir)
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
        run = trainer(max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver, *callbacks])
        run.fit(module, demo_data(module), **kwargs)
        return module

    straight = {n: p.detach().clone() for n, p in fit().named_parameters() if p.requires_grad}
    (tmp_path / "last.ckpt").unlink()
    with pytest.raises(SystemExit):  # Lightning turns the interruption into an exit
        fit([Interrupt(2)])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1 and checkpoint["state_dict"]
    assert all("lora_" in k for k in checkpoint["state_dict"])
    taken = StepsTaken()
    resumed = fit([taken], ckpt_path=tmp_path / "last.ckpt")
    assert taken.steps == [1, 2] and resumed.trainer.global_step == 3  # it went on from the checkpoint
    trained = dict(resumed.named_parameters())
    assert straight and all(torch.equal(trained[n], p) for n, p in straight.items())


def test_gradient_clipping_works_with_a_fused_optimizer_under_bf16(tiny_dir):
    """Lightning refuses this combination (a guard for float16 loss scaling); the module clips itself."""
    held = GradientsHeld()
    module = tiny_module(tiny_dir, lora=None)
    module.optimizer = lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)
    trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", gradient_clip_val=0.01, callbacks=[held]).fit(
        module, demo_data(module)
    )
    assert len(held.norms) == 3 and all(n == pytest.approx(0.01, rel=1e-3) for n in held.norms), held.norms


class LearningRates(L.Callback):
    """The learning rate each training step used, as a factor of the optimizer's configured rate."""

    def __init__(self, base: float):
        self.base, self.factors = base, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.factors.append(trainer.optimizers[0].param_groups[0]["lr"] / self.base)


# 10 steps, warm-up ratio 0.2: the factor rises 0, 0.5 over steps 0-1 and is 1 at step 2; then p = (s - 2) / 8
# of the decay: cosine 0.5(1 + cos(πp)), linear 1 - p. Steps 4, 6, 8: p = 1/4, 1/2, 3/4.
STEPS = [0, 1, 2, 4, 6, 8]
COSINE = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("cosine", COSINE),  # 0.854 and 0.146 at steps 4 and 8, where linear gives 0.75 and 0.25
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_warmup_then_decay(tiny_dir, schedule, expected):
    module = tiny_module(tiny_dir, lr_schedule=schedule)
    module.warmup_ratio = 0.2
    rates = LearningRates(base=1e-2)  # tiny_module's AdamW
    trainer(max_steps=10, limit_val_batches=0, callbacks=[rates]).fit(module, demo_data(module))
    assert len(rates.factors) == 10
    assert [rates.factors[s] for s in STEPS] == pytest.approx(expected)
