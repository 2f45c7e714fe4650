"""The shipped configs and the real `simpo-lightning` command."""

import csv

import pytest
import yaml

from simpo_lightning.cli import cli_main, main

from conftest import ROOT, run_command as run, wandb_history

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
REAL_USE = [c for c in CONFIGS if c.parent.name != "configs"]  # configs/<model>/<setup>.yaml


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses(config, capsys):
    """Parsing validates every key against the code's signatures, so configs cannot drift."""
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# simpo-lightning "), "every config starts with the command that runs it"
    with pytest.raises(SystemExit) as exit:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(config.read_text())
    assert resolved["model"]["loss"] == {**resolved["model"]["loss"], **shipped["model"]["loss"]}
    assert resolved["data"]["train_data"] == shipped["data"]["train_data"]


@pytest.mark.parametrize("config", REAL_USE, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_real_use_configs_keep_the_papers_global_batch_and_name_real_layers(config, capsys):
    import importlib

    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = resolved["trainer"], resolved["model"], resolved["data"]
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == 128
    assert data["truncation"]["max_length"] == 2048 and model["loss"]["name"] == "simpo"
    assert f"--config configs/{config.relative_to(ROOT / 'configs')}" in config.read_text().splitlines()[0]
    strategy = trainer["strategy"]
    if config.stem.startswith("fsdp"):
        assert strategy["class_path"].endswith("FSDPStrategy") and model["lora"] is None
        assert trainer["num_nodes"] == (2 if config.stem == "fsdp-2node" else 1) and trainer["devices"] == 8
        for path in strategy["init_args"]["auto_wrap_policy"] + strategy["init_args"]["activation_checkpointing_policy"]:
            module, _, name = path.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type)
    else:
        assert strategy == "auto" and model["lora"] is not None and trainer["devices"] == 1
        assert (model["policy"]["quantization"] is not None) == config.stem.startswith("qlora")


def test_cli_overrides_the_yaml(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.loss.beta", "7.5",
                  "--data.batch_size", "3", "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["loss"]["beta"] == 7.5 and resolved["data"]["batch_size"] == 3


@pytest.mark.slow
def test_fit_validate_test_end_to_end(tmp_path, capsys, monkeypatch):
    config = str(ROOT / "configs/tiny.yaml")
    monkeypatch.chdir(tmp_path)
    fit = run(["fit", "--config", config, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"], tmp_path)
    assert "held-out before training" in fit.stdout and "held-out after training" in fit.stdout
    run_dir = tmp_path / "runs/tiny/version_0"
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # resolved config beside the checkpoints
    assert saved["trainer"]["max_steps"] == 4 and saved["model"]["policy"]["random_init"] is True

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    columns = set(rows[0])
    for name in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen",
                 "train/logits/rejected", "train/tokens_per_sec", "train/lengths/chosen", "val/rewards/accuracies",
                 "heldout/before/rewards/accuracies", "heldout/after/exact_match"):
        assert name in columns, name
    assert sum(1 for r in rows if r["train/loss"]) == 4

    (wandb_file,) = (tmp_path / "runs/wandb").glob("offline-run-*/run-*.wandb")
    history, wandb_config = wandb_history(wandb_file)
    for name in ("heldout/before/exact_match", "heldout/after/rewards/accuracies", "train/rewards/chosen", "val/loss"):
        assert isinstance(history[name], (int, float)), name
    assert wandb_config["model"]["loss"]["beta"] == 2.0 and wandb_config["trainer"]["max_steps"] == 4  # the resolved config

    checkpoint = str(run_dir / "checkpoints/last.ckpt")
    for subcommand, prefix in (("validate", "val"), ("test", "test")):  # the same entry point, in this process
        main([subcommand, "--config", config, "--ckpt_path", checkpoint, "--trainer.logger", "false"])
        assert f"{prefix}/rewards/accuracies" in capsys.readouterr().out
