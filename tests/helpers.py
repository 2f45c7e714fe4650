"""Test helpers: the rounding rule for comparing floating-point paths.

Two computations that are equal in exact arithmetic (chunked and full logits, a shared-prompt
sequence and two separate ones, this package and TRL) differ in floating point by their rounding,
and the rounding differs between CPUs: AVX2, AVX-512 and AMX kernels block a matrix product
differently and so sum in a different order. A tolerance tuned on one machine fails on another.
The rule used instead, written once here:

    |computed - reference| <= c · eps · √K · max|reference|

with ``reference`` the same quantity in float64 (rounding 2^-53, negligible against float32's
2^-24), ``eps`` the machine epsilon of the dtype the path computes in, and K the length of the
longest reduction (sum) on the way: a sum of K rounded terms drifts like a random walk of K steps
of eps times the size of the terms (Higham and Mary, "A new approach to probabilistic rounding
error analysis", 2019), whatever order the kernel sums in. ``max|reference|`` over the whole
tensor stands for the size of the terms, because an element that cancels to near 0 still carries
the rounding of its large terms. ``c`` (default 8) covers a few reductions in a row (a layer's
products, then the log-softmax over the vocabulary). Each path is checked against float64 on its
own, so neither float32 path is the reference for the other.

Training curves of two such paths (a few optimizer steps, each amplifying differences) are run with
float64 weights and plain SGD. Adam would not do: it divides each step by √v + eps and so multiplies
a gradient's rounding by up to lr / eps (10^6 at lr 1e-2). Float64 weights do not make every step
float64: transformers' Llama computes RMSNorm and the rotary embedding in float32 whatever the
weights, so an element can carry one float32 rounding there, not a sum of them. The curves are held
to the float32 rule (K: the vocabulary), which a run in float32 with Adam would exceed, while a real
difference in the computation moves the loss by 1e-2 or more. Where a path can only run in float32
(FSDP converts the weights to float32), its curve is held to the same rule around a float64 run of
the other path, step by step.
"""

import math

import torch
from torch import Tensor

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
       torch.float64: torch.finfo(torch.float64).eps}


def rounding_bound(reference: Tensor | float, reduction: int, dtype: torch.dtype = torch.float32, c: float = 8.0) -> float:
    """c · eps(dtype) · √K · max|reference|: the largest error the rule allows (module docstring)."""
    scale = torch.as_tensor(reference).abs().max().item()
    return c * EPS[dtype] * math.sqrt(reduction) * scale


def assert_rounding_close(actual: Tensor | float, reference: Tensor | float, reduction: int,
                          dtype: torch.dtype = torch.float32, c: float = 8.0, what: str = "") -> None:
    """``actual`` (computed in ``dtype``) is within the rounding rule of ``reference`` (float64)."""
    actual, reference = torch.as_tensor(actual).double(), torch.as_tensor(reference).double()
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    error = (actual - reference).abs().max().item()
    bound = rounding_bound(reference, reduction, dtype, c)
    assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g} = {c}·eps({dtype})·√{reduction}·max|reference|"


def assert_curves_equal(curve: list[float], reference: list[float], reduction: int = 49152) -> None:
    """Loss curves of two float64, SGD runs of algebraically equal paths, step by step (module docstring)."""
    assert len(curve) == len(reference) > 0
    for step, (a, b) in enumerate(zip(curve, reference)):
        assert_rounding_close(a, b, reduction, what=f"step {step}")
