"""SimPOModule with a real Lightning Trainer on a tiny random Llama and the real SmolLM2 tokenizer."""

import pytest
import torch

from simpo_lightning.callbacks.heldout import reward_metrics
from simpo_lightning.data import PreferenceCollator
from simpo_lightning.errors import UserError
from simpo_lightning.losses.config import LossConfig
from simpo_lightning.methods.preference import METRICS, SimPOModule
from simpo_lightning.methods.reference import ReferenceConfig
from simpo_lightning.models.loading import PolicyConfig
from simpo_lightning.scoring.sequences import score_pair_batch

from helpers import (
    VOCAB,
    LossCurve,
    assert_curves_equal,
    assert_rounding_close,
    changed,
    demo_data,
    snapshot,
    tiny_module,
    trainer,
    write_jsonl,
)


def test_lora_training_changes_only_adapters_and_logs_every_metric(tiny_dir):
    module = tiny_module(tiny_dir)
    module.configure_model()
    before = snapshot(module)
    t = trainer()
    t.fit(module, demo_data(module))
    lora = {n for n, p in module.named_parameters() if "lora_" in n}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert lora and trainable == lora
    assert changed(before, module) == lora
    for name in [f"train/{k}" for k in METRICS if k != "kl"] + ["train/tokens_per_sec", "train/step_seconds"]:
        assert torch.isfinite(t.callback_metrics[name]), name


def test_full_training_changes_every_weight(tiny_dir):
    module = tiny_module(tiny_dir, lora=None)
    module.configure_model()
    before = snapshot(module)
    trainer().fit(module, demo_data(module))
    assert changed(before, module) == set(before)


def test_validation_metrics_average_the_whole_set(tiny_dir):
    """7 pairs in batches of 3 (3 + 3 + 1): the epoch value must be the mean over pairs, not over batches.
    The model runs in float64, so batches of 3 and of 1 (other padding) score alike; the metrics
    accumulate and are logged in float32, a mean of 7: the float32 rule with K = 7."""
    module = tiny_module(tiny_dir)
    data = demo_data(module, batch_size=3)
    data.setup()
    data.splits["val"] = data.splits["val"].select(range(7))
    result = trainer(limit_val_batches=1.0, precision="64-true").validate(module, data)[0]
    module.eval()
    collate = PreferenceCollator(module.tokenizer.pad_token_id)
    with torch.no_grad():
        singles = [module.step(collate([pair]))[1] for pair in data.splits["val"]]
    for key in ("rewards/chosen", "rewards/margins", "logps/rejected", "lengths/chosen", "loss"):
        expected = torch.cat([m[key] for m in singles]).mean()
        assert_rounding_close(result[f"val/{key}"], expected, reduction=7, what=key)
    loader = torch.utils.data.DataLoader(data.splits["val"], batch_size=3, collate_fn=collate)
    held_out = reward_metrics(module, loader, module.device)
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert_rounding_close(result[f"val/{key}"], held_out[key], reduction=7, what=key)


def test_nonfinite_loss_skips_then_stops(tiny_dir):
    """A final norm of infinite weight (a diverged model) makes every loss NaN: each step is skipped, counted, and
    the third in a row stops training with advice; no weight moves."""
    module = tiny_module(tiny_dir, max_nonfinite_steps=3)
    module.configure_model()
    with torch.no_grad():
        module.model.get_base_model().model.norm.weight.fill_(float("inf"))
    before = snapshot(module)
    with pytest.raises(UserError, match="3 non-finite losses in a row: lower the learning rate"):
        trainer(max_steps=10).fit(module, demo_data(module))
    assert module.nonfinite_steps == 3 and not changed(before, module)


def first_batch(tiny_dir: str):
    data = demo_data(tiny_module(tiny_dir))
    data.setup()
    return PreferenceCollator(data.tokenizer.pad_token_id)(data.splits["train"].select(range(4)).to_list())


def test_sft_term_adds_its_weight_times_the_chosen_nll(tiny_dir):
    """sft_weight 0.5 adds 0.5 × the token-mean NLL of the chosen responses to the preference loss."""
    batch, losses = first_batch(tiny_dir), {}
    for name, loss in {"plain": LossConfig(), "sft": LossConfig(sft_weight=0.5)}.items():
        torch.manual_seed(0)
        module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None, loss=loss)
        module.configure_model()
        losses[name] = module.step(batch)[0].item()
        chosen = score_pair_batch(module.model, batch, module.chunk).halves()[0]
    nll = -(chosen.sum_logps.sum() / chosen.lengths.sum()).item()
    assert losses["sft"] == pytest.approx(losses["plain"] + 0.5 * nll, rel=1e-5)


