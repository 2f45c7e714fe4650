"""The shipped configs and the real `simpo-lightning` command: fit, validate, test, resume, several
processes, the registered commands, and a module other than SimPOModule chosen in the YAML."""

import csv
import json

import pytest
import torch
import yaml

from simpo_lightning.cli import COMMANDS, cli_main, main
from simpo_lightning.losses import LOSSES

from helpers import (
    EVERY_STEP_CHECKPOINT,
    ROOT,
    TWO_PROCESSES,
    assert_rounding_close,
    csv_losses,
    run_command,
    tiny_args,
    wandb_history,
)

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
REAL_USE = [c for c in CONFIGS if c.parent.name != "configs"]  # configs/<model>/<setup>.yaml
VOCAB = 49152  # SmolLM2's: the longest reduction of a step


def resolved(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit:
        cli_main(["fit", *args, "--print_config"])
    assert exit.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def within(shipped, resolved) -> bool:
    """Every value the YAML sets is in the resolved config (which adds the defaults)."""
    if isinstance(shipped, dict):
        return isinstance(resolved, dict) and all(k in resolved and within(v, resolved[k]) for k, v in shipped.items())
    if isinstance(shipped, list):
        return isinstance(resolved, list) and len(shipped) == len(resolved) and all(map(within, shipped, resolved))
    return shipped == resolved


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses(config, capsys):
    """Parsing validates every key against the code's signatures, so configs cannot drift; each config
    starts with the command that runs it."""
    command = config.read_text().splitlines()[0].split()
    assert command[:2] == ["#", "simpo-lightning"] and command[3:5] == [
        "--config",
        f"configs/{config.relative_to(ROOT / 'configs')}",
    ]
    shipped = yaml.safe_load(config.read_text())
    if command[2] != "fit":  # another command's config, e.g. rounds
        with pytest.raises(SystemExit) as exit:
            main([command[2], "--config", str(config), "--print_config"])
        assert exit.value.code in (0, None) and within(shipped, yaml.safe_load(capsys.readouterr().out))
        return
    config_resolved = resolved(capsys, "--config", str(config))
    for section in ("model", "data"):
        assert within(shipped[section].get("init_args", shipped[section]), config_resolved[section]["init_args"]), (
            section
        )
    assert within(shipped["trainer"], config_resolved["trainer"])


@pytest.mark.parametrize("config", REAL_USE, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_real_use_configs_keep_the_papers_global_batch_and_name_real_layers(config, capsys):
    import importlib

    config_resolved = resolved(capsys, "--config", str(config))
    trainer, model, data = (
        config_resolved["trainer"],
        config_resolved["model"]["init_args"],
        config_resolved["data"]["init_args"],
    )
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == 128
    assert data["truncation"]["max_length"] == 2048 and model["loss"]["name"] == "simpo"
    strategy = trainer["strategy"]
    if config.stem.startswith("fsdp"):
        assert strategy["class_path"].endswith("FSDPStrategy") and model["lora"] is None
        assert trainer["num_nodes"] == (2 if config.stem == "fsdp-2node" else 1) and trainer["devices"] == 8
        for path in (
            strategy["init_args"]["auto_wrap_policy"] + strategy["init_args"]["activation_checkpointing_policy"]
        ):
            module, _, name = path.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type)
    else:
        assert strategy == "auto" and model["lora"] is not None and trainer["devices"] == 1
        assert (model["policy"]["quantization"] is not None) == config.stem.startswith("qlora")


def test_cli_overrides_the_yaml_and_plain_sections_are_the_default_classes(capsys):
    config = resolved(
        capsys, "--config", str(ROOT / "configs/tiny.yaml"), "--model.loss.beta", "7.5", "--data.batch_size", "3"
    )
    assert config["model"]["class_path"].endswith("SimPOModule") and config["data"]["class_path"].endswith(
        "PreferenceDataModule"
    )
    assert config["model"]["init_args"]["loss"]["beta"] == 7.5 and config["data"]["init_args"]["batch_size"] == 3


def test_null_given_to_a_nested_field_on_the_command_line_is_null(capsys):
    """jsonargparse alone would read ``--model.policy.name_or_path null`` as the string 'None' (cli.nulls_as_dicts)."""
    config = resolved(
        capsys,
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--model.loss.gamma_beta_ratio",
        "null",
        "--model.init_args.policy.name_or_path=null",
        "--data.truncation.max_prompt_length",
        "null",
    )
    model = config["model"]["init_args"]
    assert model["loss"]["gamma_beta_ratio"] is None and model["loss"]["beta"] == 2.0
    assert model["policy"]["name_or_path"] is None and model["policy"]["dtype"] == "float32"
    assert config["data"]["init_args"]["truncation"] == {
        "max_length": 512,
        "max_prompt_length": None,
        "mode": "keep_end",
    }


def test_the_hh_config_asks_for_its_data_file(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(ROOT / "configs/hh-rlhf.yaml")])
    assert exit.value.code == 2 and "data.train_data is required" in capsys.readouterr().err


