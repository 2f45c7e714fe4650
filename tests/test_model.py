"""Loading models and tokenizers: the GGUF default through its cached float copy, quantized LoRA,
clear errors, and the bfloat16 check."""

import json
import os
import subprocess
import sys

import pytest
import torch

from simpo_lightning.cli import cli_main
from simpo_lightning.model import (
    LoraConfig,
    PolicyConfig,
    QuantizationConfig,
    build_policy,
    fast_bf16,
    load_tokenizer,
    model_folder,
)

from helpers import csv_losses, tiny_args


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_lora_trains_and_checkpoints_only_adapters(tiny_dir, tmp_path, bits):
    import bitsandbytes as bnb

    steps = ["--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"]
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "float", *steps)])
    quantization = {"bits": bits, "compute_dtype": "float32"}
    cli = cli_main(
        [
            "fit",
            *tiny_args(tiny_dir, tmp_path / "quant", *steps),
            "--model.policy.quantization",
            json.dumps(quantization),
        ]
    )
    layer = cli.model.model.get_base_model().model.layers[0].mlp.up_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    float_losses = csv_losses(tmp_path / "float/run/version_0/metrics.csv")
    quant_losses = csv_losses(tmp_path / "quant/run/version_0/metrics.csv")
    # Same model and batches; only the quantization error of the base weights separates them.
    assert quant_losses[0] == pytest.approx(float_losses[0], rel=0.02) and quant_losses[0] != float_losses[0]
    assert len(set(quant_losses.values())) == 3
    saved = torch.load(tmp_path / "quant/run/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert saved and all("lora_" in key for key in saved)


def test_quantization_errors_are_clear(tiny_dir):
    with pytest.raises(ValueError, match="needs LoRA"):
        build_policy(PolicyConfig(name_or_path=tiny_dir, quantization=QuantizationConfig()), None)
    with pytest.raises(ValueError, match="random_init"):
        build_policy(
            PolicyConfig(name_or_path=tiny_dir, random_init=True, quantization=QuantizationConfig()), LoraConfig()
        )


def test_tokenizer_without_pad_token_uses_eos(tokenizer, tmp_path):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(PolicyConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_the_gguf_default_loads_from_its_cached_float_copy():
    """The built-in model's folder is the float copy: an ordinary transformers folder, built once."""
    folder = model_folder(PolicyConfig())
    assert os.path.isfile(os.path.join(folder, "config.json")) and model_folder(PolicyConfig()) == folder
    tokenizer = load_tokenizer(PolicyConfig())
    assert tokenizer.name_or_path == folder and tokenizer.chat_template


def test_bf16_counts_as_fast_only_where_the_cpu_may_use_bf16_units():
    """ATEN_CPU_CAPABILITY=avx2 (with oneDNN capped likewise) stands for an AVX2-only CPU, where bfloat16
    products are emulated: fast_bf16 must say no there, whatever this machine has."""
    probe = "from simpo_lightning.model import fast_bf16; print(fast_bf16())"
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    capped = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert capped.strip() == "False"
    has_units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fast_bf16() == (
        has_units
        and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and "AVX2" not in os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    )
