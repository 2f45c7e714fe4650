"""Log-probabilities of label tokens, as pure functions of logits and labels."""

import torch
from torch import Tensor

IGNORE_INDEX = -100


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each next token.

    Position t of ``logits`` predicts ``labels[:, t + 1]``; the shift happens here, so callers pass
    logits and labels aligned with ``input_ids``.

    Args:
        logits: ``[B, T, V]`` model outputs, any float dtype (computed in float32 here).
        labels: ``[B, T]`` token ids, ``IGNORE_INDEX`` where no loss is wanted (prompt, padding).

    Returns:
        ``[B, T - 1]`` log p(labels[:, t + 1] | ...), 0 at ignored positions.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
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