def test_the_command_lists_every_command_and_each_takes_a_config(tmp_path, capsys):
    main(["--help"])
    overview = capsys.readouterr().out
    assert "fit, validate, test, predict" in overview and all(name in overview for name in COMMANDS)
    (tmp_path / "export.yaml").write_text(f"ckpt_path: {tmp_path}/none.ckpt\noutput_dir: {tmp_path}/out\n")
    with pytest.raises(SystemExit) as exit:
        main(["export", "--config", str(tmp_path / "export.yaml")])  # the options came from the file
    assert exit.value.code == 2 and f"{tmp_path}/none.ckpt: no such checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_validate_test_end_to_end(tmp_path, capsys, monkeypatch):
    config = str(ROOT / "configs/tiny.yaml")
    monkeypatch.chdir(tmp_path)
    fit = run_command(
        ["fit", "--config", config, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"], tmp_path
    )
    assert "held-out before training" in fit.stdout and "held-out after training" in fit.stdout
    run_dir = tmp_path / "runs/tiny/version_0"
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # resolved config beside the checkpoints
    assert saved["trainer"]["max_steps"] == 4 and saved["model"]["init_args"]["policy"]["random_init"] is True

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    for name in (
        "train/loss",
        "train/rewards/accuracies",
        "train/rewards/margins",
        "train/logps/chosen",
        "train/logits/rejected",
        "train/tokens_per_sec",
        "train/lengths/chosen",
        "val/rewards/accuracies",
        "heldout/before/rewards/accuracies",
        "heldout/after/exact_match",
    ):
        assert name in rows[0], name
    assert sum(1 for r in rows if r["train/loss"]) == 4

    (wandb_file,) = (tmp_path / "runs/wandb").glob("offline-run-*/run-*.wandb")
    history, wandb_config = wandb_history(wandb_file)
    for name in ("heldout/before/exact_match", "heldout/after/rewards/accuracies", "train/rewards/chosen", "val/loss"):
        assert isinstance(history[name], (int, float)), name
    assert isinstance(history["diagnostics/margin_length_correlation"], float)  # PreferenceDiagnostics
    assert (
        history["diagnostics/margin_vs_length/_type"] == "images/separated"
        and (run_dir / "margin_vs_length.png").is_file()
    )
    assert wandb_config["model"]["init_args"]["loss"]["beta"] == 2.0 and wandb_config["trainer"]["max_steps"] == 4

    checkpoint = str(run_dir / "checkpoints/last.ckpt")
    for subcommand, prefix in (("validate", "val"), ("test", "test")):  # the same entry point, in this process
        main([subcommand, "--config", config, "--ckpt_path", checkpoint, "--trainer.logger", "false"])
        assert f"{prefix}/rewards/accuracies" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_method_fits_through_the_command(name, tiny_dir, tmp_path):
    method = ["--model.loss.name", name, "--model.loss.gamma_beta_ratio", "null", "--model.loss.beta", "null"]
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "3"]
    report = ["--trainer.callbacks", '[{"class_path": "simpo_lightning.callbacks.HeldOutReport"}]']
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path, *method, *steps, *report)])
    rows = list(csv.DictReader((tmp_path / "run/version_0/metrics.csv").open()))
    last = {k: float(v) for r in rows for k, v in r.items() if v}
    wanted = ["train/loss", "train/rewards/chosen", "train/step_seconds", "val/loss", "val/rewards/accuracies"]
    for key in [*wanted, "heldout/after/rewards/accuracies"]:
        assert key in last and last[key] == last[key], key
    assert ("train/kl" in last) == (name == "kto")


def test_a_module_other_than_simpo_runs_from_its_yaml(tiny_dir, tmp_path):
    """configs/sft.yaml names SFTModule by class_path: it trains on the chosen responses only."""
    steps = ["--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"]
    validation = ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2"]
    cli = cli_main(["fit", *tiny_args(tiny_dir, tmp_path, *steps, *validation, config="sft.yaml")])
    assert type(cli.model).__name__ == "SFTModule" and any("lora_" in k for k in cli.model.state_dict())
    losses = csv_losses(tmp_path / "run/version_0/metrics.csv")
    assert len(losses) == 3 and losses[2] < losses[0]  # the chosen responses become likelier
    assert "val/rewards/accuracies" in cli.trainer.callback_metrics


