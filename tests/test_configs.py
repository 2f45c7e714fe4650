"""Every shipped config runs, not only parses: each YAML in configs/ (the GPU folders aside: ``estimate`` checks
those) trains 2 steps on the tiny model through the command's entry point, with its own callbacks, data and
settings. A preference method's config also proves that the loss it trained with is the one it names: on a
held-out batch, the module's loss equals that loss function on log-probs scored independently (each sequence
alone, the model's own full logits, float64 log-softmax; the reference by switching the adapters off).
A new fit config is run here by being in the folder; another command's config needs a test of its own
(``RUN_BY_OWN_TEST``), or ``test_every_shipped_config_is_run`` fails."""

import csv
import json
import math

import pytest
import torch
import yaml

from simpo_lightning.cli import cli_main, main
from simpo_lightning.data import arithmetic, demo
from simpo_lightning.generation.commands import read_jsonl
from simpo_lightning.losses.config import LossConfig
from simpo_lightning.losses.preference import kto_kl
from simpo_lightning.scoring.logprobs import IGNORE_INDEX

from helpers import (
    ROOT,
    VOCAB,
    assert_rounding_close,
    csv_logger,
    hash_score,
    run_command,
    tiny_model_args,
    write_jsonl,
)

MODEL_FOLDERS = ("llama-3-8b-instruct", "mistral-7b-instruct")  # real-use GPU configs: tests/test_cli.py parses them
CONFIGS = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if c.parent.name not in MODEL_FOLDERS)


def command_of(config) -> str:
    """The command in a config's first line, ``# simpo-lightning <command> --config …``."""
    return config.read_text().split()[2]


def class_of(config) -> str:
    return yaml.safe_load(config.read_text())["model"].get("class_path", "simpo_lightning.methods.SimPOModule")


RUN_BY_OWN_TEST = {
    "quickstart.yaml": "test_the_quickstart_then_the_evaluate_demo",
    "evaluate-demo.yaml": "test_the_quickstart_then_the_evaluate_demo",
    "onpolicy-demo.yaml": "test_the_onpolicy_rounds",
    "onpolicy-arithmetic.yaml": "test_the_onpolicy_rounds",
    "lean.yaml": "test_the_lean_config_in_a_process_of_its_own",
}
FIT = [c for c in CONFIGS if command_of(c) == "fit" and c.name not in RUN_BY_OWN_TEST]
ONLINE = ("GRPOModule", "RLOOModule", "PPOModule")


def test_every_shipped_config_is_run():
    assert {c.name for c in FIT} | set(RUN_BY_OWN_TEST) == {c.name for c in CONFIGS}
    assert len({c.name for c in CONFIGS}) == len(CONFIGS)  # names identify configs here
    assert all(name in globals() for name in RUN_BY_OWN_TEST.values())


def steps_args(tmp_path, task=demo) -> list[str]:
    """2 steps, a validation of 2 batches at the second, CSV logs under ``tmp_path/run``, no data cache, and 6 to 8
    of the task's held-out pairs (with their reference answers) for the before/after report."""
    held_out = write_jsonl(tmp_path / "held-out.jsonl", task.rows("val")[::9])
    return [
        "--data.val_data",
        str(held_out),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        csv_logger(tmp_path),
        "--data.cache_dir",
        "null",
    ]


def hh_file(tmp_path):
    """A few dialogues in Anthropic HH-RLHF's format (a shared prompt, two last assistant turns)."""
    rows = [
        {
            "chosen": f"\n\nHuman: Name a colour, {i}.\n\nAssistant: Blue{'!' * (i % 3)}",
            "rejected": f"\n\nHuman: Name a colour, {i}.\n\nAssistant: I will not.",
        }
        for i in range(24)
    ]
    return write_jsonl(tmp_path / "hh.jsonl", rows)


