"""What a ``fit`` checkpoint holds, as a model to use: its trained policy in float weights (LoRA merged or not),
its tokenizer, and whether it is a causal LM or a reward model; and the policy ``generate`` and ``evaluate``
sample from, a checkpoint or any model source."""

import logging
from typing import Any

from torch import nn

from simpo_lightning.models.loading import (
    Head,
    LoraConfig,
    PolicyConfig,
    build_policy,
    load_tokenizer,
    read_checkpoint,
)

log = logging.getLogger(__name__)


def checkpoint_head(checkpoint: dict) -> Head:
    """The head a checkpoint's model has, as its module recorded it (``head``); checkpoints written before this
    record name their module instead (``simpo_lightning_module``)."""
    if "head" in checkpoint:
        return checkpoint["head"]
    return "reward" if checkpoint.get("simpo_lightning_module") == "RewardModule" else "causal"


def policy_from_checkpoint(ckpt_path: str, merge: bool = True) -> tuple[nn.Module, Any, LoraConfig | None]:
    """The trained model of a ``fit`` checkpoint in float weights (a quantized base is loaded in float), with
    LoRA merged unless ``merge`` is false; its tokenizer; its LoRA config. A reward model's checkpoint
    (``checkpoint_head``) gives the sequence-classification model with the pad token it was trained with."""
    checkpoint = read_checkpoint(ckpt_path, weights=False)  # its settings: the weights load in build_policy
    hp = checkpoint["hyper_parameters"]
    policy = PolicyConfig(**{**hp["policy"], "quantization": None, "init_from": ckpt_path})
    lora = LoraConfig(**hp["lora"]) if hp.get("lora") else None
    if hp["policy"].get("quantization"):
        log.warning(
            "%s was trained on a %s-bit quantized base; loaded in float weights with the adapters, its "
            "outputs differ slightly from the quantized model's",
            ckpt_path,
            hp["policy"]["quantization"]["bits"],
        )
    head = checkpoint_head(checkpoint)
    del checkpoint
    model = build_policy(policy, lora, head)
    tokenizer = load_tokenizer(policy, head, hp.get("pad_token"))
    if head == "reward":
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None and merge:
        model = model.merge_and_unload()
    return model, tokenizer, lora


def inference_policy(
    source: str | None, gguf_file: str | None = None, dtype: str = "float32"
) -> tuple[nn.Module, object]:
    """A policy to generate with, and its tokenizer: a ``fit`` checkpoint (``.ckpt``, LoRA merged), or what
    ``PolicyConfig.name_or_path`` takes (a hub id, a model or exported folder, a GGUF with ``gguf_file``),
    or None for the built-in SmolLM2. In eval mode, with the KV cache on."""
    if source is not None and source.endswith(".ckpt"):
        model, tokenizer, _ = policy_from_checkpoint(source)
    else:
        policy = PolicyConfig(name_or_path=source, gguf_file=gguf_file, dtype=dtype)
        model, tokenizer = build_policy(policy, None), load_tokenizer(policy)
    model.config.use_cache = True
    return model.eval(), tokenizer
