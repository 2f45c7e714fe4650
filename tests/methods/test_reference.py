"""The reference model: adapters disabled under LoRA, a frozen copy otherwise, or precomputed log-probs."""

import pytest
import torch

from simpo_lightning.data import PreferenceCollator
from simpo_lightning.methods.reference import ReferenceConfig
from simpo_lightning.scoring.sequences import score_sequences

from helpers import TINY_LORA, LossCurve, assert_curves_equal, assert_rounding_close, demo_data, tiny_module, trainer


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_dir):
    from transformers import AutoModelForCausalLM

    module = tiny_module(tiny_dir, "dpo", lora=TINY_LORA)
    data = demo_data(module)
    trainer(max_steps=2).fit(module, data)
    assert module.reference.frozen is None  # no second copy of the weights
    seqs = PreferenceCollator(module.tokenizer.pad_token_id)(data.splits["val"].select(range(4)).to_list()).both()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = score_sequences(base, seqs, module.chunk).sum_logps
        policy = score_sequences(module.model, seqs, module.chunk).sum_logps
    reference = module.reference.sum_logps(module.model, lambda model: score_sequences(model, seqs, module.chunk))
    assert torch.equal(reference, expected)  # the same computation: adapters off is the base model
    assert (policy - expected).abs().max() > 1e-2  # the adapters did train


def test_frozen_reference_keeps_the_initial_weights(tiny_dir):
    module = tiny_module(tiny_dir, "dpo", lora=None, reference=ReferenceConfig(dtype="bfloat16"))
    module.configure_model()
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(max_steps=2).fit(module, demo_data(module))
    frozen = module.reference.frozen
    assert frozen.dtype == torch.bfloat16 and not any(p.requires_grad for p in frozen.parameters())
    for name, p in frozen.named_parameters():
        assert torch.equal(p, initial[name].to(torch.bfloat16)), name
    assert all(k.startswith(("model.", "val_metrics.")) for k in module.state_dict())  # never checkpointed


def test_precomputed_reference_equals_on_the_fly_and_frees_the_copy(tiny_dir, tmp_path):
    module = tiny_module(tiny_dir, "dpo", lora=None, reference=ReferenceConfig(precompute=True))
    module.configure_model()
    data = demo_data(module, cache_dir=str(tmp_path))
    data.setup()
    first_six = data.splits["val"].select(range(6))
    data.splits = {"train": data.splits["train"].select(range(6)), "val": first_six, "test": first_six}
    seqs = PreferenceCollator(module.tokenizer.pad_token_id)(data.splits["val"].to_list()).both()
    on_the_fly = module.reference.sum_logps(module.model, lambda model: score_sequences(model, seqs, module.chunk))
    frozen = module.reference.frozen
    with torch.no_grad():  # one batch of 6 against precomputing in batches of 4: both against float64
        exact = score_sequences(frozen.double(), seqs, module.chunk).sum_logps
        frozen.float()
    module.precompute_reference(data)
    assert module.reference.frozen is None
    val = data.splits["val"]
    precomputed = torch.tensor(list(val["ref_chosen_logps"]) + list(val["ref_rejected_logps"]))
    for name, values in (("precomputed", precomputed), ("on the fly", on_the_fly)):
        assert_rounding_close(values, exact, reduction=module.tokenizer.vocab_size, what=name)
    assert data.splits["test"] is val  # the test split is the validation set: scored once, given to both
    assert len(list(tmp_path.glob("ref-*.pt"))) == 2  # train and val

    # A second module with no reference at all can only get the values from the cache.
    again = tiny_module(tiny_dir, "dpo", lora=None, reference=ReferenceConfig(precompute=True))
    again.configure_model()
    again.reference.free()
    fresh = demo_data(again, cache_dir=str(tmp_path))
    fresh.setup()
    first_six = fresh.splits["val"].select(range(6))
    fresh.splits = {"train": fresh.splits["train"].select(range(6)), "val": first_six, "test": first_six}
    fresh.split_keys = data.split_keys  # the same rows: the first six of each split
    again.precompute_reference(fresh)
    assert list(fresh.splits["val"]["ref_chosen_logps"]) == list(val["ref_chosen_logps"])
    with pytest.raises(RuntimeError, match="freed after precomputing"):
        again.reference.sum_logps(again.model, lambda model: score_sequences(model, seqs, again.chunk))


def test_fit_with_precomputed_reference_follows_the_same_curve(tiny_dir):
    """Float64, SGD runs (helpers: training curves of two paths)."""
    losses = {}
    for precompute in (False, True):
        torch.manual_seed(0)
        module = tiny_module(tiny_dir, "dpo", lora=None, sgd=True, reference=ReferenceConfig(precompute=precompute))
        data, curve = demo_data(module), LossCurve()
        trainer(max_steps=4, callbacks=[curve], precision="64-true").fit(module, data)
        assert ("ref_chosen_logps" in data.splits["train"].column_names) == precompute
        assert (module.reference.frozen is None) == precompute
        losses[precompute] = curve.losses
    assert len(losses[True]) == 4 and losses[True][-1] != losses[True][0]
    assert_curves_equal(losses[True], losses[False])
