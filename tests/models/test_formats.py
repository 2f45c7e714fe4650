"""Weights that take a detour: the GGUF default through its cached float copy, and 8/4-bit bitsandbytes
bases trained through LoRA."""

import json
import os

import pytest
import torch

from simpo_lightning.cli import cli_main
from simpo_lightning.models.loading import PolicyConfig, load_tokenizer, model_folder

from helpers import csv_losses, tiny_args


def test_the_gguf_default_loads_from_its_cached_float_copy():
    """The built-in model's folder is the float copy: an ordinary transformers folder, built once."""
    folder = model_folder(PolicyConfig())
    assert os.path.isfile(os.path.join(folder, "model.safetensors")) and model_folder(PolicyConfig()) == folder
    tokenizer = load_tokenizer(PolicyConfig())
    assert tokenizer.name_or_path == folder and tokenizer.chat_template


def test_a_gguf_is_known_by_its_content_not_its_path(tmp_path, monkeypatch):
    """The float copy's key: the same file installed elsewhere (another path, another time) has the same stamp,
    so a fresh virtual environment reuses the copy; a file that differs in one byte has another."""
    from simpo_lightning.cache import CACHE_ENV
    from simpo_lightning.models.formats import content_stamp

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = os.urandom(3 << 20)
    first, moved, changed = (tmp_path / name for name in ("a.gguf", "elsewhere.gguf", "changed.gguf"))
    first.write_bytes(data)
    moved.write_bytes(data)
    os.utime(moved, ns=(1, 1))
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_stamp(first) == content_stamp(moved) != content_stamp(changed)
    assert len(list((tmp_path / "cache/stamps").iterdir())) == 3 * 2  # remembered (and a lock file each)
    assert content_stamp(moved) == content_stamp(first)


def test_what_needs_no_weights_reads_config_and_tokenizer_without_de_quantizing(tmp_path, monkeypatch):
    """In an empty cache, the tokenizer and the architecture come from a folder of the GGUF's config and tokenizer
    alone (seconds, where de-quantizing the weights takes many more): the same as the float copy's."""
    from transformers import AutoConfig

    from simpo_lightning.cache import CACHE_ENV

    float_folder = model_folder(PolicyConfig())  # in the session's cache
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    folder = model_folder(PolicyConfig(), weights=False)
    assert folder.startswith(str(tmp_path)) and os.path.isfile(os.path.join(folder, "config.json"))
    assert not [name for name in os.listdir(folder) if name.endswith(".safetensors")]
    # what saving a model's weights records beside its architecture
    saved = {"_name_or_path", "architectures", "dtype", "quantization_config", "transformers_version"}

    def architecture(path: str) -> dict:
        return {k: v for k, v in AutoConfig.from_pretrained(path).to_dict().items() if k not in saved}

    assert architecture(folder) == architecture(float_folder)
    tokenizer, reference = load_tokenizer(PolicyConfig()), load_tokenizer(PolicyConfig(name_or_path=float_folder))
    assert tokenizer.name_or_path == folder and tokenizer.get_vocab() == reference.get_vocab()
    assert tokenizer.chat_template == reference.chat_template


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
