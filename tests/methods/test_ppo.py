"""PPOModule on the tiny model through a real Trainer: the value model starts at zero, both models train, the
value head is saved with LoRA, and TRL's metric names (``val/*`` as ``value/*``) are logged."""

import torch

from simpo_lightning.data import PromptDataModule
from simpo_lightning.generation.judges import CallableJudge
from simpo_lightning.generation.sampling import SamplingConfig
from simpo_lightning.methods import PPOConfig, PPOModule, UpdateConfig
from simpo_lightning.models.loading import PolicyConfig

from helpers import TINY_LORA, snapshot, trainer

PPO_NAMES = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward"]
PPO_NAMES += ["objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg"]
PPO_NAMES += ["value/clipfrac_avg", "value/ratio", "value/num_eos_tokens"]


def test_ppo_trains_policy_and_value_and_saves_the_value_head(tiny_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = PPOModule(
        policy=PolicyConfig(name_or_path=tiny_dir),
        lora=TINY_LORA,
        update=UpdateConfig(num_iterations=2, updates_per_rollout=2, micro_batch_size=2),
        sampling=SamplingConfig(n=1, temperature=0.7, max_new_tokens=5),
        judge=CallableJudge("helpers.shortest_wins"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    module.configure_model()
    with torch.no_grad():  # the value head starts at zero: every value is 0
        values = module.values([[1, 2, 3]], torch.tensor([[4, 5]]), torch.ones(1, 2))
    assert values.abs().max() == 0
    start = snapshot(module)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    data = PromptDataModule(tokenizer=module.tokenizer, batch_size=4, cache_dir=None)
    run = trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver], log_every_n_steps=1)
    run.fit(module, data)
    assert run.global_step == 2 and module.rollouts == 2
    moved = {n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(start[n], p)}
    assert any(n.startswith("model.") for n in moved) and any("value_model" in n and "score" in n for n in moved)
    for name in PPO_NAMES:
        assert torch.isfinite(run.logged_metrics[f"train/{name}"]), name
    assert run.logged_metrics["train/loss/value_avg"] > 0
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert any("value_model" in k and "score" in k for k in saved)  # the head, trained and saved
    assert not any("embed_tokens" in k for k in saved)  # LoRA: trainable weights only


def test_the_value_model_can_start_from_another_model(tiny_dir):
    """``value_model``: a folder loaded under a scoring head (a reward model's head is kept; this causal LM has
    none, so the head starts random and the values are not 0), on the policy's other settings."""
    module = PPOModule(
        policy=PolicyConfig(name_or_path=tiny_dir, dtype="float64"),
        lora=TINY_LORA,
        method=PPOConfig(value_model=tiny_dir),
        sampling=SamplingConfig(n=1, temperature=0.7, max_new_tokens=5),
        judge=CallableJudge("helpers.shortest_wins"),
    )
    module.configure_model()
    with torch.no_grad():
        values = module.values([[1, 2, 3]], torch.tensor([[4, 5]]), torch.ones(1, 2))
    assert values.abs().min() > 0 and next(module.value_model.parameters()).dtype == torch.float64
