"""The method family through the real command and Trainer: every loss fits, the reference model is
what it should be (adapters disabled under LoRA, a frozen copy otherwise, or precomputed log-probs),
and KTO trains on unpaired data."""

import csv
import logging

import lightning as L
import pytest
import torch

from simpo_lightning.cli import cli_main
from simpo_lightning.data import PreferenceCollator, PreferenceDataModule
from simpo_lightning.losses import LOSSES
from simpo_lightning.model import LoraConfig, PolicyConfig
from simpo_lightning.module import LossConfig, ReferenceConfig, SimPOModule

from conftest import ROOT, write_jsonl
from helpers import assert_curves_equal, assert_rounding_close


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def module_and_data(tiny_dir, name="dpo", lora=None, reference=ReferenceConfig(), sgd: bool = False, **data):
    """``sgd``: plain SGD, for float64 curves (helpers: Adam would amplify their rounding by lr / eps)."""
    optimizer = (lambda p: torch.optim.SGD(p, lr=0.5)) if sgd else (lambda p: torch.optim.AdamW(p, lr=1e-2))
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=lora, loss=LossConfig(name=name),
                         reference=reference, optimizer=optimizer, warmup_ratio=0.0)
    return module, PreferenceDataModule(batch_size=4, tokenizer=module.tokenizer, **({"cache_dir": None} | data))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_method_fits_through_the_command(name, tiny_dir, tmp_path):
    logger = f'{{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}'
    cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.loss.name", name,
              "--model.loss.gamma_beta_ratio", "null", "--model.loss.beta", "null",
              "--model.policy.name_or_path", tiny_dir, "--model.policy.random_init", "false",
              "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.logger", logger,
              "--trainer.limit_val_batches", "3", "--data.cache_dir", str(tmp_path / "cache")])
    rows = list(csv.DictReader(next(tmp_path.glob("lightning_logs/version_0/metrics.csv")).open()))
    last = {k: float(v) for r in rows for k, v in r.items() if v}
    for key in ("train/loss", "train/rewards/chosen", "train/step_seconds", "val/loss", "val/rewards/accuracies",
                "heldout/after/rewards/accuracies"):
        assert key in last and last[key] == last[key], key
    assert ("train/kl" in last) == (name == "kto")


def loss_curves_without_and_with_shared_prompt(tiny_dir, name: str) -> list[list[float]]:
    """Float64 runs (see helpers: training curves of two paths compare in float64)."""
    curves = []
    for shared in (False, True):
        L.seed_everything(0)
        module, data = module_and_data(tiny_dir, name, shared_prompt=shared, sgd=True)
        losses = []
        module.on_train_batch_end = lambda outputs, *_: losses.append(outputs["loss"].item())
        trainer(limit_val_batches=0, precision="64-true").fit(module, data)
        curves.append(losses)
    return curves


@pytest.mark.parametrize("name", ["simpo", "dpo"])
def test_shared_prompt_training_gives_the_separate_sequences_loss_curve(name, tiny_dir):
    """Full fine-tuning, so DPO's frozen reference scores the packed batches too."""
    curves = loss_curves_without_and_with_shared_prompt(tiny_dir, name)
    assert len(curves[0]) == 3 and len(set(curves[0])) == 3
    assert_curves_equal(curves[1], curves[0])


def test_kto_trains_on_shared_prompt_batches_with_their_separate_sequences(tiny_dir):
    curves = loss_curves_without_and_with_shared_prompt(tiny_dir, "kto")
    assert len(curves[1]) == 3 and curves[1] == curves[0]


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_dir):
    from transformers import AutoModelForCausalLM

    module, data = module_and_data(tiny_dir, lora=LoraConfig(r=4, alpha=8))
    trainer(max_steps=2).fit(module, data)
    assert module._reference == []  # no second copy of the weights
    batch = PreferenceCollator(module.tokenizer.pad_token_id)(data.splits["val"][:4])
    seqs = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")}
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = module.sequence_stats(base, **seqs)["sum_logps"]
        policy = module.sequence_stats(module.model, **seqs)["sum_logps"]
    torch.testing.assert_close(module.reference_logps(lambda model: module.sequence_stats(model, **seqs)), expected)
    assert (policy - expected).abs().max() > 1e-2  # the adapters did train


