"""Weight formats that take a detour on their way into a model: a GGUF file de-quantized once into a cached
float folder, and bitsandbytes k-bit loading (QLoRA, ``QuantizationConfig``). ``loading.build_policy`` is their
one caller."""

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from simpo_lightning.cache import build_once, cache_root
from simpo_lightning.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class QuantizationConfig:
    """bitsandbytes k-bit loading of the frozen base weights, trained through LoRA adapters (QLoRA).
    Needs ``pip install bitsandbytes``; runs on NVIDIA GPUs and (bitsandbytes >= 0.49) on CPU."""

    bits: Literal[4, 8] = 4
    """8: LLM.int8 linear layers. 4: 4-bit blocks with one scale per 64 weights."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 (normal float) is QLoRA's."""
    double_quant: bool = True
    """4-bit: quantize the block scales too (about 0.4 bits per weight saved)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """4-bit: dtype the weights are de-quantized to for each matrix product."""


def load_quantized(
    path: str, q: QuantizationConfig, dtype: str, attn_implementation: str, config, auto=None
) -> nn.Module:
    """The model at ``path`` (an ordinary folder or hub id) with its linear weights in ``q.bits`` bits through
    bitsandbytes, with clear errors for what cannot work."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    auto = auto or AutoModelForCausalLM
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.policy.quantization ({q.bits}-bit) needs bitsandbytes: pip install bitsandbytes")
    if q.bits == 8:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    device = torch.get_default_device()  # Lightning's init context: the accelerator the run trains on
    try:
        return auto.from_pretrained(
            path,
            config=config,
            quantization_config=bnb,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            device_map={"": device},
        )
    except (RuntimeError, NotImplementedError, ImportError) as error:
        raise UserError(
            f"bitsandbytes {q.bits}-bit loading failed on {device} (supported: CUDA, and CPU with "
            f"bitsandbytes >= 0.49): {error}"
        ) from error


def float_copy(path: str, gguf_file: str, weights: bool = True) -> str:
    """A GGUF model de-quantized once into an ordinary float32 model folder in the cache, which loads in a
    fraction of a second where de-quantizing takes many (SmolLM2-135M: 0.2 s against 17 s). Without
    ``weights``, a folder of its config and tokenizer only (read from the GGUF in about 5 s), for what needs no
    weights: a tokenizer, or a model of its architecture with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(path) / gguf_file
    if not source.is_file():
        raise UserError(f"model.policy.gguf_file: no file {source}")
    stamp = content_stamp(source)
    folder = cache_root() / f"gguf-{stamp}"
    if not weights and not folder.is_dir():
        folder = cache_root() / f"gguf-{stamp}-config"
        with build_once(folder) as building:
            if building is not None:
                AutoConfig.from_pretrained(path, gguf_file=gguf_file).save_pretrained(building)
                AutoTokenizer.from_pretrained(path, gguf_file=gguf_file).save_pretrained(building)
        return str(folder)
    with build_once(folder) as building:
        if building is not None:
            log.info("de-quantizing %s once into %s", source, folder)
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
            saveable(model).save_pretrained(building)
            AutoTokenizer.from_pretrained(path, gguf_file=gguf_file).save_pretrained(building)
    return str(folder)


def content_stamp(file: Path) -> str:
    """The file's SHA-256 (16 hex digits), remembered in the cache under its path, size and modification time: the
    same GGUF installed in two environments (a fresh virtual environment, another clone) shares one float copy,
    and a changed file gets its own. Hashing SmolLM2-135M's 98 MB takes about 0.2 s, once per installed file."""
    status = file.stat()
    where = f"{file.resolve()}:{status.st_size}:{status.st_mtime_ns}"
    memo = cache_root() / "stamps" / hashlib.sha256(where.encode()).hexdigest()[:16]
    if memo.is_file():
        return memo.read_text()
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    with build_once(memo) as building:
        if building is not None:
            building.write_text(digest.hexdigest()[:16])
    return memo.read_text()


def saveable(model: nn.Module) -> nn.Module:
    """Drops the quantized marker a GGUF load leaves (its weights are plain floats), which would make
    ``save_pretrained`` refuse."""
    model.config.quantization_config = None
    model.hf_quantizer = None
    return model
