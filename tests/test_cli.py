"""The shipped configs and the real `simpo-lightning` command: fit, validate, test, resume, several
processes, the registered commands, and a module other than SimPOModule chosen in the YAML."""

import csv
import json

import pytest
import torch
import yaml

from simpo_lightning.cli import COMMANDS, cli_main, main

from helpers import (
    EVERY_STEP_CHECKPOINT,
    ROOT,
    TESTS,
    TWO_PROCESSES,
    assert_rounding_close,
    csv_losses,
    run_command,
    tiny_args,
    wandb_history,
    write_jsonl,
)

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
KINDS = {"configs", "methods", "online", "commands", "datasets", "testing", "variants"}  # the rest: configs/<model>/
REAL_USE = [c for c in CONFIGS if c.parent.name not in KINDS]
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
        capsys,
        "--config",
        str(ROOT / "configs/testing/tiny.yaml"),
        "--model.loss.beta",
        "7.5",
        "--data.batch_size",
        "3",
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
        main(["fit", "--config", str(ROOT / "configs/datasets/hh-rlhf.yaml")])
    assert exit.value.code == 2 and "data.train_data is required" in capsys.readouterr().err


COMMAND_NAMES = ["fit", "validate", "test", "estimate", "evaluate", "inspect", "export", "generate", "pairs", "rounds"]


def test_the_overview_lists_every_command_and_each_one_answers_help(capsys):
    main(["--help"])
    overview = capsys.readouterr().out
    trainer_line, *others = [line for line in overview.splitlines() if line.startswith("  ")]
    listed = [name.strip() for name in trainer_line.split(",")] + [line.split()[0] for line in others]
    assert sorted(listed) == sorted(COMMAND_NAMES)
    assert "predict" not in overview  # nothing implements it: generate answers prompts
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        assert exit.value.code == 0 and f"usage: simpo-lightning {name}" in capsys.readouterr().out


# Each registered command with an options file, and what its error must say: proof the file's values arrived.
CONFIG_FILE_CASES = [
    ("export", "ckpt_path: {tmp}/none.ckpt\noutput_dir: {tmp}/out\n", "{tmp}/none.ckpt: no such checkpoint"),
    ("generate", "prompts: demo\noutput: {tmp}/g.jsonl\nmodel: {tmp}/m\n", "--model {tmp}/m: no such checkpoint"),
    (
        "pairs",
        "generations: {tmp}/g.jsonl\noutput: {tmp}/p.jsonl\njudge: RuleJudge\n",
        "{tmp}/g.jsonl: no generations",
    ),
    ("rounds", "fit_config: {tmp}/fit.yaml\n", "fit_config {tmp}/fit.yaml: no such file"),
    ("evaluate", "candidates: [{tmp}/c.ckpt]\n", "{tmp}/c.ckpt: no such checkpoint or model folder"),
    # estimate's and inspect's --config is the fit config they read
    ("estimate", "model:\n  policy:\n    name_or_path: {tmp}/m\n", "{tmp}/m: its config cannot be read here"),
    ("inspect", "data:\n  train_data: {tmp}/none.jsonl\n", "no such file {tmp}/none.jsonl"),
]


@pytest.mark.parametrize("name, yaml_text, said", CONFIG_FILE_CASES)
def test_each_registered_command_takes_its_options_from_a_config_file(name, yaml_text, said, tmp_path, capsys):
    """Each option in the file reached the command: its error names the file's value."""
    assert name in COMMANDS
    (tmp_path / "options.yaml").write_text(yaml_text.format(tmp=tmp_path))
    with pytest.raises(SystemExit) as exit:
        main([name, "--config", str(tmp_path / "options.yaml")])
    assert exit.value.code == 2 and said.format(tmp=tmp_path) in capsys.readouterr().err


def test_every_registered_command_has_a_config_file_case():
    assert sorted(name for name, _, _ in CONFIG_FILE_CASES) == sorted(COMMANDS)


@pytest.mark.slow
def test_fit_validate_test_end_to_end(tmp_path, capsys, monkeypatch):
    config = str(ROOT / "configs/testing/tiny.yaml")
    monkeypatch.chdir(tmp_path)
    fit = run_command(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--estimate",
            "true",
        ],
        tmp_path,
    )
    assert "held-out before training" in fit.stdout and "held-out after training" in fit.stdout
    assert "estimate: predicted peak" in fit.stdout and "no GPU here to compare with" in fit.stdout
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


