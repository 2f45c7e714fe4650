"""Span attention: PyTorch's scaled-dot-product attention on each pair's own block of a packed row.

A packed row holds several ``[prompt, chosen, rejected]`` pairs (``data.batch.PackedPairs``), none attending to
another, then padding. A dense ``[rows, 1, T, T]`` mask gives the right values, but a kernel computes every masked
position anyway: T² per row however many pairs it holds. Given ``pair_spans`` (each row's ``(start, end)`` per
pair), this implementation runs ``transformers``' own SDPA on each pair's block of queries, keys, values and mask,
so a row costs the sum of its pairs' squares, and leaves the padding out (its outputs are 0, and nothing reads
them). Without ``pair_spans`` it is SDPA itself. Registered as ``sdpa_spans``; ``build_policy`` loads models with it
where the configured implementation is ``sdpa``, and saves nothing of it in exported configs. (FlexAttention's
``BlockMask`` would skip the same blocks in one kernel, but its backward does not run on a CPU.)
"""

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SPANS = "sdpa_spans"


def span_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    pair_spans: list[list[tuple[int, int]]] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """``sdpa_attention_forward`` on each span of each row (``query`` ``[B, H, T, D]``, ``attention_mask``
    ``[B, 1, T, T]``), the positions after a row's last span 0; returns ``[B, T, H, D]`` as SDPA does."""
    if pair_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    width, rows = query.shape[2], []
    for r, spans in enumerate(pair_spans):
        parts = [
            sdpa_attention_forward(
                module,
                query[r : r + 1, :, start:end],
                key[r : r + 1, :, start:end],
                value[r : r + 1, :, start:end],
                attention_mask[r : r + 1, :, start:end, start:end],
                **kwargs,
            )[0]
            for start, end in spans
        ]
        used = spans[-1][1] if spans else 0
        if used < width:
            parts.append(query.new_zeros(1, width - used, query.shape[1], query.shape[3]))
        rows.append(torch.cat(parts, 1))
    return torch.cat(rows), None


AttentionInterface.register(SPANS, span_attention)
AttentionMaskInterface.register(SPANS, sdpa_mask)
