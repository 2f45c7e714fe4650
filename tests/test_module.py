"""A real Lightning Trainer on a tiny random Llama and the real SmolLM2 tokenizer."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from simpo_lightning.callbacks import reward_accuracy
from simpo_lightning.data import PreferenceCollator, PreferenceDataModule
from simpo_lightning.model import LoraConfig, PolicyConfig
from simpo_lightning.module import METRICS, LossConfig, SimPOModule

from helpers import assert_rounding_close


def make(tiny_dir, lora=LoraConfig(r=4, alpha=8), **kwargs):
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=lora,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_ratio=0.0, **kwargs)
    data = PreferenceDataModule(batch_size=4, tokenizer=module.tokenizer, cache_dir=None)
    return module, data


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_lora_training_changes_only_adapters(tiny_dir):
    module, data = make(tiny_dir)
    module.configure_model()
    before = snapshot(module)
    t = trainer()
    t.fit(module, data)
    lora = {n for n, p in module.named_parameters() if "lora_" in n}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert lora and trainable == lora
    assert changed(before, module) == lora
    for name in [f"train/{k}" for k in METRICS if k != "kl"] + ["train/tokens_per_sec", "train/step_seconds"]:
        assert torch.isfinite(t.callback_metrics[name]), name


def test_full_training_changes_every_weight(tiny_dir):
    module, data = make(tiny_dir, lora=None)
    module.configure_model()
    before = snapshot(module)
    trainer().fit(module, data)
    assert changed(before, module) == set(before)


def test_validation_metrics_average_the_whole_set(tiny_dir):
    """7 pairs in batches of 3 (3 + 3 + 1): the epoch value must be the mean over pairs, not over batches.
    The model runs in float64, so batches of 3 and of 1 (other padding) score alike; the metrics
    accumulate and are logged in float32, a mean of 7: the float32 rule with K = 7."""
    module, data = make(tiny_dir)
    data.hparams.batch_size = 3
    data.setup()
    data.splits["val"] = data.splits["val"][:7]
    result = trainer(limit_val_batches=1.0, precision="64-true").validate(module, data)[0]
    module.eval()
    collate = PreferenceCollator(module.tokenizer.pad_token_id)
    with torch.no_grad():
        singles = [module.step(collate([pair]))[1] for pair in data.splits["val"]]
    for key in ("rewards/chosen", "rewards/margins", "logps/rejected", "lengths/chosen", "loss"):
        expected = torch.cat([m[key] for m in singles]).mean()
        assert_rounding_close(result[f"val/{key}"], expected, reduction=7, what=key)
    loader = torch.utils.data.DataLoader(data.splits["val"], batch_size=3, collate_fn=collate)
    assert_rounding_close(result["val/rewards/accuracies"], reward_accuracy(module, loader, module.device), reduction=7)


def test_nonfinite_loss_skips_then_stops(tiny_dir):
    module, data = make(tiny_dir, loss=LossConfig(beta=float("nan")), max_nonfinite_steps=3)
    module.configure_model()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        trainer(max_steps=10).fit(module, data)
    assert module.nonfinite_steps == 3 and not changed(before, module)


def test_sft_term_and_checkpointing(tiny_dir):
    """The NLL term adds sft_weight × token-mean NLL of chosen; gradient checkpointing keeps the numbers."""
    data = make(tiny_dir)[1]
    data.setup()
    batch = PreferenceCollator(data.tokenizer.pad_token_id)(data.splits["train"][:4])
    losses = {}
    for name, kwargs in {"plain": {}, "sft": {"loss": LossConfig(sft_weight=0.5)},
                         "ckpt": {"policy": PolicyConfig(name_or_path=tiny_dir, gradient_checkpointing=True)}}.items():
        torch.manual_seed(0)
        module = SimPOModule(**{"policy": PolicyConfig(name_or_path=tiny_dir), "lora": None, **kwargs})
        module.configure_model()
        loss, _ = module.step(batch)
        out = module.forward_logps(batch)
        losses[name] = loss.item()
    nll = -(out["chosen_sum_logps"].sum() / out["chosen_lengths"].sum()).item()
    assert losses["sft"] == pytest.approx(losses["plain"] + 0.5 * nll, rel=1e-5)
    assert losses["ckpt"] == pytest.approx(losses["plain"], rel=1e-6)


def test_lora_checkpoint_holds_only_adapters_and_resumes(tiny_dir, tmp_path):
    module, data = make(tiny_dir)
    t = trainer(enable_checkpointing=True, default_root_dir=tmp_path, max_steps=2)
    t.fit(module, data)
    path = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)
    resumed, data2 = make(tiny_dir)
    t2 = trainer(max_steps=3)
    t2.fit(resumed, data2, ckpt_path=path)
    assert t2.global_step == 3


class GradientsHeld(L.Callback):
    """Records, after each training batch (gradients are kept until the next step), how many trainable
    parameters still hold a gradient and the global norm of those gradients."""

    def __init__(self):
        self.counts, self.norms = [], []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        self.counts.append(len(grads))
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0)


def in_backward_run(tiny_dir, in_backward: bool, steps: int, ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None, warmup_ratio=0.5,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), optimizer_in_backward=in_backward)
    data = PreferenceDataModule(batch_size=4, tokenizer=module.tokenizer, cache_dir=None)
    held = GradientsHeld()
    callbacks = [held, *trainer_kwargs.pop("callbacks", [])]
    t = trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks, **trainer_kwargs)
    t.fit(module, data, ckpt_path=ckpt_path)
    return module, held.counts, t


def test_optimizer_in_backward_takes_the_same_steps_without_holding_gradients(tiny_dir):
    plain, plain_held, _ = in_backward_run(tiny_dir, False, 4)
    fused, fused_held, _ = in_backward_run(tiny_dir, True, 4)
    n = sum(p.requires_grad for p in plain.parameters())
    assert plain_held == [n] * 4 and fused_held == [0] * 4
    weights = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=1e-5, atol=1e-6, msg=name)
    # the hooks are gone after fit: a later backward changes no weight
    before = {k: v.detach().clone() for k, v in fused.named_parameters()}
    sum(p.sum() for p in fused.parameters()).backward()
    assert all(torch.equal(before[k], v) for k, v in fused.named_parameters())


def test_optimizer_in_backward_resumes_exactly(tiny_dir, tmp_path):
    """Optimizer states and learning-rate schedule come back from a checkpoint (warm-up spans the resume)."""
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    straight, _, _ = in_backward_run(tiny_dir, True, 6, enable_checkpointing=True, callbacks=[save])
    resumed, _, _ = in_backward_run(tiny_dir, True, 6, ckpt_path=next(tmp_path.glob("*step=3.ckpt")))
    weights = dict(straight.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_optimizer_in_backward_refuses_gradient_clipping(tiny_dir):
    with pytest.raises(ValueError, match="gradient_clip_val"):
        in_backward_run(tiny_dir, True, 1, gradient_clip_val=1.0)


FRAGMENTING = """
import sys, threading, torch
from simpo_lightning.callbacks import return_freed_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "on":
    assert return_freed_memory(1)
