"""RewardModule: Bradley–Terry against TRL's RewardTrainer (loss, rewards, gradients), the pad token that
makes the score land on the final end-of-sequence, and a trained checkpoint exported as a folder that
``AutoModelForSequenceClassification`` loads and ``RewardModelJudge`` scores with."""

import copy
import json
import os

import pytest
import torch

from simpo_lightning.cli import main
from simpo_lightning.data.batch import PairBatch, Sequences
from simpo_lightning.data.encoding import Columns, PairEncoder, Truncation
from simpo_lightning.errors import UserError
from simpo_lightning.generation.judges import RewardModelJudge
from simpo_lightning.methods.reward import RewardModule, reward_pad_token
from simpo_lightning.models.loading import PolicyConfig

from helpers import ROOT, assert_rounding_close, write_jsonl

ROWS = [
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome, I think.", "margin": 1.5},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No.", "margin": 0.0},
    {"prompt": "Name a colour:", "chosen": " blue, like the sky", "rejected": " seven", "margin": 0.25},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5 or maybe 22", "margin": 2.0},
]


def reward_module(tiny_dir: str, **kwargs) -> RewardModule:
    torch.manual_seed(0)
    module = RewardModule(policy=PolicyConfig(name_or_path=tiny_dir, dtype="float64"), lora=None, **kwargs)
    module.configure_model()
    return module


def test_pad_is_not_eos_so_the_score_is_read_at_the_final_eos(tiny_dir):
    module = reward_module(tiny_dir)
    tokenizer = module.tokenizer
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == 2  # SmolLM2's pad is eos; the module changed it
    assert module.model.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7, tokenizer.eos_token_id]])
    changed = ids.clone()
    changed[0, -1] = 9  # the score depends on the final eos token: it is read there
    with torch.no_grad():
        assert module.rewards(ids, torch.ones_like(ids)) != module.rewards(changed, torch.ones_like(changed))
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        reward_pad_token(copy.deepcopy(tokenizer), "<no such token>")


@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_rewards_and_gradients_match_trl_reward_trainer(tiny_dir, tmp_path, center):
    import datasets
    from test_parity_trl import assert_same_step
    from trl import RewardConfig, RewardTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    module = reward_module(tiny_dir, center_rewards_coefficient=center)
    tokenizer = module.tokenizer
    encoder = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    encoded = [encoder(row) for row in ROWS]
    rows = [
        {"chosen_ids": e["prompt"] + e["chosen"], "rejected_ids": e["prompt"] + e["rejected"], "margin": r["margin"]}
        for e, r in zip(encoded, ROWS)
    ]
    args = RewardConfig(
        output_dir=str(tmp_path),
        center_rewards_coefficient=center,
        per_device_train_batch_size=4,
        pad_token=tokenizer.pad_token,
        report_to="none",
        use_cpu=True,
    )
    theirs = RewardTrainer(
        model=copy.deepcopy(module.model),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),
    )
    inputs = next(iter(theirs.get_train_dataloader()))
    trl_loss, outputs = theirs.compute_loss(theirs.model, dict(inputs), return_outputs=True)
    n = len(ROWS)
    both = Sequences(inputs["input_ids"], inputs["attention_mask"], inputs["input_ids"])
    batch = PairBatch(both.rows(slice(0, n)), both.rows(slice(n, None)), margin=inputs["margin"].double())
    loss, metrics = module.step(batch)
    rewards = outputs.logits.squeeze(-1).detach()
    scale = rewards.abs().max().item()
    assert_rounding_close(metrics["rewards/chosen"], rewards[:n], reduction=2048, dtype=torch.float64)
    assert_rounding_close(metrics["rewards/rejected"], rewards[n:], reduction=2048, dtype=torch.float64)
    assert_rounding_close(loss, trl_loss.detach(), reduction=2048, dtype=torch.float64, what="loss")
    assert torch.equal(metrics["accuracy"], (rewards[:n] > rewards[n:]).float())
    assert scale > 0 and len(set(metrics["margin"].tolist())) == n
    assert_same_step(module.model, loss, theirs.model, trl_loss, torch.float64)


