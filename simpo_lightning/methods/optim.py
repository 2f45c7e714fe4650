"""Optimizer step fused into the backward pass, so the whole model's gradients never exist at once."""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a hook the moment that parameter's gradient is complete;
    the gradient is freed right after. Peak memory drops by one copy of the trainable weights' gradients
    (for full fine-tuning in float32, 4 bytes per parameter), the numbers stay those of the wrapped
    optimizer. Gradients are never all present, so gradient clipping by global norm, gradient
    accumulation, loss scaling (16-mixed) and data-parallel gradient averaging cannot work with it.

    The inner optimizers share this object's ``param_groups`` dicts (so learning-rate schedulers reach
    them) and its ``state``, so ``state_dict``/``load_state_dict`` and checkpoints work as for one optimizer.
    ``step(closure)`` only runs the closure (forward and backward); the updates happen inside its backward.

    Args:
        params: the trainable parameters.
        optimizer: builds an optimizer for a list of parameters, e.g. ``torch.optim.AdamW``.
    """

    def __init__(self, params: Iterable[Tensor], optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]):
        params = list(params)
        self.inner = {p: optimizer([p]) for p in params}
        super().__init__(params, {})
        self.param_groups = [o.param_groups[0] for o in self.inner.values()]
        self._link()
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in params]

    def _link(self) -> None:
        for inner, group in zip(self.inner.values(), self.param_groups):
            inner.param_groups, inner.state = [group], self.state

    def _step_parameter(self, param: Tensor) -> None:
        inner = self.inner[param]
        inner.step()
        inner.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "inner" in self.__dict__:  # load_state_dict replaced state and param_groups: point the inner ones at them
            self._link()

    def remove_hooks(self) -> None:
        """Stop stepping on backward (the optimizer is no longer used)."""
        for hook in self._hooks:
            hook.remove()
