"""GRPOModule and RLOOModule on the tiny model and the demo's prompts, through a real Trainer: what it logs,
how it counts rollouts, what it does with bad rewards, resume, a zero learning rate, and the demo config
through the real command."""

import csv
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from simpo_lightning.callbacks import HeldOutReport
from simpo_lightning.cli import cli_main
from simpo_lightning.data import PromptDataModule, demo
from simpo_lightning.errors import UserError
from simpo_lightning.generation.judges import CallableJudge, Judge
from simpo_lightning.generation.sampling import SamplingConfig, derived_seed, sample_responses
from simpo_lightning.methods import GRPOConfig, GRPOModule, RLOOConfig, RLOOModule, UpdateConfig
from simpo_lightning.models.loading import PolicyConfig

from helpers import (
    ROOT,
    TINY_LORA,
    VOCAB,
    HashVerifier,
    Interrupt,
    StepsTaken,
    assert_rounding_close,
    changed,
    hash_score,
    run_command,
    snapshot,
    tiny_args,
    trainer,
    wandb_history,
    write_jsonl,
)

TRL_NAMES = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio"]
TRL_NAMES += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "loss"]
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}


def online(
    tiny_dir: str, lr: float = 1e-2, judge: Judge | None = None, method: str = "grpo", val_samples: int = 0, **settings
):
    """GRPO (or RLOO) on the tiny model, 4 samples of 5 tokens per prompt, a constant learning rate; ``settings``
    are fields of the method's config or of ``UpdateConfig``."""
    update = {f.name for f in fields(UpdateConfig)}
    module, config = (GRPOModule, GRPOConfig) if method == "grpo" else (RLOOModule, RLOOConfig)
    return module(
        policy=PolicyConfig(name_or_path=tiny_dir),
        lora=TINY_LORA,
        method=config(**{k: v for k, v in settings.items() if k not in update}),
        update=UpdateConfig(**{"micro_batch_size": 4} | {k: v for k, v in settings.items() if k in update}),
        sampling=SamplingConfig(n=4, temperature=1.0, max_new_tokens=5),
        judge=judge if judge is not None else CallableJudge("helpers.shortest_wins"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        val_samples=val_samples,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )


def prompts(module, **kwargs) -> PromptDataModule:
    return PromptDataModule(tokenizer=module.tokenizer, **({"batch_size": 2, "cache_dir": None} | kwargs))


def test_grpo_with_kl_counts_rollouts_and_logs_trls_names_and_a_completions_table(tiny_dir, tmp_path):
    """Two passes of two updates per rollout: four optimizer steps per rollout, but steps count rollouts;
    W&B (offline) gets TRL's metric names, the KL, and the completions table."""
    from simpo_lightning.loggers import WandbLogger

    module = online(tiny_dir, beta=0.04, num_iterations=2, updates_per_rollout=2, log_completions_steps=2)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    run = trainer(max_steps=3, logger=logger, log_every_n_steps=1, val_check_interval=3, check_val_every_n_epoch=None)
    run.fit(module, prompts(module))
    assert run.global_step == 3 and module.rollouts == 3
    steps = run.optimizers[0].state_dict()["state"]
    assert all(s["step"].item() == 12 for s in steps.values())  # 3 rollouts × 2 passes × 2 updates
    logger.experiment.finish()
    history, _ = wandb_history(next(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb")))
    for name in [*TRL_NAMES, "kl"]:
        assert math.isfinite(history[f"train/{name}"]), name
    assert history["train/kl"] > 0  # the policy moved from the reference (adapters off)
    assert history["train/clip_ratio/region_mean"] > 0  # reused samples: ratios left 1 and got clipped
    assert history["completions/_type"] == "table-file"  # rollouts 1 and 3: the first two groups of 4
    assert history["completions/ncols"] == 5 and history["completions/nrows"] == 8
    assert "val/rewards/accuracies" in history


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_validation_logs_the_judge_on_greedy_answers_to_held_out_prompts(method, tiny_dir, tmp_path):
    """``val/reward`` and, for a verifier, ``val/accuracy``: the judge on greedy answers to the held-out prompts,
    here as transformers' own ``generate`` gives them, one prompt at a time. ``val/sampled/…``: the judge on 3
    samples of each at the sampling temperature, seeded by the sampling's seed and "validation"."""
    module = online(tiny_dir, judge=HashVerifier(), method=method, val_samples=3)
    data = prompts(module, val_data=str(write_jsonl(tmp_path / "val.jsonl", demo.rows("val")[:16])))  # 8 prompts
    run = trainer(max_steps=1, val_check_interval=1, limit_val_batches=1)
    run.fit(module, data)
    scores = []
    for row in data.val_prompts:
        ids = torch.tensor([row.tokens])
        out = module.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5
        )
        scores.append(hash_score(row.prompt, module.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    assert len(scores) == 8 and 0 < sum(s > 0 for s in scores) < 8  # answers of both kinds
    assert run.logged_metrics["val/accuracy"] == pytest.approx(sum(s > 0 for s in scores) / 8)
    assert run.logged_metrics["val/reward"] == pytest.approx(sum(scores) / 8)
    seed = derived_seed(module.sampling.seed, "validation", bits=62)
    sampling = SamplingConfig(**{**vars(module.sampling), "n": 3, "seed": seed})
    groups = sample_responses(module.model, module.tokenizer, [r.tokens for r in data.val_prompts], sampling)
    sampled = [
        hash_score(row.prompt, module.tokenizer.decode(s.tokens, skip_special_tokens=True))
        for row, group in zip(data.val_prompts, groups)
        for s in group
    ]
    assert len(sampled) == 24 and sampled != [s for s in scores for _ in range(3)]  # samples, not the greedy answers
    assert run.logged_metrics["val/sampled/accuracy"] == pytest.approx(sum(s > 0 for s in sampled) / 24)
    assert run.logged_metrics["val/sampled/reward"] == pytest.approx(sum(sampled) / 24)


class CountingReport(HeldOutReport):
    """HeldOutReport that records how many prompts it answers itself at each call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.made: list[int] = []

    def answers(self, module, prompts: list[list[int]]) -> list[str]:
        self.made.append(len(prompts))
        return super().answers(module, prompts)


def test_the_report_after_training_judges_the_answers_of_the_validation_at_the_last_step(tiny_dir, tmp_path):
    """Validation at the last step made greedy answers to the held-out prompts; the report's "after" takes them
    (it answers the 8 prompts once, before training) and so prints what that validation logged. In a second
    run, the answers of the first run's last step are not taken at step 0, nor answers of another length."""
    module = online(tiny_dir, judge=HashVerifier())
    data = prompts(module, val_data=str(write_jsonl(tmp_path / "val.jsonl", demo.rows("val")[:16])))  # 8 prompts
    report = CountingReport(max_new_tokens=module.sampling.max_new_tokens)
    run = trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, callbacks=[report])
    run.fit(module, data)
    assert report.made == [8]
    for key in ("reward", "accuracy"):
        assert report.results["after"][key] == pytest.approx(float(run.logged_metrics[f"val/{key}"]))
    same, longer = (CountingReport(max_new_tokens=module.sampling.max_new_tokens + k) for k in (0, 1))
    run = trainer(max_steps=1, val_check_interval=1, check_val_every_n_epoch=None, callbacks=[same, longer])
    run.fit(module, data)
    assert same.made == [8] and longer.made == [8, 8]


def test_rloo_trains_its_adapters_only(tiny_dir):
    module = online(tiny_dir, method="rloo")
    module.configure_model()
    start = snapshot(module)
    trainer(max_steps=2, limit_val_batches=0).fit(module, prompts(module))
    adapters = {n for n, p in module.named_parameters() if p.requires_grad}
    assert adapters and changed(start, module) == adapters  # sampling and the reference leave the base as it is
    assert module.kl_weight == 0.05  # TRL's default: a reference, KL in the reward
    assert module.rollout_stats["kl"] != 0  # the policy moved away from the reference (adapters off)


class FirstRolloutNaN(Judge):
    """A judge whose first batch of scores has a NaN (a reward model overflowing once)."""

    calls = 0

    def score(self, prompts, responses, references):
        self.calls += 1
        return [float("nan") if self.calls == 1 and i == 0 else -len(r) for i, r in enumerate(responses)]


def test_a_nan_reward_skips_its_rollout_and_is_counted(tiny_dir):
    module = online(tiny_dir, judge=FirstRolloutNaN())
    run = trainer(max_steps=2, limit_val_batches=0)
    run.fit(module, prompts(module))
    assert run.global_step == 2 and module.rollouts == 3 and module.nonfinite_steps == 1


def test_one_sample_per_prompt_is_refused(tiny_dir):
    with pytest.raises(UserError, match="GRPOModule needs 2 or more samples per prompt"):
        GRPOModule(policy=PolicyConfig(name_or_path=tiny_dir), sampling=SamplingConfig(n=1))


def test_prompt_files_and_prompts_over_budget(tiny_dir, tmp_path):
    """A file of prompts (no pairs) trains; prompts over max_prompt_length are counted skips, not errors."""
    rows = [{"prompt": "Say hi.", "reference": "hi"}, {"prompt": "word " * 300}, {"prompt": "Name a colour."}]
    module = online(tiny_dir)
    data = prompts(module, train_data=str(write_jsonl(tmp_path / "prompts.jsonl", rows)))
    data.truncation.max_prompt_length = 64
    run = trainer(max_steps=1, limit_val_batches=0)
    run.fit(module, data)
    assert len(data.prompts) == 2 and data.skipped == {"prompt over 64 tokens": 1} and run.global_step == 1


def test_resume_repeats_the_uninterrupted_rollouts(tiny_dir, tmp_path):
    """Interrupted after 2 of 4 rollouts and resumed from its checkpoint, a run ends with the same weights as
    one that ran through: sampling seeds, update order and the prompts come back with the rollout count."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(folder: Path, callbacks: list, ckpt_path=None):
        torch.manual_seed(0)  # the same LoRA initialisation, as seed_everything gives every command run
        module = online(tiny_dir, updates_per_rollout=2)
        saver = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)
        run = trainer(max_steps=4, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver, *callbacks])
        run.fit(module, prompts(module), ckpt_path=ckpt_path)
        return module

    straight = fit(tmp_path / "straight", [])
    with pytest.raises(SystemExit):  # Lightning turns the interruption into an exit
        fit(tmp_path / "resumed", [Interrupt(3)])
    saved = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2 and saved["online_rollouts"] == 2  # interrupted in the third rollout's end
    taken = StepsTaken()
    resumed = fit(tmp_path / "resumed", [taken], ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert taken.steps == [2, 3] and resumed.rollouts == straight.rollouts == 4  # went on from the checkpoint
    mine, theirs = dict(resumed.named_parameters()), dict(straight.named_parameters())
    assert any(p.requires_grad for p in mine.values())
    for name, p in mine.items():
        if p.requires_grad:
            assert torch.equal(p, theirs[name]), name


def ends_early(tiny_dir: str, folder: Path) -> str:
    """The tiny model with its end-of-sequence row of the (tied) output head set to 10 times a random unit
    vector: it samples end-of-sequence often enough that completions of 4 tokens end at different lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 10 * direction / direction.norm()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_with_the_same_global_batch(tiny_dir, tmp_path):
    """GRPO (DAPO loss, advantages scaled by the batch's reward std) over 2 processes with 2 prompts each
    against 1 process with the same 4: the same samples (seeded by prompt), each group's mean in the process
    that holds it, the std over both processes, DAPO's token count over both (completions of different
    lengths, so each process's own count differs from the global one), gradients averaged by DDP: the same
    LoRA update after 2 rollouts (plain SGD; lora_B starts at 0, so its final value is the update), by the
    rounding rule. The two processes start as torchrun starts them (``run_command(ranks=2)``)."""
    model = ends_early(tiny_dir, tmp_path / "ends-early")
    judge = {
        "class_path": "simpo_lightning.generation.CallableJudge",
        "init_args": {"function": "helpers.shortest_wins"},
    }
    common = ["--trainer.max_steps", "2", "--model.sampling.n", "4", "--model.sampling.max_new_tokens", "4"]
    common += ["--model.judge", json.dumps(judge), "--model.optimizer", json.dumps(SGD)]
    common += ["--model.method.scale_rewards", "batch", "--trainer.log_every_n_steps", "1"]
    runs = {
        "one": ["--data.batch_size", "4"],
        "two": ["--data.batch_size", "2", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
        + ["--trainer.strategy", "ddp"],
    }
    updates = {}
    for name, extra in runs.items():
        args = ["fit", *tiny_args(model, tmp_path / name, *common, *extra, config="online/grpo-demo.yaml")]
        if name == "one":
            cli_main(args)
        else:
            run_command(args, tmp_path, ranks=2, PYTHONPATH=str(ROOT / "tests"))
        (checkpoint,) = (tmp_path / name).glob("run/version_*/checkpoints/last.ckpt")
        state = torch.load(checkpoint, weights_only=False)["state_dict"]
        updates[name] = {k: v for k, v in state.items() if "lora_B" in k}
    (metrics,) = (tmp_path / "one").glob("run/version_*/metrics.csv")
    lengths = [
        (float(r["train/completions/min_length"]), float(r["train/completions/max_length"]))
        for r in csv.DictReader(metrics.open())
        if r.get("train/completions/min_length")
    ]
    assert len(lengths) == 2 and lengths[0][0] < lengths[0][1], lengths  # the first rollout: unequal lengths
    assert updates["one"] and updates["one"].keys() == updates["two"].keys()
    assert max(v.abs().max() for v in updates["one"].values()) > 0
    for key, value in updates["one"].items():
        assert_rounding_close(updates["two"][key], value, VOCAB, what=key)
