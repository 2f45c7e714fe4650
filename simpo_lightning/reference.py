"""The frozen reference policy of the methods that use one (dpo, ipo, kto).

Three forms: with LoRA, the policy itself with its adapters disabled (no second copy); without LoRA,
a frozen copy of the initial weights, optionally in bfloat16; or, with ``precompute``, the summed
log-probs of every pair scored once before training and cached on disk, after which the copy is freed.
"""

import copy
import gc
import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from simpo_lightning.scoring import Scores

log = logging.getLogger(__name__)


@dataclass
class ReferenceConfig:
    """The frozen reference policy of dpo, ipo and kto (simpo, cpo and orpo never build one). With
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

    @torch.no_grad()
    def sum_logps(self, policy: nn.Module, score: Callable[[nn.Module], Scores]) -> Tensor:
        """``score(model).sum_logps`` under the reference model."""
        if self.lora:
            with policy.disable_adapter():
                return score(policy).sum_logps
        if not self._frozen:
            raise RuntimeError("the reference model was freed after precomputing; the batch lacks ref_*_logps")
        # dtype None: the policy's, also after the Trainer's precision converted it (64-true, bf16-true)
        device = next(policy.parameters()).device
        dtype = getattr(torch, self.config.dtype) if self.config.dtype else next(policy.parameters()).dtype
        return score(self._frozen[0].to(device, dtype)).sum_logps

    @torch.no_grad()
    def precompute(
        self,
        policy: nn.Module,
        splits: dict[str, list[dict]],
        score: Callable[[nn.Module, list[dict]], Tensor],
        batch_size: int,
        cache_dir: str | None,
        identity: object | None,
    ) -> None:
        """Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` to every pair of every split, then frees the
        frozen copy. ``score(model, examples)`` gives the summed log-probs ``[2B]``, chosen then rejected.
        Results are cached in ``cache_dir`` keyed by ``identity`` (the model's) and the token ids; None
        (random weights, which no configuration identifies) disables the cache."""
        was_training = policy.training
        policy.eval()
        for name, examples in splits.items():
            todo = [e for e in examples if "ref_chosen_logps" not in e]
            if not todo:
                continue
            cache = _cache_file(todo, cache_dir, identity)
            cached = cache is not None and cache.is_file()
            if cached:
                values = torch.load(cache)
            else:
                chunks = [
                    score(policy, todo[s : s + batch_size]).view(2, -1).T.cpu() for s in range(0, len(todo), batch_size)
                ]
                values = torch.cat(chunks)
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(values, cache)
            for example, (chosen, rejected) in zip(todo, values.tolist()):
                example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected
            log.info(
                "reference log-probs of %d %s pairs %s", len(todo), name, "loaded from cache" if cached else "computed"
            )
        policy.train(was_training)
        self._frozen.clear()
        gc.collect()


def _cache_file(examples: list[dict], cache_dir: str | None, identity: object | None) -> Path | None:
    if cache_dir is None or identity is None:
        return None
    h = hashlib.sha256(repr(identity).encode())
    for e in examples:
        h.update(repr((e["prompt"], e["chosen"], e["rejected"])).encode())
    return Path(cache_dir).expanduser() / f"ref-{h.hexdigest()[:24]}.pt"


def reference_identity(policy_config, reference_config: ReferenceConfig) -> object | None:
    """What identifies the reference's weights for the cache: the policy's configuration and the copy's dtype;
    None for random weights."""
    return None if policy_config.random_init else (asdict(policy_config), reference_config.dtype)