def test_a_module_other_than_simpo_runs_from_its_yaml(tiny_dir, tmp_path):
    """configs/methods/sft.yaml names SFTModule by class_path: it trains on the chosen responses only."""
    steps = ["--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"]
    validation = ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2"]
    cli = cli_main(["fit", *tiny_args(tiny_dir, tmp_path, *steps, *validation, config="methods/sft.yaml")])
    assert type(cli.model).__name__ == "SFTModule" and any("lora_" in k for k in cli.model.state_dict())
    losses = csv_losses(tmp_path / "run/version_0/metrics.csv")
    assert len(losses) == 3 and losses[2] < losses[0]  # the chosen responses become likelier
    assert "val/rewards/accuracies" in cli.trainer.callback_metrics


def test_resume_after_interruption_continues_the_same_loss_curve(tiny_dir, tmp_path):
    """Mid-epoch and across an epoch boundary: 20 pairs, 2 of them held out, are 3 batches of 8 (the last of 2)
    an epoch; the run interrupted in its second step resumes from the checkpoint of step 0, skips the batch it
    trained on, and goes on into the second epoch. Resuming is the same arithmetic, so the same losses exactly."""
    rows = [
        {"prompt": f"Question {i}:" + " word" * (i % 5), "chosen": f" yes {i}", "rejected": " no"} for i in range(20)
    ]
    data = ["--data.train_data", str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "--data.batch_size", "8"]
    steps = ["--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", *data]
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "straight", *steps)])
    straight = csv_losses(tmp_path / "straight/run/version_0/metrics.csv")
    assert len(straight) == 6

    interrupted = tmp_path / "interrupted"
    interrupt = {"class_path": "helpers.Interrupt", "init_args": {"step": 2}}
    with pytest.raises(SystemExit):  # Lightning turns the interruption into an exit after its teardown
        cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--trainer.callbacks+", json.dumps(interrupt)])
    # Lightning runs checkpoint callbacks last, so the newest checkpoint is from the step before.
    saved = torch.load(interrupted / "run/version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and saved["epoch"] == 0
    cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--ckpt_path", "last"])
    resumed = csv_losses(interrupted / "run/version_1/metrics.csv")
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert all(resumed[step] == straight[step] for step in resumed)


SIMPO_LORA, DPO_FULL = (
    ("testing/tiny.yaml", []),
    ("methods/dpo.yaml", ["--model.lora", "null"]),
)  # DPO: a sharded frozen reference


@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [SIMPO_LORA, DPO_FULL], ids=["simpo-lora-interrupted", "dpo-full"])
def test_two_process_fsdp2_gives_the_one_process_loss_curve(tiny_dir, tmp_path, config, extra):
    """ModelParallelStrategy (FSDP2, gloo on CPU), 2 processes × 2 pairs against 1 process × 4 pairs. FSDP
    trains in float32, so its curve is held to the float32 rule around the one-process run in float64.

    SimPO LoRA: the two processes are interrupted after step 3 (a sharded checkpoint every step) and resumed
    with ``--ckpt_path last``; the interrupted run and the resumed one together must give the one-process
    curve, so resuming restores weights, optimizer, schedule and data order. DPO: the two processes
    precompute the reference log-probs (each half the batches, through the sharded frozen copy) where the
    one process computes them at every step; one of them writes each cache file. The two processes start as
    torchrun starts them (``run_command(ranks=2)``); Lightning's own launcher starts those of
    tests/test_errors.py."""
    quiet = ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]
    steps = ["--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1"]
    common = tiny_args(tiny_dir, tmp_path, *extra, *steps, config=config)
    one_process = cli_main(["fit", *common, *quiet, "--data.batch_size", "4", "--model.policy.dtype", "float64"])
    one = csv_losses(tmp_path / "run/version_0/metrics.csv")
    two_processes = [*common, "--data.batch_size", "2", *TWO_PROCESSES]
    if config == "methods/dpo.yaml":
        precompute = ["--model.reference.precompute", "true", "--data.cache_dir", str(tmp_path / "cache")]
        run_command(["fit", *two_processes, *quiet, *precompute], tmp_path, ranks=2)
        assert len(list((tmp_path / "cache").glob("ref-*.pt"))) == 2 and not list((tmp_path / "cache").glob("*.tmp-*"))
        two = csv_losses(tmp_path / "run/version_1/metrics.csv")
    else:
        # The interrupted run also generates with GenerationMonitor before training: in lockstep (synced_gpus).
        monitor = {"class_path": "simpo_lightning.callbacks.GenerationMonitor", "init_args": {"max_new_tokens": 4}}
        interrupt = {"class_path": "helpers.Interrupt", "init_args": {"step": 3}}
        callbacks = json.dumps([EVERY_STEP_CHECKPOINT, interrupt, monitor])
        interrupted = run_command(
            ["fit", *two_processes, "--trainer.callbacks", callbacks],
            tmp_path,
            check=False,
            ranks=2,
            PYTHONPATH=str(TESTS),
        )
        assert interrupted.returncode != 0 and "Detected KeyboardInterrupt" in interrupted.stderr
        assert (tmp_path / "run/version_1/checkpoints/last.ckpt").is_dir()  # sharded: a folder
        assert "monitor/mean_chars" in (tmp_path / "run/version_1/metrics.csv").read_text()
        run_command(["fit", *two_processes, "--ckpt_path", "last"], tmp_path, ranks=2)
        resumed = csv_losses(tmp_path / "run/version_2/metrics.csv")
        assert sorted(resumed) == [2, 3, 4]  # from the checkpoint of step 2 (checkpoints are saved after callbacks)
        two = csv_losses(tmp_path / "run/version_1/metrics.csv") | resumed
    assert sorted(one) == sorted(two) == list(range(5))
    assert len(set(one.values())) == 5  # the loss moves, so equal curves mean equal training
    for step in one:
        assert_rounding_close(two[step], one[step], reduction=VOCAB, what=f"step {step}")
    if config == "testing/tiny.yaml":  # the sharded checkpoint folder exports as a standalone model
        from transformers import AutoModelForCausalLM

        out = str(tmp_path / "exported")
        main(["export", "--ckpt_path", str(tmp_path / "run/version_2/checkpoints/last.ckpt"), "--output_dir", out])
        ids = torch.tensor([one_process.model.tokenizer("Capital of France? Paris.").input_ids])
        with torch.no_grad():
            exported = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
            trained = one_process.model.model.eval()(input_ids=ids).logits
            base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()(input_ids=ids).logits
        assert_rounding_close(exported, trained, reduction=VOCAB, what="exported logits")
        assert (base - trained).abs().max() > 1e-3  # training moved them