def test_frozen_reference_keeps_the_initial_weights(tiny_dir):
    module, data = module_and_data(tiny_dir, reference=ReferenceConfig(dtype="bfloat16"))
    module.configure_model()
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(max_steps=2).fit(module, data)
    (frozen,) = module._reference
    assert frozen.dtype == torch.bfloat16 and not any(p.requires_grad for p in frozen.parameters())
    for name, p in frozen.named_parameters():
        assert torch.equal(p, initial[name].to(torch.bfloat16)), name
    assert not any(n.startswith("_reference") for n in module.state_dict())  # never checkpointed


def test_precomputed_reference_equals_on_the_fly_and_frees_the_copy(tiny_dir, tmp_path):
    module, data = module_and_data(tiny_dir, reference=ReferenceConfig(precompute=True))
    module.configure_model()
    data.setup()
    val = data.splits["val"][:6]
    batch = PreferenceCollator(module.tokenizer.pad_token_id)(val)
    seqs = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")}
    on_the_fly = module.reference_logps(lambda model: module.sequence_stats(model, **seqs))
    frozen = module._reference[0]
    with torch.no_grad():  # one batch of 6 against precomputing in batches of 4: both against float64
        exact = module.sequence_stats(frozen.double(), **seqs)["sum_logps"]
        frozen.float()
    module.precompute_reference({"val": val}, batch_size=4, cache_dir=str(tmp_path))
    assert module._reference == []
    precomputed = torch.tensor([e["ref_chosen_logps"] for e in val] + [e["ref_rejected_logps"] for e in val])
    for name, values in (("precomputed", precomputed), ("on the fly", on_the_fly)):
        assert_rounding_close(values, exact, reduction=module.tokenizer.vocab_size, what=name)
    assert len(list(tmp_path.glob("ref-*.pt"))) == 1

    # A second module with no reference at all can only get the values from the cache.
    again, _ = module_and_data(tiny_dir, reference=ReferenceConfig(precompute=True))
    again.configure_model()
    again._reference.clear()
    fresh = [{k: e[k] for k in ("prompt", "chosen", "rejected")} for e in val]
    again.precompute_reference({"val": fresh}, batch_size=4, cache_dir=str(tmp_path))
    assert [e["ref_chosen_logps"] for e in fresh] == [e["ref_chosen_logps"] for e in val]


def test_fit_with_precomputed_reference_follows_the_same_curve(tiny_dir):
    """Float64 runs (see helpers)."""
    losses = {}
    for precompute in (False, True):
        torch.manual_seed(0)
        module, data = module_and_data(tiny_dir, reference=ReferenceConfig(precompute=precompute), sgd=True)
        curve = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                curve.append(outputs["loss"].item())

        trainer(max_steps=4, callbacks=[Record()], precision="64-true").fit(module, data)
        assert ("ref_chosen_logps" in data.splits["train"][0]) == precompute
        assert (module._reference == []) == precompute
        losses[precompute] = curve
    assert len(losses[True]) == 4 and losses[True][-1] != losses[True][0]
    assert_curves_equal(losses[True], losses[False])


def test_kto_trains_on_unpaired_rows(tiny_dir, tmp_path):
    rows = [{"prompt": f"Q{i}: say yes.", "completion": " yes" if i % 3 else " no way", "label": bool(i % 3)} for i in range(24)]
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    module, data = module_and_data(tiny_dir, name="kto", train_data=str(path))
    trainer(max_steps=3, limit_val_batches=1).fit(module, data)
    assert "completion" in data.splits["train"][0]
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])
    assert "train/kl" in module.trainer.callback_metrics
    paired_only, _ = module_and_data(tiny_dir, name="simpo")
    paired_only.configure_model()
    batch = PreferenceCollator(module.tokenizer.pad_token_id)(data.splits["train"][:4])
    with pytest.raises(ValueError, match="needs paired data"):
        paired_only.step(batch)


def test_loss_settings_take_method_defaults_and_warn_when_ignored(caplog):
    assert LossConfig(name="dpo").hparams() == {}  # β from dpo_loss's signature: 0.1
    with caplog.at_level(logging.WARNING):
        assert LossConfig(name="dpo", beta=0.2, gamma_beta_ratio=0.5).hparams() == {"beta": 0.2}
    assert "gamma_beta_ratio" in caplog.text and "dpo" in caplog.text
    with pytest.raises(ValueError, match="precompute"):
        SimPOModule(policy=PolicyConfig(name_or_path="unused"), loss=LossConfig(name="kto"), reference=ReferenceConfig(precompute=True))