kept, freed_later = [], []
def work():  # tensors of varying size from another thread (as the autograd engine's), small ones kept between them
    for i in range(400):
        t = torch.ones(2**18 * (1 + i % 7))  # 1 to 7 MiB
        if i % 2:
            freed_later.append(t)
        kept.append(torch.ones(2**14))  # 64 KiB
thread = threading.Thread(target=work)
thread.start()
thread.join()
before = rss()
freed_later.clear()
print(before - rss())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_return_freed_memory_gives_freed_tensors_back_to_the_os():
    """About 800 MiB of tensors are freed; glibc's default keeps nearly all of it resident."""
    returned = {mode: float(subprocess.run([sys.executable, "-c", FRAGMENTING, mode], capture_output=True, text=True,
                                           check=True).stdout) for mode in ("default", "on")}
    assert returned["on"] > 700 and returned["default"] < 300, returned


def test_gradient_clipping_works_with_a_fused_optimizer_under_bf16(tiny_dir):
    """Lightning refuses this combination (a guard for float16 loss scaling); the module clips itself."""
    held = GradientsHeld()
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True))
    data = PreferenceDataModule(batch_size=4, tokenizer=module.tokenizer, cache_dir=None)
    trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", gradient_clip_val=0.01, callbacks=[held]).fit(module, data)
    norms = held.norms
    assert len(norms) == 3 and all(n == pytest.approx(0.01, rel=1e-3) for n in norms), norms
