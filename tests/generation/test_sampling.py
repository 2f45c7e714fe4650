"""Sampling: greedy equals transformers' generate, and each sample depends on its prompt, index and seed
alone: not on batch size, order, the other prompts of its batch."""

import pytest
import torch

from simpo_lightning.errors import UserError
from simpo_lightning.generation.sampling import SamplingConfig, SeededSampler, sample_responses
from simpo_lightning.models.loading import PolicyConfig, build_policy

PROMPTS = [
    "Name a colour:",
    "A much longer question that takes many more tokens than the first one:",
    "2 + 2 =",
    "Say hello.",
    "What is the capital of France? Answer with one word only.",
]


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    return build_policy(PolicyConfig(name_or_path=tiny_dir), None).eval()


def tokens(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def test_greedy_equals_generate_one_prompt_at_a_time(model, tokenizer):
    config = SamplingConfig(n=1, temperature=0.0, max_new_tokens=8, batch_size=3)
    ours = sample_responses(model, tokenizer, tokens(tokenizer), config)
    for prompt, (sample,) in zip(tokens(tokenizer), ours):
        expected = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, len(prompt) :].tolist()
        eos = tokenizer.eos_token_id
        assert sample.tokens == (expected[: expected.index(eos)] if eos in expected else expected)
        assert sample.finish_reason == ("stop" if eos in expected else "length")


def test_a_sample_depends_on_its_prompt_index_and_seed_alone(model, tokenizer):
    config = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    alone = sample_responses(model, tokenizer, tokens(tokenizer), SamplingConfig(**{**vars(config), "batch_size": 1}))
    together = sample_responses(
        model, tokenizer, tokens(tokenizer), SamplingConfig(**{**vars(config), "batch_size": 15})
    )
    reversed_subset = sample_responses(model, tokenizer, tokens(tokenizer)[::-2], config, sort=False)
    assert together == alone and reversed_subset == alone[::-2]
    assert len({tuple(s.tokens) for prompt in alone for s in prompt}) > len(PROMPTS)  # the samples do differ
    other_seed = sample_responses(model, tokenizer, tokens(tokenizer), SamplingConfig(**{**vars(config), "seed": 8}))
    assert other_seed != alone


def test_fixed_lengths_and_the_length_flag(model, tokenizer):
    config = SamplingConfig(n=2, temperature=1.0, max_new_tokens=5, min_new_tokens=5)
    samples = sample_responses(model, tokenizer, tokens(tokenizer), config)
    assert all(len(s.tokens) == 5 and s.finish_reason == "length" for prompt in samples for s in prompt)


def test_top_p_draws_from_the_nucleus_only():
    """Probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two (0.5 alone is short of 0.6), top_p 0.4 the first."""
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(300, 1)
    for top_p, allowed in ((0.6, {0, 1}), (0.4, {0}), (1.0, {0, 1, 2})):
        drawn = SeededSampler(list(range(300)), 1.0, top_p)(torch.zeros(300, 1), scores).argmax(-1)
        assert set(drawn.tolist()) == allowed


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_draws_follow_the_tempered_distribution(temperature):
    """4000 rows, each its own generator: every token's share within 4 standard deviations of its probability."""
    rows, logits = 4000, torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    drawn = SeededSampler(list(range(rows)), temperature, 1.0)(torch.zeros(rows, 1), logits.repeat(rows, 1)).argmax(-1)
    expected = torch.softmax(logits / temperature, -1)
    shares = torch.bincount(drawn, minlength=4) / rows
    assert (shares - expected).abs().max() <= 4 * (expected * (1 - expected) / rows).sqrt().max()
    assert shares[3] == 0


def test_at_least_one_sample(model, tokenizer):
    with pytest.raises(UserError, match="at least one sample"):
        sample_responses(model, tokenizer, tokens(tokenizer), SamplingConfig(n=0))
