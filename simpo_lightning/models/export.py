"""``simpo-lightning export``: a training checkpoint to a standalone Hugging Face model folder.

    simpo-lightning export --ckpt_path runs/.../checkpoints/last.ckpt --output_dir my-model

The folder holds safetensors weights (LoRA merged into the base, quantization removed), the config,
the tokenizer with its chat template and a model card (``models.card``), so
``AutoModelForCausalLM.from_pretrained(output_dir)`` and ``AutoTokenizer.from_pretrained(output_dir)`` load it
with no trace of this framework; a reward model's (``RewardModule``) loads with
``AutoModelForSequenceClassification`` and serves as the ``RewardModelJudge``.
``--adapter_only true`` writes just the LoRA adapter in ``peft`` format instead.
"""

import logging
from pathlib import Path
from typing import Literal

import torch

from simpo_lightning.errors import UserError
from simpo_lightning.models.card import model_card
from simpo_lightning.models.checkpoints import policy_from_checkpoint
from simpo_lightning.models.formats import saveable
from simpo_lightning.models.loading import read_checkpoint

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
    model, tokenizer, lora = policy_from_checkpoint(ckpt_path, merge=not adapter_only)
    if adapter_only and lora is None:
        raise UserError("--adapter_only needs a LoRA checkpoint; this one trained every weight")
    if dtype is not None:
        model.to(getattr(torch, dtype))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    saveable(model.get_base_model() if adapter_only else model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(read_checkpoint(ckpt_path, weights=False), ckpt_path, adapter_only))
    print(f"wrote {out} (with its model card, README.md)", flush=True)
    return out