def test_gradient_checkpointing_recomputes_each_layer_and_keeps_loss_and_gradients(tiny_dir):
    """With checkpointing the model says it is on and each decoder layer's attention runs twice per step (forward, then
    again in the backward pass); loss and gradients are those of the plain step (same arithmetic, rerun)."""
    batch, runs = first_batch(tiny_dir), {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = PolicyConfig(name_or_path=tiny_dir, gradient_checkpointing=checkpointing)
        module = SimPOModule(policy=policy, lora=None)
        module.configure_model()
        assert module.model.is_gradient_checkpointing == checkpointing
        calls = []
        module.model.model.layers[0].self_attn.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        loss = module.step(batch)[0]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        runs[checkpointing] = (loss.item(), grads, len(calls))
    (plain_loss, plain_grads, plain_calls), (loss, grads, calls) = runs[False], runs[True]
    assert (plain_calls, calls) == (1, 2)
    assert_rounding_close(loss, plain_loss, VOCAB, what="loss")
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert_rounding_close(grad, plain_grads[name], VOCAB, what=name)


def loss_curves_without_and_with_shared_prompt(tiny_dir, name: str) -> list[list[float]]:
    """Float64, SGD runs (helpers: training curves of two paths)."""
    curves = []
    for shared in (False, True):
        torch.manual_seed(0)
        module = tiny_module(tiny_dir, name, lora=None, sgd=True)
        curve = LossCurve()
        trainer(limit_val_batches=0, precision="64-true", callbacks=[curve]).fit(
            module, demo_data(module, shared_prompt=shared)
        )
        curves.append(curve.losses)
    return curves


@pytest.mark.parametrize("name", ["simpo", "dpo"])
def test_shared_prompt_training_gives_the_separate_sequences_loss_curve(name, tiny_dir):
    """Full fine-tuning, so DPO's frozen reference scores the packed batches too."""
    curves = loss_curves_without_and_with_shared_prompt(tiny_dir, name)
    assert len(curves[0]) == 3 and len(set(curves[0])) == 3
    assert_curves_equal(curves[1], curves[0])


@pytest.mark.parametrize("name", ["simpo", "dpo"])
def test_pairs_packed_several_to_a_row_give_the_separate_sequences_loss_and_gradients(name, tiny_dir):
    """Six pairs in three rows (3, 2 and 1 a row) against six separate pairs: the same loss and gradients (the
    loss a mean over pairs, however packed). DPO fully fine-tuned, so its reference scores the packed rows too."""
    data = demo_data(tiny_module(tiny_dir))
    data.setup()
    examples = data.splits["train"].select(range(6)).to_list()
    tagged = [{**e, "row": row} for e, row in zip(examples, [0, 0, 0, 1, 1, 2])]
    runs = []
    for batch in (PreferenceCollator(data.tokenizer.pad_token_id)(b) for b in (examples, tagged)):
        torch.manual_seed(0)
        module = tiny_module(tiny_dir, name, lora=None)
        module.configure_model()
        loss = module.step(batch)[0]
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (loss, grads), (packed_loss, packed_grads) = runs
    assert batch.packed.input_ids.shape[0] == 3
    assert_rounding_close(packed_loss, loss, VOCAB, what="loss")
    assert packed_grads.keys() == grads.keys() and len(grads) > 10
    for key, grad in grads.items():
        assert_rounding_close(packed_grads[key], grad, VOCAB, what=key)


def test_kto_trains_on_shared_prompt_batches_with_their_separate_sequences(tiny_dir):
    curves = loss_curves_without_and_with_shared_prompt(tiny_dir, "kto")
    assert len(curves[1]) == 3 and curves[1] == curves[0]


def test_kto_trains_on_unpaired_rows_and_paired_methods_refuse_them(tiny_dir, tmp_path):
    rows = [
        {"prompt": f"Q{i}: say yes.", "completion": " yes" if i % 3 else " no way", "label": bool(i % 3)}
        for i in range(24)
    ]
    module = tiny_module(tiny_dir, "kto", lora=None)
    data = demo_data(module, train_data=str(write_jsonl(tmp_path / "unpaired.jsonl", rows)))
    trainer(max_steps=3, limit_val_batches=1).fit(module, data)
    assert "completion" in data.splits["train"][0]
    assert (
        torch.isfinite(module.trainer.callback_metrics["train/loss"]) and "train/kl" in module.trainer.callback_metrics
    )
    paired_only = tiny_module(tiny_dir, "simpo")
    paired_only.configure_model()
    batch = PreferenceCollator(module.tokenizer.pad_token_id)(data.splits["train"].select(range(4)).to_list())
    with pytest.raises(UserError, match="needs paired data"):
        paired_only.step(batch)


def test_precompute_is_refused_for_kto():
    with pytest.raises(UserError, match="precompute"):
        SimPOModule(
            policy=PolicyConfig(name_or_path="unused"),
            loss=LossConfig(name="kto"),
            reference=ReferenceConfig(precompute=True),
        )