@pytest.mark.parametrize("config", FIT, ids=lambda p: p.name)
def test_every_fit_config_trains_on_the_tiny_model(config, tiny_dir, tmp_path, capsys):
    task = arithmetic if "arithmetic" in config.name else demo  # NumberJudge needs numbers as references
    args = ["fit", "--config", str(config), *tiny_model_args(tiny_dir), *steps_args(tmp_path, task)]
    kind = class_of(config).rpartition(".")[2]
    if kind in ONLINE:
        args += ["--model.sampling.max_new_tokens", "4"] + (["--model.sampling.n", "2"] if kind != "PPOModule" else [])
    if config.name == "hh-rlhf.yaml":  # its own held-out pairs: a share of the training file's
        args += ["--data.train_data", str(hh_file(tmp_path)), "--data.val_data", "null"]
    cli = cli_main(args)
    assert type(cli.model).__name__ == kind  # the module the YAML names
    rows = list(csv.DictReader((tmp_path / "run/version_0/metrics.csv").open()))
    trained = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(trained) == 2 and all(map(math.isfinite, trained))
    checkpoint = torch.load(tmp_path / "run/version_0/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    if kind in ONLINE:  # steps count rollouts; the judge on greedy answers to held-out prompts, validated, reported
        verifier = cli.model.judge.verifier
        assert checkpoint["online_rollouts"] == 2 and verifier == (task is arithmetic)
        validated = [r for r in rows if r.get("val/reward")]
        assert len(validated) == 1 and bool(validated[0].get("val/accuracy")) == verifier
        assert bool(validated[0].get("val/sampled/reward")) == (cli.model.val_samples > 0) == (task is arithmetic)
        assert ("accuracy" in capsys.readouterr().out.split("held-out after training:")[1]) == verifier
    if kind == "SimPOModule":
        batch = next(iter(cli.datamodule.val_dataloader()))
        assert_the_named_loss_ran(cli.model, batch, named_loss(config))


# --------------------------------------------------------------------------- the loss that ran


def plain_scores(model, seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's response tokens and their count: the model's full logits of each
    sequence on its own (right padding changes nothing before it), log-softmax in float64."""
    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits.double()
    labels = seqs.labels[:, 1:]
    scored = labels != IGNORE_INDEX
    picked = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * scored).sum(-1), scored.sum(-1)


def reference_scores(model, seqs) -> torch.Tensor:
    with model.disable_adapter():  # the method configs train LoRA: the reference is the base
        return plain_scores(model, seqs)[0]


def named_loss(config) -> LossConfig:
    """The loss section of a config file, as the file writes it."""
    return LossConfig(**yaml.safe_load(config.read_text())["model"]["loss"])


@torch.no_grad()
def assert_the_named_loss_ran(module, batch, config: LossConfig) -> None:
    """The module's loss on ``batch`` is the loss ``config`` (the config file's) names with its settings, on
    independently scored log-probs (plus ``sft_weight`` times the token-mean NLL of the chosen responses)."""
    module.eval()
    model = module.model
    method, hparams = config.method(), config.hparams()
    if method.paired:
        sums, lengths = plain_scores(model, batch.both())
        inputs = [sums / lengths if method.average else sums]
        if method.reference:
            ref = reference_scores(model, batch.both())
            inputs.append(ref / lengths if method.average else ref)
        n = len(batch)
        args = [half for x in inputs for half in x.chunk(2)]
        extra = {"chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:]} if method.lengths else {}
        losses = method.loss(*args, **extra, **hparams)[0]
        chosen = slice(0, n)
    else:  # KTO: each chosen a desirable, each rejected an undesirable completion, z₀ from mismatched pairs
        unpaired = batch.as_unpaired(module.tokenizer.pad_token_id)
        sums, lengths = plain_scores(model, unpaired.completions)
        z0 = kto_kl(plain_scores(model, unpaired.kl)[0], reference_scores(model, unpaired.kl)).clamp(min=0)
        ref = reference_scores(model, unpaired.completions)
        losses = method.loss(sums, ref, unpaired.desirable.bool(), z0, **hparams)[0]
        chosen = unpaired.desirable.bool()
    expected = losses.mean() - config.nll_weight() * sums[chosen].sum() / lengths[chosen].sum()
    loss, _ = module.step(batch)
    assert_rounding_close(loss, expected, VOCAB, what=f"{config.name} loss")


# --------------------------------------------------------------------------- the other commands' configs


def test_the_quickstart_then_the_evaluate_demo(tiny_dir, tmp_path, monkeypatch, capsys):
    """README's flow on the tiny model: ``fit --config configs/quickstart.yaml`` (its W&B logger, offline) puts its
    checkpoint where ``evaluate --config configs/commands/evaluate-demo.yaml`` looks for it, which judges it against a
    baseline on the held-out questions and writes its report."""
    import wandb

    monkeypatch.chdir(tmp_path)
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.cache_dir", "null"]
    cli = cli_main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *tiny_model_args(tiny_dir), *steps])
    wandb.finish()
    assert "held-out after training" in capsys.readouterr().out
    batch = next(iter(cli.datamodule.val_dataloader()))
    assert_the_named_loss_ran(cli.model, batch, named_loss(ROOT / "configs/quickstart.yaml"))
    (checkpoint,) = tmp_path.glob("runs/simpo-lightning/*/checkpoints/last.ckpt")
    evaluate = ["--baseline", tiny_dir, "--max_prompts", "6", "--sampling.max_new_tokens", "4"]
    main(["evaluate", "--config", str(ROOT / "configs/commands/evaluate-demo.yaml"), *evaluate])
    (result,) = json.loads((tmp_path / "runs/evaluate/results.json").read_text())["results"]
    assert result["source"] == str(checkpoint.relative_to(tmp_path)) and result["prompts"] == 6
    assert 0 <= result["win_rate"] <= 1 and (tmp_path / "runs/evaluate/win_rate.png").is_file()


ROUNDS_JUDGES = {  # the random tiny model never answers right, so the configs' judges would tie every sample
    "onpolicy-demo.yaml": {  # shorter wins
        "class_path": "simpo_lightning.generation.CallableJudge",
        "init_args": {"function": "helpers.shortest_wins"},
    },
    "onpolicy-arithmetic.yaml": {"class_path": "helpers.HashVerifier"},  # a verifier: right by a hash
}


@pytest.mark.parametrize("name", ROUNDS_JUDGES)
def test_the_onpolicy_rounds(name, tiny_dir, tmp_path, capsys):
    """``rounds --config configs/commands/<name>``, one round on the tiny model (its fit config, the quickstart,
    made tiny through ``fit_args``): generate, pair, fit, the round's held-out table, and the judge on greedy
    answers to the held-out prompts before and after the round (accuracy where the judge is a verifier)."""
    fit_args = [*tiny_model_args(tiny_dir), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    fit_args += ["--data.cache_dir", "null", "--trainer.limit_val_batches", "2"]
    task = arithmetic if "arithmetic" in name else demo
    held_out = write_jsonl(tmp_path / "held-out.jsonl", task.rows("val")[::9])  # 6 to 8 of the task's held-out rows
    options = ["--rounds", "1", "--run_dir", str(tmp_path), "--sampling.max_new_tokens", "4"]
    options += ["--judge", json.dumps(ROUNDS_JUDGES[name]), "--val_data", str(held_out)]
    options += ["--fit_config", str(ROOT / "configs/quickstart.yaml"), "--fit_args", json.dumps(fit_args)]
    main(["rounds", "--config", str(ROOT / "configs/commands" / name), *options])
    home = tmp_path / name.removesuffix(".yaml") / "round-1"
    summary = json.loads((home / "pairs.json").read_text())
    assert summary["prompts"] > 100 and summary["pairs"] > 0
    heldout = json.loads((home / "fit.json").read_text())
    assert set(heldout) == {"before", "after"} and "exact_match" in heldout["after"]
    assert (home / "fit/checkpoints/last.ckpt").is_file()
    table = capsys.readouterr().out.split("| round |")[-1]
    if "arithmetic" in name:  # the judge's mean and share right of the greedy answers, before (base) and after round 1
        scores = [
            [hash_score(r["prompt"], r["responses"][0]) for r in read_jsonl(file)]
            for file in (home.parent / "heldout-0.jsonl", home / "heldout.jsonl")
        ]
        assert len(scores[0]) == len(scores[1]) == len(arithmetic.problems("val")[::9])
        reward = [sum(s) / len(s) for s in scores]
        accuracy = [sum(x > 0 for x in s) / len(s) for s in scores]
        row = table.splitlines()[2]
        assert row.endswith(f"| {reward[0]:.3f} → {reward[1]:.3f} | {accuracy[0]:.3f} → {accuracy[1]:.3f} |")
    else:
        assert "judge's reward" in table and "judge's accuracy" in table  # a column of "-" for a plain judge


@pytest.mark.slow
def test_the_lean_config_in_a_process_of_its_own(tiny_dir, tmp_path):
    """In a process of its own: ReturnFreedMemory changes the C allocator of the process it runs in."""
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/variants/lean.yaml"),
        *tiny_model_args(tiny_dir),
        *steps_args(tmp_path),
    ]
    run_command(args, tmp_path)
    rows = list(csv.DictReader((tmp_path / "run/version_0/metrics.csv").open()))
    assert len([r for r in rows if r.get("train/loss")]) == 2
    checkpoint = torch.load(tmp_path / "run/version_0/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer_in_backward"] and checkpoint["hyper_parameters"]["lora"] is None
