"""What every training module shares: LoRA checkpoints, gradient clipping, the learning-rate schedule."""

import pytest
import torch

from helpers import GradientsHeld, demo_data, tiny_module, trainer


def test_lora_checkpoint_holds_only_adapters_and_resumes(tiny_dir, tmp_path):
    module = tiny_module(tiny_dir)
    trainer(enable_checkpointing=True, default_root_dir=tmp_path, max_steps=2).fit(module, demo_data(module))
    path = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)
    resumed = tiny_module(tiny_dir)
    t = trainer(max_steps=3)
    t.fit(resumed, demo_data(resumed), ckpt_path=path)
    assert t.global_step == 3


def test_gradient_clipping_works_with_a_fused_optimizer_under_bf16(tiny_dir):
    """Lightning refuses this combination (a guard for float16 loss scaling); the module clips itself."""
    held = GradientsHeld()
    module = tiny_module(tiny_dir, lora=None)
    module.optimizer = lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)
    trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", gradient_clip_val=0.01, callbacks=[held]).fit(
        module, demo_data(module)
    )
    assert len(held.norms) == 3 and all(n == pytest.approx(0.01, rel=1e-3) for n in held.norms), held.norms


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5, 0.0]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ],
)
def test_warmup_then_decay(tiny_dir, schedule, expected):
    """10 steps, warm-up ratio 0.2: the factor rises 0, 0.5 over steps 0-1 and reaches 1 at step 2; at
    step 6 (halfway through the 8 decay steps) cosine gives 0.5(1 + cos(π/2)) = 0.5 and linear 0.5."""
    module = tiny_module(tiny_dir, lr_schedule=schedule)
    module.hparams.warmup_ratio = 0.2
    t = trainer(max_steps=10)
    t.fit(module, demo_data(module))
    factor = t.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [factor(s) for s in (0, 1, 2, 6, 10)] == pytest.approx(expected)