def test_margin_and_centering_enter_the_loss_as_written(tiny_dir):
    """The loss against a plain formula on the module's own rewards: −log σ(r_w − r_l − m) + c·mean((r_w + r_l)²)."""
    module = reward_module(tiny_dir, center_rewards_coefficient=0.5)
    encoder = PairEncoder(module.tokenizer, Columns(), Truncation(), "auto")
    from simpo_lightning.data.collate import PreferenceCollator

    examples = [{**encoder(row), "margin": row["margin"] if i else None} for i, row in enumerate(ROWS)]
    batch = PreferenceCollator(module.tokenizer.pad_token_id)(examples)
    assert torch.isnan(batch.margin[0]) and batch.margin[1:].tolist() == [r["margin"] for r in ROWS[1:]]
    with torch.no_grad():
        loss, metrics = module.step(batch)
    chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
    margins = torch.tensor([0.0] + [r["margin"] for r in ROWS[1:]], dtype=torch.float64)  # no margin: 0
    expected = (
        -torch.nn.functional.logsigmoid(chosen - rejected - margins).mean() + 0.5 * ((chosen + rejected) ** 2).mean()
    )
    assert_rounding_close(loss, expected, reduction=8, dtype=torch.float64)


def test_pairs_packed_several_to_a_row_give_the_separate_sequences_rewards_and_gradients(tiny_dir):
    """Four pairs in two rows against four separate ones (padded, each reward read at the last token that is not
    padding): the same rewards, loss and gradients, each reward read at the end of its own response."""
    from simpo_lightning.data.collate import PreferenceCollator

    runs = []
    encoder = PairEncoder(reward_module(tiny_dir).tokenizer, Columns(), Truncation(), "auto")
    examples = [{**encoder(row), "margin": row["margin"]} for row in ROWS]
    for tags in (None, [0, 1, 0, 0]):
        module = reward_module(tiny_dir, center_rewards_coefficient=0.01)
        rows = examples if tags is None else [{**e, "row": t} for e, t in zip(examples, tags)]
        batch = PreferenceCollator(module.tokenizer.pad_token_id)(rows)
        assert (batch.packed is None) == (tags is None)
        loss, metrics = module.step(batch)
        loss.backward()
        runs.append((loss, metrics, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (loss, metrics, grads), (packed_loss, packed_metrics, packed_grads) = runs
    assert_rounding_close(packed_loss, loss, reduction=2048, what="loss")
    for key in ("rewards/chosen", "rewards/rejected"):
        assert_rounding_close(packed_metrics[key], metrics[key], reduction=2048, what=key)
    assert packed_grads.keys() == grads.keys() and len(grads) > 10
    for key, grad in grads.items():
        assert_rounding_close(packed_grads[key], grad, reduction=2048, what=key)


@pytest.mark.slow
def test_a_trained_reward_model_exports_and_judges_as_it_scored(tiny_dir, tmp_path):
    """fit configs/methods/reward.yaml (LoRA, the head trained too) on the tiny model, export, load the folder with
    AutoModelForSequenceClassification and score with RewardModelJudge: the module's own rewards."""
    from transformers import AutoModelForSequenceClassification

    train = write_jsonl(tmp_path / "train.jsonl", ROWS * 4)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/methods/reward.yaml"),
            "--model.policy.name_or_path",
            tiny_dir,
            "--data.train_data",
            str(train),
            "--data.val_data",
            str(train),
            "--data.cache_dir",
            "null",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}),
        ]
    )
    (ckpt,) = tmp_path.rglob("last.ckpt")
    main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "rm")])
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any("score" in k for k in state) and any("lora" in k for k in state)  # the head saved with the adapters
    module = RewardModule.load_from_checkpoint(ckpt, map_location="cpu")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert model.config.pad_token_id == module.tokenizer.pad_token_id != module.tokenizer.eos_token_id
    judge = RewardModelJudge(str(tmp_path / "rm"))
    prompts, responses = [r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS]
    conversations = [judge.conversation(p, r) for p, r in zip(prompts, responses)]
    module.eval()
    with torch.no_grad():
        expected = [
            module.rewards(torch.tensor([c]), torch.ones(1, len(c), dtype=torch.long)).item() for c in conversations
        ]
    assert_rounding_close(judge(prompts, responses), expected, reduction=2048)
