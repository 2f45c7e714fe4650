"""Where the model runs: FSDP2 sharding of its layers, and whether bfloat16 has hardware units on this device."""

import os

import torch
from torch import nn


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 (``fully_shard``) over ``mesh``: each decoder layer is its own unit (the classes the
    ``transformers`` model lists in ``_no_split_modules``), then the rest (embeddings, head) at the root.
    Works the same with LoRA: frozen and trainable parameters are sharded alike, only the trainable
    ones get gradients."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = next(
        (set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set()
    )
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (no _no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether bfloat16 matrix products run on hardware units on this device: a CUDA GPU that supports
    them, or a CPU with AVX512-BF16 or AMX that PyTorch is allowed to use (``ATEN_CPU_CAPABILITY`` and
    ``ONEDNN_MAX_CPU_ISA`` not capped below AVX-512). Elsewhere bfloat16 is emulated, about 80 times
    slower than float32, so toy runs and benchmarks choose float32 there."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    allowed = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and (
        "AVX512" in isa_cap or "AMX" in isa_cap or isa_cap in ("ALL", "DEFAULT")
    )
    return units and allowed
