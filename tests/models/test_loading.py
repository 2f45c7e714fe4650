"""Loading models and tokenizers: clear errors, a tokenizer without a pad token, and the bfloat16 check
(GGUF and quantized weights: test_weights.py)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from simpo_lightning.errors import UserError
from simpo_lightning.models.formats import QuantizationConfig
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy, load_tokenizer
from simpo_lightning.models.parallel import fast_bf16

from helpers import ROOT


def test_quantization_errors_are_clear(tiny_dir):
    with pytest.raises(UserError, match="needs LoRA"):
        build_policy(PolicyConfig(name_or_path=tiny_dir, quantization=QuantizationConfig()), None)
    with pytest.raises(UserError, match="random_init"):
        build_policy(
            PolicyConfig(name_or_path=tiny_dir, random_init=True, quantization=QuantizationConfig()), LoraConfig()
        )


def test_tokenizer_without_pad_token_uses_eos(tokenizer, tmp_path):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(PolicyConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_a_tokenizer_loaded_again_is_a_copy_until_its_files_change(tiny_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(tiny_dir, name), tmp_path)
    cfg = PolicyConfig(name_or_path=str(tmp_path))
    first, second = load_tokenizer(cfg), load_tokenizer(cfg)
    assert first is not second and first.get_vocab() == second.get_vocab() and first.pad_token == second.pad_token
    first.pad_token = "<|im_start|>"  # what one user of a copy changes, the next copy does not have
    assert load_tokenizer(cfg).pad_token == second.pad_token != first.pad_token
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(cfg).chat_template == "{{ messages[0]['content'] }}" != second.chat_template


def test_bf16_counts_as_fast_only_where_the_cpu_may_use_bf16_units():
    """ATEN_CPU_CAPABILITY=avx2 (with oneDNN capped likewise) stands for an AVX2-only CPU, where bfloat16
    products are emulated: fast_bf16 must say no there, whatever this machine has."""
    # the module alone (it imports only torch), not the package with Lightning: seconds of start-up less
    probe = "import runpy, sys; print(runpy.run_path(sys.argv[1])['fast_bf16']())"
    module = str(ROOT / "simpo_lightning/models/parallel.py")
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    command = [sys.executable, "-c", probe, module]
    capped = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    assert capped.strip() == "False"
    has_units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fast_bf16() == (
        has_units
        and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and "AVX2" not in os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    )
