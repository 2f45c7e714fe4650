"""The frozen reference policy of the methods that use one (dpo, ipo, kto, lndpo, rdpo).

Three forms: with LoRA, the policy itself with its adapters disabled (no second copy); without LoRA,
a frozen copy of the initial weights, optionally in bfloat16; or, with ``precompute``, the summed
log-probs of every pair scored once before training and cached on disk, after which the copy is freed.
"""

import copy
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from simpo_lightning.models.loading import adapters_off
from simpo_lightning.scoring.sequences import Scores

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ReferenceConfig:
    """The frozen reference policy of dpo, ipo, kto, lndpo and rdpo (the others never build one). With
    LoRA it is the policy with its adapters disabled, so no second copy is held."""

    precompute: bool = False
    """Score every example with the reference once before training (cached on disk beside the data
    cache), then free the reference; not for kto, whose KL term depends on the batch."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Without LoRA: dtype of the frozen copy (bfloat16 halves its memory). None: the policy's."""


class Reference:
    """The reference of one policy. The frozen copy is kept in a list, not as a registered submodule, so it
    stays out of the state dict, the optimizer and the strategy's wrapping."""

    def __init__(self, config: ReferenceConfig, lora: bool):
        self.config, self.lora = config, lora
        self._frozen: list[nn.Module] = []

    def build(self, policy: nn.Module) -> None:
        """Without LoRA, a frozen copy of ``policy``'s weights now (also right before a resume restores the
        policy, and for random_init)."""
        if not self.lora:
            frozen = copy.deepcopy(policy).eval().requires_grad_(False)
            if self.config.dtype is not None:
                frozen.to(getattr(torch, self.config.dtype))
            self._frozen = [frozen]

    def shard(self, shard: Callable[[nn.Module], nn.Module]) -> None:
        self._frozen = [shard(m) for m in self._frozen]

    @property
    def frozen(self) -> nn.Module | None:
        """The frozen copy, or None (LoRA, or freed after precomputing)."""
        return self._frozen[0] if self._frozen else None

    def sum_logps(self, policy: nn.Module, score: Callable[[nn.Module], Scores]) -> Tensor:
        """``score(model).sum_logps`` under the reference model."""
        return self.apply(policy, score).sum_logps

    @torch.no_grad()
    def apply(self, policy: nn.Module, function: Callable[[nn.Module], T]) -> T:
        """``function(model)`` with the reference model, without gradients."""
        if self.lora:
            with adapters_off(policy):
                return function(policy)
        if not self._frozen:
            raise RuntimeError("the reference model was freed after precomputing; the batch lacks ref_*_logps")
        # dtype None: the policy's, also after the Trainer's precision converted it (64-true, bf16-true)
        device = next(policy.parameters()).device
        dtype = getattr(torch, self.config.dtype) if self.config.dtype else next(policy.parameters()).dtype
        frozen = self._frozen[0]
        first = next(frozen.parameters())
        if (first.device, first.dtype) != (
            device,
            dtype,
        ):  # (also keeps fake tensors, which refuse a swap, as they are)
            frozen.to(device, dtype)
        return function(frozen)

    @torch.no_grad()
    def precompute(
        self,
        policy: nn.Module,
        size: int,
        score: Callable[[nn.Module, int, int], Tensor],
        batch_size: int,
        cache: Path | None,
        rank: int = 0,
        world: int = 1,
        gather: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The summed reference log-probs ``[size, 2]`` (chosen, rejected) of ``size`` pairs, where
        ``score(model, start, stop)`` gives those of pairs ``start:stop``, chosen then rejected (``[2B]``).
        Each of ``world`` processes scores every ``world``-th batch, in step with the others (a sharded
        model's forward is collective); ``gather`` (an all-gather) then gives everyone every value.
        ``cache`` (a file, None for no cache) is read when every process finds it, else written by the
        first process."""
        cached = torch.tensor(cache is not None and cache.is_file(), device=_device(policy))
        if (gather(cached).all() if world > 1 else cached).item():
            return torch.load(cache)
        was_training = policy.training
        policy.eval()
        starts = list(range(0, size, batch_size))
        mine = starts[rank::world]
        mine += mine[-1:] * (-(-len(starts) // world) - len(mine))  # every process runs as many batches
        values = torch.zeros(size, 2, dtype=torch.float64, device=_device(policy))
        for start in mine:
            stop = min(start + batch_size, size)
            values[start:stop] = score(policy, start, stop).view(2, -1).T.to(values)
        policy.train(was_training)
        if world > 1:
            values = gather(values).sum(0)  # each row was scored by one process; the others hold 0 there
        if cache is not None and rank == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
            torch.save(values.cpu(), temporary)
            os.replace(temporary, cache)
        log.info("reference log-probs of %d pairs computed", size)
        return values.cpu()

    def free(self) -> None:
        """Drop the frozen copy (after precomputing, it is not needed)."""
        self._frozen.clear()
        gc.collect()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def reference_identity(policy_config, reference_config: ReferenceConfig) -> object | None:
    """What identifies the reference's weights for the cache: the policy's configuration and the copy's dtype;
    None for random weights."""
    return None if policy_config.random_init else (asdict(policy_config), reference_config.dtype)