def test_resume_after_interruption_continues_the_same_loss_curve(tiny_dir, tmp_path):
    """Across an epoch boundary too: the demo's 298 training pairs are 38 batches of 8. Resuming is
    the same arithmetic, so the same losses exactly."""
    steps = ["--trainer.max_steps", "40", "--trainer.log_every_n_steps", "1", "--data.batch_size", "8"]
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "straight", *steps)])
    straight = csv_losses(tmp_path / "straight/run/version_0/metrics.csv")
    assert len(straight) == 40

    interrupted = tmp_path / "interrupted"
    interrupt = {"class_path": "helpers.Interrupt", "init_args": {"step": 17}}
    with pytest.raises(SystemExit):  # Lightning turns the interruption into an exit after its teardown
        cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--trainer.callbacks+", json.dumps(interrupt)])
    # Lightning runs checkpoint callbacks last, so the newest checkpoint is from the step before.
    saved = torch.load(interrupted / "run/version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 16
    cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--ckpt_path", "last"])
    resumed = csv_losses(interrupted / "run/version_1/metrics.csv")
    assert sorted(resumed) == list(range(16, 40))
    assert all(resumed[step] == straight[step] for step in resumed)


SIMPO_LORA, DPO_FULL = ("tiny.yaml", []), ("dpo.yaml", ["--model.lora", "null"])  # DPO: a sharded frozen reference


@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [SIMPO_LORA, DPO_FULL], ids=["simpo-lora", "dpo-full"])
def test_two_process_fsdp2_gives_the_one_process_loss_curve(tiny_dir, tmp_path, config, extra):
    """ModelParallelStrategy (FSDP2, gloo on CPU), 2 processes × 2 pairs against 1 process × 4 pairs. FSDP
    trains in float32, so its curve is held to the float32 rule around the one-process run in float64.
    DPO's two processes precompute the reference log-probs (each half the batches, through the sharded
    frozen copy) where the one process computes them at every step; one of them writes each cache file."""
    quiet = ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]
    steps = ["--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1"]
    common = tiny_args(tiny_dir, tmp_path, *extra, *steps, *quiet, config=config)
    run_command(["fit", *common, "--data.batch_size", "4", "--model.policy.dtype", "float64"], tmp_path)
    precompute = ["--model.reference.precompute", "true", "--data.cache_dir", str(tmp_path / "cache")]
    # The two-process LoRA run also generates with GenerationMonitor before training: in lockstep (synced_gpus).
    monitor = {"class_path": "simpo_lightning.monitor.GenerationMonitor", "init_args": {"max_new_tokens": 4}}
    extra_two = precompute if config == "dpo.yaml" else ["--trainer.callbacks", json.dumps([monitor])]
    run_command(["fit", *common, "--data.batch_size", "2", *TWO_PROCESSES, *extra_two], tmp_path)
    if config == "dpo.yaml":  # training and validation pairs (test is the validation set)
        assert len(list((tmp_path / "cache").glob("ref-*.pt"))) == 2 and not list((tmp_path / "cache").glob("*.tmp-*"))
    one, two = csv_losses(tmp_path / "run/version_0/metrics.csv"), csv_losses(tmp_path / "run/version_1/metrics.csv")
    if config == "tiny.yaml":
        assert "monitor/mean_chars" in (tmp_path / "run/version_1/metrics.csv").read_text()
    assert sorted(one) == sorted(two) == list(range(5))
    assert len(set(one.values())) == 5  # the loss moves, so equal curves mean equal training
    for step in one:
        assert_rounding_close(two[step], one[step], reduction=VOCAB, what=f"step {step}")


@pytest.mark.slow
def test_two_process_fsdp2_resume_continues_the_same_loss_curve(tiny_dir, tmp_path):
    steps = ["--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", "--data.batch_size", "2"]
    common = tiny_args(tiny_dir, tmp_path, *steps, *TWO_PROCESSES)
    run_command(["fit", *common, "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"], tmp_path)
    interrupt = {"class_path": "helpers.Interrupt", "init_args": {"step": 4}}
    callbacks = json.dumps([EVERY_STEP_CHECKPOINT, interrupt])
    tests = str(ROOT / "tests")
    interrupted = run_command(
        ["fit", *common, "--trainer.callbacks", callbacks], tmp_path, check=False, PYTHONPATH=tests
    )
    assert interrupted.returncode != 0
    assert (tmp_path / "run/version_1/checkpoints/last.ckpt").is_dir()  # sharded: a folder
    run_command(["fit", *common, "--ckpt_path", "last"], tmp_path)  # tiny_args checkpoints every step
    straight = csv_losses(tmp_path / "run/version_0/metrics.csv")
    resumed = csv_losses(tmp_path / "run/version_2/metrics.csv")
    assert sorted(resumed) == [3, 4, 5]
    assert all(resumed[step] == straight[step] for step in resumed)  # the same arithmetic: the same losses
