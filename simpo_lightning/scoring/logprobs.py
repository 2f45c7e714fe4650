"""Log-probabilities of label tokens, as pure functions of logits and labels, and the chunked output head."""

import torch
from torch import Tensor

from simpo_lightning.data.batch import IGNORE_INDEX


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is float64: the log-softmax never runs in bfloat16 or float16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each next token.

    Position t of ``logits`` predicts ``labels[:, t + 1]``; the shift happens here, so callers pass
    logits and labels aligned with ``input_ids``.

    Args:
        logits: ``[B, T, V]`` model outputs, any float dtype (computed in float32 here, or float64).
        labels: ``[B, T]`` token ids, ``IGNORE_INDEX`` where no loss is wanted (prompt, padding).

    Returns:
        ``[B, T - 1]`` log p(labels[:, t + 1] | ...), 0 at ignored positions.
    """
    logits, labels = at_least_float32(logits[:, :-1]), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    # log_softmax(x)[y] = x[y] - logsumexp(x): avoids a second [B, T, V] tensor.
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return picked * mask


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = True) -> tuple[Tensor, Tensor]:
    """Sum (or mean, SimPO's length normalisation) of response-token log-probs per sequence.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` with ``IGNORE_INDEX`` on prompt and padding.
        average: divide by the number of response tokens |y|.

    Returns:
        ``(logps [B], n_tokens [B])``.
    """
    per_token = token_logps(logits, labels)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    if (n_tokens == 0).any():
        raise ValueError("a sequence has no response tokens; the data pipeline should have dropped it")
    total = per_token.sum(-1)
    return (total / n_tokens if average else total), n_tokens


class _LabelLogps(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ)[target] for rows of hidden states, a chunk of rows at a time, so
    the ``[rows, vocab]`` logits exist for one chunk only, in the forward and in the backward pass
    (which recomputes them). Also returns each row's mean logit (no gradient), for logging."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, dtype: torch.dtype):
        w, acc = weight.to(dtype), torch.promote_types(dtype, torch.float32)  # float32, or float64 for gradcheck
        logps = torch.empty(len(hidden), dtype=acc, device=hidden.device)
        lse, mean_logit = torch.empty_like(logps), torch.empty_like(logps)
        for s in range(0, len(hidden), chunk):
            logits = (hidden[s : s + chunk].to(dtype) @ w.T).to(acc)
            lse[s : s + chunk] = logits.logsumexp(-1)
            logps[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
            mean_logit[s : s + chunk] = logits.mean(-1)
        ctx.save_for_backward(hidden, w, targets, lse)  # w: the cast head, kept rather than cast again
        ctx.chunk, ctx.dtype, ctx.weight_dtype = chunk, dtype, weight.dtype
        ctx.mark_non_differentiable(mean_logit)
        return logps, mean_logit

    @staticmethod
    def backward(ctx, grad: Tensor, _):
        hidden, w, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        for s in range(0, len(hidden), ctx.chunk):
            h, g = hidden[s : s + ctx.chunk].to(ctx.dtype), grad[s : s + ctx.chunk, None]
            # d logp[y] / d logits = onehot(y) - softmax(logits)
            d = (h @ w.T).to(acc).sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g)
            d.scatter_add_(-1, targets[s : s + ctx.chunk, None], g)
            d = d.to(ctx.dtype)
            if need_hidden:
                grad_hidden[s : s + ctx.chunk] = d @ w
            if need_weight:
                part = (d.T @ h).to(acc)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
        return grad_hidden, grad_weight.to(ctx.weight_dtype) if need_weight else None, None, None, None


def label_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Log-probabilities of ``targets`` under the output head, computed ``chunk`` rows at a time.

    Equal to ``log_softmax(hidden @ weight.T)[target]`` (float32 log-softmax) without ever holding
    the logits of more than ``chunk`` rows, forward or backward. Under autocast the products use
    the autocast dtype, as the model's own head would.

    Args:
        hidden: ``[M, H]`` final hidden states of the positions that predict a target.
        weight: ``[V, H]`` output head (no bias).
        targets: ``[M]`` token ids.

    Returns:
        ``(logps [M], mean_logit [M])``; only ``logps`` carries a gradient.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LabelLogps.apply(hidden, weight, targets, chunk, dtype)