# SimPO on rows of up to 160 tokens of pairs of 50 to 67: 2 or 3 pairs a row, so the processes' batches hold
# different numbers of pairs (3 and 2 at step 2, 2 and 3 at step 3).
PACKED = ("testing/tiny.yaml", ["--data.max_tokens_per_row", "160"])


@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [PACKED, DPO_FULL], ids=["simpo-lora-packed", "dpo-full"])
def test_two_process_ddp_gives_the_one_process_losses_and_gradients(tiny_dir, tmp_path, config, extra):
    """DDP (Lightning's strategy for several devices), 2 processes × 2 pairs (packed: rows) against 1 process × 4:
    the same loss and the same gradient norm at every step; SimPO with LoRA on packed rows, DPO fine-tuning every
    weight on pairs. The chunked head calls the decoder and the output head
    directly, outside the module's own forward, and DDP still averages their gradients (a process's own half
    batch would give another norm); packed, the loss stays the mean over the global batch's pairs. Both runs in
    float64, held to the float32 rule (Llama computes its norms in float32). (FSDPStrategy refuses the CPU;
    ModelParallelStrategy's FSDP2 is the test above.) Started as torchrun starts them, as above."""
    gradients = json.dumps([{"class_path": "helpers.LogGradientNorm"}])
    quiet = ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", gradients]
    steps = ["--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--model.policy.dtype", "float64"]
    common = tiny_args(tiny_dir, tmp_path, *extra, *steps, *quiet, config=config)
    rows = "--data.max_tokens_per_row" in extra
    cli_main(["fit", *common, "--data.batch_size", "2" if rows else "4"])
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    run_command(
        ["fit", *common, "--data.batch_size", "1" if rows else "2", *ddp], tmp_path, ranks=2, PYTHONPATH=str(TESTS)
    )
    for key in ("train/loss", "train/grad_norm"):
        one, two = (csv_losses(tmp_path / f"run/version_{v}/metrics.csv", key) for v in (0, 1))
        assert sorted(one) == sorted(two) == list(range(4)) and len(set(one.values())) == 4, key
        for step in one:
            assert_rounding_close(two[step], one[step], reduction=VOCAB, what=f"{key} at step {step}")
