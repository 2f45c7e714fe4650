"""The matrix-multiply peak that model FLOPs utilisation (MFU) is measured against, and MFU itself.

A peak taken from one square product can sit below what a model's own products reach (this CPU's
bf16 rate moved 3x within seconds, and other shapes block differently), which once printed an MFU
of 126%. So the peak here is the best rate over several square sizes, the model's own shapes, a few
repeats each, and both the run's thread count and all cores; an MFU above 100% of it still means
the measurement failed, and ``mfu_cell`` says so instead of printing the number.
"""

import os
import time

import torch

SQUARE_SIZES = (512, 1024, 2048, 4096)


def model_shapes(hidden: int, intermediate: int, vocab: int, tokens: int = 2048) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of a decoder's products for ``tokens`` rows: attention and MLP projections and the head."""
    return [
        (tokens, hidden, hidden),
        (tokens, hidden, intermediate),
        (tokens, intermediate, hidden),
        (tokens, hidden, vocab),
    ]


def _rate(m: int, k: int, n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    a @ b  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def matmul_peak(
    dtype_name: str,
    device: str = "cpu",
    shapes: list[tuple[int, int, int]] = (),
    repeats: int = 3,
    sizes: tuple[int, ...] = SQUARE_SIZES,
) -> float:
    """Highest FLOP/s of a ``dtype_name`` matrix product on ``device`` over the square ``sizes`` and ``shapes``
    (best of ``repeats`` each), on CPU with the current thread count and with every core."""
    dtype = getattr(torch, dtype_name)
    all_shapes = [(n, n, n) for n in sizes] + list(shapes)
    threads = torch.get_num_threads()
    settings = sorted({threads, os.cpu_count() or threads}) if device == "cpu" else [threads]
    best = 0.0
    try:
        for count in settings:
            torch.set_num_threads(count)
            best = max(best, *(_rate(*shape, dtype, device, repeats) for shape in all_shapes))
    finally:
        torch.set_num_threads(threads)
    return best


def model_flops_per_token(params: int, trainable: int) -> float:
    """Training FLOPs per token: 2N forward, 2N backward to the activations, and 2 per trainable weight for
    its gradient (so 6N for full fine-tuning, about 4N with LoRA's frozen base). Attention's own products
    are left out, as usual."""
    return 4 * params + 2 * trainable


def mfu_cell(flops_s: float, peak: float) -> str:
    """MFU as a table cell; above 100% the peak did not bound the run, and the cell says so."""
    mfu = flops_s / peak
    return f"{mfu:.1%}" if mfu <= 1 else f"failed ({mfu:.0%} of the measured peak)"
