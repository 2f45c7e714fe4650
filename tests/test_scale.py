"""Scaling features on CPU: exact resume, quantized loading, sharded (FSDP2) training, export."""

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from simpo_lightning.cli import cli_main

from conftest import ROOT, run_command
from helpers import assert_rounding_close

VOCAB = 49152  # SmolLM2's: the longest reduction of a step


class Interrupt(Callback):
    """Stops a run with an exception after ``step`` optimizer steps, as a crash or a kill would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt("interrupted for the test")


def tiny_args(tiny_dir: str, save_dir: Path, *extra: str, config: str = "tiny.yaml") -> list[str]:
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir), "name": "run"}}
    return ["--config", str(ROOT / "configs" / config), "--model.policy.name_or_path", tiny_dir,
            "--model.policy.random_init", "false", "--model.policy.config_overrides", "{}",
            "--trainer.logger", json.dumps(logger), "--trainer.callbacks", json.dumps([checkpoint]),
            "--trainer.limit_val_batches", "0", "--data.cache_dir", "null", *extra]


def losses(metrics: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")}


def test_resume_after_interruption_continues_the_same_loss_curve(tiny_dir, tmp_path):
    """Across an epoch boundary too: the demo's 140 training pairs are 35 batches of 4."""
    steps = ["--trainer.max_steps", "40", "--trainer.log_every_n_steps", "1"]
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "straight", *steps)])
    straight = losses(tmp_path / "straight/run/version_0/metrics.csv")
    assert len(straight) == 40

    interrupted = tmp_path / "interrupted"
    interrupt = {"class_path": "test_scale.Interrupt", "init_args": {"step": 17}}
    with pytest.raises(SystemExit):  # Lightning turns the interruption into an exit after its teardown
        cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--trainer.callbacks+", json.dumps(interrupt)])
    # Lightning runs checkpoint callbacks last, so the newest checkpoint is from the step before.
    saved = torch.load(interrupted / "run/version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 16
    cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--ckpt_path", "last"])
    resumed = losses(interrupted / "run/version_1/metrics.csv")
    assert sorted(resumed) == list(range(16, 40))
    for step, value in resumed.items():
        assert value == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [("tiny.yaml", []),  # SimPO with LoRA
                                           ("dpo.yaml", ["--model.lora", "null"])],  # full weights, sharded frozen reference
                         ids=["simpo-lora", "dpo-full"])
