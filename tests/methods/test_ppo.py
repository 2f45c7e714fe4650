"""PPOModule on the tiny model through a real Trainer: with LoRA the value model is a second set of adapters on the
policy's base (it starts at zero, both adapters and the head train, the base does not, both resume exactly), or
a second model from ``value_model``; TRL's metric names (``val/*`` as ``value/*``) are logged."""

import pytest
import torch

from simpo_lightning.data import PromptDataModule
from simpo_lightning.errors import UserError
from simpo_lightning.generation.judges import CallableJudge
from simpo_lightning.generation.sampling import SamplingConfig
from simpo_lightning.methods import PPOConfig, PPOModule, UpdateConfig
from simpo_lightning.models.loading import PolicyConfig, build_policy, load_checkpoint_weights, without_peft

from helpers import TINY_LORA, Interrupt, StepsTaken, changed, snapshot, trainer

PPO_NAMES = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward"]
PPO_NAMES += ["objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg"]
PPO_NAMES += ["value/clipfrac_avg", "value/ratio", "value/num_eos_tokens"]


def ppo(tiny_dir: str, **settings) -> PPOModule:
    """PPO with LoRA on the tiny model: 2 epochs of 2 minibatches over each rollout of one 5-token sample a prompt."""
    settings = {"policy": PolicyConfig(name_or_path=tiny_dir)} | settings
    return PPOModule(
        lora=TINY_LORA,
        update=UpdateConfig(num_iterations=2, updates_per_rollout=2, micro_batch_size=2),
        sampling=SamplingConfig(n=1, temperature=0.7, max_new_tokens=5),
        judge=CallableJudge("helpers.shortest_wins"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        **settings,
    )


def test_ppo_trains_policy_and_value_adapters_on_one_base_and_saves_both(tiny_dir, tmp_path):
    """With LoRA the value model is the policy's own base with adapters of its own under a zero head: one
    backbone, the base untouched, both adapters and the head trained and saved, the policy's alone exported."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = ppo(tiny_dir)
    module.configure_model()
    assert module.value_model is None and sum("embed_tokens" in n for n, _ in module.named_parameters()) == 1
    with torch.no_grad():  # the value head starts at zero: every value is 0
        values = module.values([[1, 2, 3]], torch.tensor([[4, 5]]), torch.ones(1, 2))
    assert values.abs().max() == 0
    start = snapshot(module)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    data = PromptDataModule(tokenizer=module.tokenizer, batch_size=4, cache_dir=None)
    run = trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver], log_every_n_steps=1)
    run.fit(module, data)
    assert run.global_step == 2 and module.rollouts == 2
    moved = changed(start, module)
    assert {"policy adapters", "value adapters", "value head"} == {part(n) for n in moved}
    assert not any("lora_" not in n and "value_head" not in n for n in moved)  # the base untouched
    for name in PPO_NAMES:
        assert torch.isfinite(run.logged_metrics[f"train/{name}"]), name
    assert run.logged_metrics["train/loss/value_avg"] > 0
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert {part(k) for k in saved} == {"policy adapters", "value adapters", "value head"}  # trainable weights only
    policy = build_policy(module.policy, TINY_LORA)
    load_checkpoint_weights(policy, str(tmp_path / "last.ckpt"))  # export's and init_from's way: the policy's part
    for name, weight in policy.named_parameters():
        assert torch.equal(weight, module.model.get_parameter(name)), name


def part(name: str) -> str:
    """Which part of PPO's one-backbone module a parameter belongs to."""
    if "value_head" in name:
        return "value head"
    if "lora_" in name:
        return "value adapters" if ".value." in name else "policy adapters"
    return "base"


def test_the_value_adapters_are_the_ones_peft_would_run(tiny_dir):
    """``values`` runs the base with the value adapters (peft's own ``set_adapter`` on a copy gives the same
    hidden states), and leaves the policy's adapters active and every adapter trainable."""
    import copy

    module = ppo(tiny_dir)
    module.configure_model()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "value_head" in name:  # LoRA's B starts at 0: make the adapters differ
                p.copy_(torch.randn_like(p))
        peft_model = copy.deepcopy(module.model)
        peft_model.set_adapter("value")
        prompt, completion = [1, 2, 3], torch.tensor([[4, 5, 6]])
        hidden = without_peft(peft_model).model(input_ids=torch.tensor([prompt + [4, 5]])).last_hidden_state
        expected = module.value_head(hidden[0, 2:]).squeeze(-1)
        values = module.values([prompt], completion, torch.ones(1, 3))
        policy_hidden = without_peft(module.model).model(input_ids=torch.tensor([prompt + [4, 5]])).last_hidden_state
    torch.testing.assert_close(values[0], expected)
    assert not torch.allclose(policy_hidden, hidden)  # the policy's adapters give other states, and are back on
    assert all(p.requires_grad for n, p in module.named_parameters() if "lora_" in n)


def test_ppo_resumes_both_adapters_exactly(tiny_dir, tmp_path):
    """Interrupted in its second of 3 rollouts and resumed, PPO ends with the weights of a run that went straight
    through: policy adapters, value adapters and value head (and their optimizer state)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(folder, callbacks: list, ckpt_path=None) -> PPOModule:
        torch.manual_seed(0)
        module = ppo(tiny_dir)
        saver = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)
        run = trainer(max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver, *callbacks])
        run.fit(module, PromptDataModule(tokenizer=module.tokenizer, batch_size=4, cache_dir=None), ckpt_path=ckpt_path)
        return module

    straight = fit(tmp_path / "straight", [])
    with pytest.raises(SystemExit):
        fit(tmp_path / "resumed", [Interrupt(2)])
    saved = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1 and saved["online_rollouts"] == 1  # interrupted in the second rollout's end
    taken = StepsTaken()
    resumed = fit(tmp_path / "resumed", [taken], ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert taken.steps == [1, 2]
    theirs = dict(straight.named_parameters())
    trained = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert {part(n) for n in trained} == {"policy adapters", "value adapters", "value head"}
    for name, p in trained.items():
        assert torch.equal(p, theirs[name]), name


def test_gradient_checkpointing_with_value_adapters_is_refused(tiny_dir):
    """Checkpointing would recompute the value pass under the policy's adapters: refused, with the way out."""
    module = ppo(tiny_dir, policy=PolicyConfig(name_or_path=tiny_dir, gradient_checkpointing=True))
    with pytest.raises(UserError, match="gradient_checkpointing false, or give model.method.value_model"):
        module.configure_model()


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
