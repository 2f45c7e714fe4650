"""Random models of the default architecture, resized: for tests, smoke runs and benchmarks
(``configs/testing/tiny.yaml`` spells the tiny one out)."""

from pathlib import Path
from typing import Any

import torch

from simpo_lightning.models.loading import PolicyConfig, load_tokenizer, model_folder

# A 2-layer shrink of the default architecture.
TINY_ARCHITECTURE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def save_random_model(folder: str | Path, overrides: dict[str, Any], seed: int = 0) -> None:
    """Save a randomly initialised model of the default (SmolLM2) architecture, resized by
    ``overrides``, with its tokenizer, as an ordinary model folder (for tests, benchmarks, and
    everything that loads saved weights only, such as bitsandbytes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_folder(PolicyConfig(), weights=False))
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(PolicyConfig()).save_pretrained(folder)
