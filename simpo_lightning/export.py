"""``simpo-lightning export``: a training checkpoint to a standalone Hugging Face model folder.

    simpo-lightning export --ckpt_path runs/.../checkpoints/last.ckpt --output_dir my-model

The folder holds safetensors weights (LoRA merged into the base, quantization removed), the config
and the tokenizer with its chat template, so ``AutoModelForCausalLM.from_pretrained(output_dir)``
and ``AutoTokenizer.from_pretrained(output_dir)`` load it with no trace of this framework.
``--adapter_only true`` writes just the LoRA adapter in ``peft`` format instead.
"""

import logging
from pathlib import Path
from typing import Literal

import torch

from simpo_lightning.errors import UserError
from simpo_lightning.model import LoraConfig, PolicyConfig, build_policy, load_tokenizer, saveable

log = logging.getLogger(__name__)


def export(
    ckpt_path: str, output_dir: str, dtype: Literal["float32", "bfloat16"] | None = None, adapter_only: bool = False
) -> Path:
    """Write the policy of a ``fit`` checkpoint as a Hugging Face model folder.

    Args:
        ckpt_path: a ``.ckpt`` file written by ``simpo-lightning fit``.
        output_dir: folder to write (created; existing files are overwritten).
        dtype: dtype of the saved weights. None: the policy's training dtype.
        adapter_only: with LoRA, save only the adapter (``adapter_config.json``, ``adapter_model.safetensors``).

    Returns:
        The output folder.
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise UserError(f"--ckpt_path {path}: no such checkpoint")
    if path.is_dir():
        raise UserError(
            f"{path} is a sharded (distributed) checkpoint; train with ModelParallelStrategy("
            "save_distributed_checkpoint=False) to get a single file, or consolidate it first"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    policy = PolicyConfig(**{**hp["policy"], "quantization": None})  # the merged model is plain floats
    lora = LoraConfig(**hp["lora"]) if hp.get("lora") else None
    if lora is not None and policy.random_init:
        raise UserError("a LoRA checkpoint holds only the adapters, and its random_init base weights were never saved")
    if adapter_only and lora is None:
        raise UserError("--adapter_only needs a LoRA checkpoint; this one trained every weight")
    if hp["policy"].get("quantization"):
        log.warning(
            "the base was trained %s-bit quantized; the export merges the adapters into float weights, "
            "so its outputs differ slightly from the quantized model's",
            hp["policy"]["quantization"]["bits"],
        )

    model = build_policy(policy, lora)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (lora is None and missing):
        raise UserError(
            f"checkpoint does not match the model it names: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if lora is not None and not adapter_only:
        model = model.merge_and_unload()
    if dtype is not None:
        model.to(getattr(torch, dtype))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    saveable(model.get_base_model() if adapter_only else model)
    model.save_pretrained(out)
    load_tokenizer(policy).save_pretrained(out)
    print(f"wrote {out}", flush=True)
    return out