def test_two_process_fsdp2_gives_the_one_process_loss_curve(tiny_dir, tmp_path, config, extra):
    """ModelParallelStrategy (FSDP2, gloo on CPU), 2 processes × 2 pairs against 1 process × 4 pairs. FSDP
    trains in float32, so its curve is held to the float32 rule around the one-process run in float64."""
    common = tiny_args(tiny_dir, tmp_path, *extra, "--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1",
                       "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", config=config)
    run_command(["fit", *common, "--data.batch_size", "4", "--model.policy.dtype", "float64"], tmp_path)
    strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}
    run_command(["fit", *common, "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", json.dumps(strategy)], tmp_path)
    one, two = losses(tmp_path / "run/version_0/metrics.csv"), losses(tmp_path / "run/version_1/metrics.csv")
    assert sorted(one) == sorted(two) == list(range(5))
    assert len(set(one.values())) == 5  # the loss moves, so equal curves mean equal training
    for step in one:
        assert_rounding_close(two[step], one[step], reduction=VOCAB, what=f"step {step}")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_lora_trains_and_checkpoints_only_adapters(tiny_dir, tmp_path, bits):
    import bitsandbytes as bnb

    steps = ["--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"]
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "float", *steps)])
    quantization = {"bits": bits, "compute_dtype": "float32"}
    cli = cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "quant", *steps), "--model.policy.quantization", json.dumps(quantization)])
    base = cli.model.model.get_base_model()
    layer = base.model.layers[0].mlp.up_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    float_losses, quant_losses = losses(tmp_path / "float/run/version_0/metrics.csv"), losses(tmp_path / "quant/run/version_0/metrics.csv")
    # Same model and batches; only the quantization error of the base weights separates them.
    assert quant_losses[0] == pytest.approx(float_losses[0], rel=0.02) and quant_losses[0] != float_losses[0]
    assert len(set(quant_losses.values())) == 3
    saved = torch.load(tmp_path / "quant/run/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert saved and all("lora_" in key for key in saved)


def test_quantization_errors_are_clear(tiny_dir, tmp_path):
    from simpo_lightning.model import LoraConfig, PolicyConfig, QuantizationConfig, build_policy

    with pytest.raises(ValueError, match="needs LoRA"):
        build_policy(PolicyConfig(name_or_path=tiny_dir, quantization=QuantizationConfig()), None)
    with pytest.raises(ValueError, match="random_init"):
        build_policy(PolicyConfig(name_or_path=tiny_dir, random_init=True, quantization=QuantizationConfig()), LoraConfig())


def export_cli(tmp_path: Path, *args: str) -> None:
    run_command(["export", *args], tmp_path)


def assert_same_logits(model, reference_model, ids: torch.Tensor) -> None:
    """``model`` computes the logits of ``reference_model`` (e.g. LoRA merged against unmerged): both in float32
    against ``reference_model`` in float64, by the rounding rule (K: the tiny model's widest product, 128)."""
    with torch.no_grad():
        exact = copy.deepcopy(reference_model).double().eval()(input_ids=ids).logits
        for name, m in (("model", model), ("reference model", reference_model)):
            assert_rounding_close(m.eval()(input_ids=ids).logits, exact, reduction=128, what=name)


@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [("tiny.yaml", []), ("dpo.yaml", ["--model.lora", "null"])], ids=["lora", "full"])
def test_export_writes_a_standalone_model_with_the_trained_weights(tiny_dir, tmp_path, config, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli = cli_main(["fit", *tiny_args(tiny_dir, tmp_path, *extra, "--trainer.max_steps", "4", config=config)])
    checkpoint = tmp_path / "run/version_0/checkpoints/last.ckpt"
    export_cli(tmp_path, "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "out"))
    assert (tmp_path / "out/model.safetensors").is_file() and not list((tmp_path / "out").glob("adapter_*"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template and tokenizer("hi").input_ids == cli.model.tokenizer("hi").input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Capital of France?"}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text).input_ids])
    trained = cli.model.model.eval()
    assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), trained, ids)
    with torch.no_grad():
        moved = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()(input_ids=ids).logits - trained(input_ids=ids).logits
    assert moved.abs().max() > 1e-3  # training moved the weights, and the export carries that
    if config == "tiny.yaml":
        import peft

        export_cli(tmp_path, "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "adapter"), "--adapter_only", "true")
        adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
        assert_same_logits(adapted, trained, ids)


@pytest.mark.slow
def test_export_of_the_gguf_default_model_generates_the_trained_text(tmp_path):
    """SmolLM2 from its GGUF wheel, which transformers marks as quantized and refuses to save as is."""
    from simpo_lightning.callbacks import greedy_answers
    from transformers import AutoModelForCausalLM

    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "run"}}
    cli = cli_main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "2",
                    "--trainer.logger", json.dumps(logger), "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}]),
                    "--trainer.limit_val_batches", "0", "--data.batch_size", "2", "--data.cache_dir", "null",
                    "--model.optimizer.init_args.lr", "3e-3"])
    export_cli(tmp_path, "--ckpt_path", str(tmp_path / "run/version_0/checkpoints/last.ckpt"), "--output_dir", str(tmp_path / "out"))
    prompts = [p for p, _ in cli.datamodule.generation_examples()[:4]]
    tokenizer = cli.model.tokenizer
    trained = greedy_answers(cli.model.model.eval(), tokenizer, prompts, max_new_tokens=12, batch_size=4, device="cpu")
    exported = greedy_answers(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), tokenizer, prompts, 12, 4, "cpu")
    assert exported == trained and any(trained)


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--cpu", "--steps", "1", "--batch_size", "2"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line.endswith("| ok |")]
    assert [row.split(" | ")[0][2:] for row in rows] == ["lora", "qlora-8bit", "qlora-4bit", "fsdp-1-device-full"]


@pytest.mark.slow
def test_two_process_fsdp2_resume_continues_the_same_loss_curve(tiny_dir, tmp_path):
    strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}
    common = tiny_args(tiny_dir, tmp_path, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", "--data.batch_size", "2",
                       "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", json.dumps(strategy))
    run_command(["fit", *common, "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"], tmp_path)
    interrupt = {"class_path": "test_scale.Interrupt", "init_args": {"step": 4}}
    interrupted = run_command(["fit", *common, "--trainer.callbacks", json.dumps([checkpoint, interrupt])], tmp_path,
                              check=False, PYTHONPATH=str(ROOT / "tests"))
    assert interrupted.returncode != 0 and (tmp_path / "run/version_1/checkpoints/last.ckpt").is_dir()  # sharded: a folder
    run_command(["fit", *common, "--trainer.callbacks", json.dumps([checkpoint]), "--ckpt_path", "last"], tmp_path)
    straight, resumed = losses(tmp_path / "run/version_0/metrics.csv"), losses(tmp_path / "run/version_2/metrics.csv")
    assert sorted(resumed) == [3, 4, 5]
    for step, value in resumed.items():
        assert value == pytest.approx(straight[step], rel=1e-6), step
