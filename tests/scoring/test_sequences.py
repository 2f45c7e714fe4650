"""Scoring responses with a model: batched, padded, chunked and shared-prompt paths against plain ones."""

import copy

import pytest
import torch

from simpo_lightning.data import Columns, PairEncoder, PreferenceCollator, Truncation
from simpo_lightning.data.batch import PairBatch
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy
from simpo_lightning.scoring.logprobs import IGNORE_INDEX
from simpo_lightning.scoring.sequences import Scores, score_pair_batch

from helpers import assert_rounding_close, slow_reference

ROWS = [
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello there, friend"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    },
    {
        "prompt": "A much longer prompt that needs more tokens than the other one",
        "chosen": "yes",
        "rejected": "no way at all",
    },
]


def encoded(tokenizer) -> list[dict]:
    encode = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    return [encode(r) for r in ROWS]


def pair_batch(tokenizer, shared_prompt: bool = False) -> PairBatch:
    return PreferenceCollator(tokenizer.pad_token_id, shared_prompt=shared_prompt)(encoded(tokenizer))


def test_batched_scores_match_separate_forwards(tiny_dir, tokenizer):
    """The batched, padded, chunked float32 path against a float64 copy of the model scored one
    unpadded sequence and one token at a time."""
    model = build_policy(PolicyConfig(name_or_path=tiny_dir), None)
    reference_model = copy.deepcopy(model).double()
    pairs = encoded(tokenizer)
    with torch.no_grad():
        sides = dict(zip(("chosen", "rejected"), score_pair_batch(model, pair_batch(tokenizer), chunk=1024).halves()))
        for i, pair in enumerate(pairs):
            for side, scores in sides.items():
                expected = slow_reference(reference_model, pair["prompt"], pair[side])
                assert_rounding_close(scores.mean_logps[i], expected, reduction=tokenizer.vocab_size, what=side)
                assert scores.lengths[i].item() == len(pair[side])


def scores_and_gradients(tiny_dir, lora, chunk, batch, double: bool = False) -> tuple[Scores, dict]:
    """Scores of a fresh model (same LoRA initialisation, adapters moved off 0 so they matter) and the
    gradients of a loss of them; in float64 with ``double``."""
    torch.manual_seed(0)
    model = build_policy(PolicyConfig(name_or_path=tiny_dir), lora)
    if lora is not None:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    if double:
        model.double()
    scores = score_pair_batch(model, batch, chunk)
    chosen, rejected = scores.halves()
    (chosen.mean_logps - 0.5 * rejected.mean_logps).sum().backward()
    return scores, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_matches_float64(result, reference, vocab: int, what: str) -> None:
    (scores, grads), (ref_scores, ref_grads) = result, reference
    for field in ("sum_logps", "lengths", "mean_logits"):
        assert_rounding_close(
            getattr(scores, field), getattr(ref_scores, field), reduction=vocab, what=f"{what} {field}"
        )
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_rounding_close(grads[name], ref_grads[name], reduction=vocab, what=f"{what} gradient of {name}")


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)], ids=["full", "lora"])
def test_chunked_head_equals_full_logits_forward_and_gradients(tiny_dir, tokenizer, lora):
    """Chunked head and the model's full logits, each against the full-logits path in float64."""
    batch = pair_batch(tokenizer)
    reference = scores_and_gradients(tiny_dir, lora, None, batch, double=True)
    for chunk in (3, None):
        result = scores_and_gradients(tiny_dir, lora, chunk, batch)
        assert_matches_float64(result, reference, tokenizer.vocab_size, f"chunk {chunk}")


@pytest.mark.parametrize(
    "lora, chunk", [(None, 4), (LoraConfig(r=4), 4), (None, None)], ids=["full", "lora", "full-logits"]
)
def test_shared_prompt_forward_equals_separate_sequences(tiny_dir, tokenizer, lora, chunk):
    """The packed [prompt, chosen, rejected] sequence and the two separate ones, each against the
    separate sequences in float64."""
    separate, packed = pair_batch(tokenizer), pair_batch(tokenizer, shared_prompt=True)
    reference = scores_and_gradients(tiny_dir, lora, chunk, separate, double=True)
    for name, batch in (("shared prompt", packed), ("separate", separate)):
        result = scores_and_gradients(tiny_dir, lora, chunk, batch)
        assert_matches_float64(result, reference, tokenizer.vocab_size, name)
    chosen_tokens = (separate.chosen.labels[:, 1:] != IGNORE_INDEX).sum(-1)
    assert result[0].halves()[0].lengths.tolist() == chosen_tokens.tolist()


@pytest.mark.parametrize("lora, chunk", [(None, 4), (LoraConfig(r=4), None)], ids=["full", "lora-full-logits"])
def test_pairs_packed_several_to_a_row_score_as_separate_sequences(tiny_dir, tokenizer, lora, chunk):
    """Four pairs in two rows (three in one, each with positions from 0 and attending to itself only) against the
    separate sequences in float64: the same log-probs and gradients."""
    examples = encoded(tokenizer) * 2
    examples[2] = {**examples[2], "chosen": examples[2]["chosen"][:2]}  # four distinct pairs
    examples[3] = {**examples[3], "rejected": examples[3]["rejected"][1:]}
    tagged = [{**e, "row": row} for e, row in zip(examples, [0, 1, 0, 0])]
    batch = PreferenceCollator(tokenizer.pad_token_id)(tagged)
    assert batch.packed.input_ids.shape[0] == 2 and batch.packed.pairs[0].unique().tolist() == [0, 2, 3]
    separate = PreferenceCollator(tokenizer.pad_token_id)(examples)
    reference = scores_and_gradients(tiny_dir, lora, chunk, separate, double=True)
    result = scores_and_gradients(tiny_dir, lora, chunk, batch)
    assert_matches_float64(result, reference, tokenizer.vocab_size, "packed rows")
