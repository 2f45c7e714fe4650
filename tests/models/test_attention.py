"""Span attention: each pair's block of a packed row, equal to SDPA under the dense mask, and nothing else."""

import json

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from simpo_lightning.data import pack_pairs
from simpo_lightning.models.attention import SPANS, span_attention
from simpo_lightning.models.loading import PolicyConfig, build_policy
from simpo_lightning.scoring.sequences import shared_prompt_mask

from helpers import assert_rounding_close

PAIRS = [
    {"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6]},
    {"prompt": [7], "chosen": [8, 9, 10], "rejected": [11, 12]},
    {"prompt": [13, 14], "chosen": [15], "rejected": [16, 17, 18]},
]


class Attention(torch.nn.Module):
    """What ``sdpa_attention_forward`` reads of a model's attention layer: 4 heads over 2 key/value heads."""

    is_causal, num_key_value_groups, training = True, 2, False


def attention_inputs(seed: int = 0):
    packed = pack_pairs(PAIRS, pad_token_id=0, rows=[[0, 2], [1]])  # row 0: two pairs; row 1: one, then padding
    rows, width = packed.input_ids.shape
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, 4, width, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    key, value = (torch.randn(rows, 2, width, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    return packed, query, key, value, shared_prompt_mask(packed.segments, packed.pairs)


def test_span_attention_equals_sdpa_under_the_dense_mask_forward_and_backward():
    packed, query, key, value, mask = attention_inputs()
    assert packed.spans == [[(0, 6), (6, 12)], [(0, 6)]]
    dense = sdpa_attention_forward(Attention(), query, key, value, mask)[0]
    (dense_grad,) = torch.autograd.grad(dense[packed.pairs >= 0].square().sum(), query)
    spans = span_attention(Attention(), query, key, value, mask, pair_spans=packed.spans)[0]
    (spans_grad,) = torch.autograd.grad(spans[packed.pairs >= 0].square().sum(), query)
    assert spans.shape == dense.shape
    real = packed.pairs >= 0  # padding's outputs are read by nothing: 0 here, its own value under the dense mask
    assert_rounding_close(spans[real], dense[real], reduction=12, dtype=torch.float64, what="outputs")
    assert torch.equal(spans[~real], torch.zeros_like(spans[~real]))
    assert_rounding_close(spans_grad, dense_grad, reduction=12, dtype=torch.float64, what="query gradients")
    assert torch.equal(sdpa_attention_forward(Attention(), query, key, value, mask)[0], dense)  # no spans: SDPA


def test_span_attention_never_computes_another_pair_s_block():
    """A NaN in the second pair's values: under the dense mask the first pair's outputs turn NaN too (a masked
    product is still computed, and 0 · NaN is NaN); with spans the first pair's block never reads them."""
    packed, query, key, value, mask = attention_inputs()
    value[0, :, 6:12] = float("nan")
    dense = sdpa_attention_forward(Attention(), query, key, value, mask)[0]
    spans = span_attention(Attention(), query, key, value, mask, pair_spans=packed.spans)[0]
    assert dense[0, :6].isnan().any()
    assert spans[0, :6].isfinite().all() and spans[1].isfinite().all() and spans[0, 6:12].isnan().all()


def test_models_load_with_span_attention_and_export_plain_sdpa(tiny_dir, tmp_path):
    model = build_policy(PolicyConfig(name_or_path=tiny_dir), None)
    assert model.config._attn_implementation == SPANS
    assert (
        build_policy(PolicyConfig(name_or_path=tiny_dir, attn_implementation="eager"), None).config._attn_implementation
        == "eager"
    )
    model.save_pretrained(tmp_path)
    assert SPANS not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
