"""comparison: the win rate and its interval, the length-controlled win rate against a regression whose
answer is known by construction, length and repetition statistics of hand-written strings."""

import math

import torch

from simpo_lightning.evaluation.comparison import length_controlled_win_rate, repetition, response_stats, win_rate

from helpers import assert_rounding_close


def test_the_length_controlled_win_rate_is_the_regressions_intercept():
    """Outcomes set to exactly σ(a + b·tanh(Δ/sd(Δ))) are fitted exactly (soft targets): the rate is σ(a)."""
    delta = torch.tensor([-300.0, -120, -40, -5, 0, 10, 35, 80, 150, 260, 400, -60], dtype=torch.float64)
    a, b = 0.4, 1.3
    x = torch.tanh(delta / delta.std())  # the sample standard deviation, as documented
    outcomes = torch.sigmoid(a + b * x)
    rate, how = length_controlled_win_rate(outcomes, delta)
    assert_rounding_close(rate, 1 / (1 + math.exp(-a)), reduction=len(delta), dtype=torch.float64)
    assert "intercept 0.400, slope 1.300" in how
    # Longer answers winning more (b > 0) with the candidate longer on average: the raw rate is higher.
    assert outcomes.mean() > rate


def test_the_length_controlled_win_rate_says_when_it_cannot_be_fitted():
    assert length_controlled_win_rate(torch.ones(5), torch.arange(5.0))[0] is None  # too few prompts
    rate, how = length_controlled_win_rate(torch.tensor([1.0, 0.0] * 6), torch.zeros(12))
    assert rate is None and "same length difference" in how
    delta = torch.arange(12.0) - 6  # longer always wins: length separates the outcomes
    rate, how = length_controlled_win_rate((delta > 0).double(), delta)
    assert rate is None and "separates" in how
    # always shorter, the longer of them winning more: no pair at equal length or beyond, no intercept to trust
    delta = -torch.arange(20.0, 32.0)
    rate, how = length_controlled_win_rate(torch.tensor([1.0, 0.0, 0.5] * 4), delta)
    assert rate is None and "every candidate answer is shorter" in how


def test_the_win_rate_interval_is_a_seeded_bootstrap():
    outcomes = torch.tensor([1.0, 0.0, 0.5, 1.0] * 10)
    result = win_rate(outcomes, resamples=500, seed=3)
    assert result["win_rate"] == 0.625 and result["win_rate_low"] < 0.625 < result["win_rate_high"]
    assert win_rate(outcomes, resamples=500, seed=3) == result != win_rate(outcomes, resamples=500, seed=4)
    assert win_rate(torch.ones(8))["win_rate_low"] == 1.0


def test_length_and_repetition_statistics_of_hand_written_answers():
    texts = ["the cat sat on the mat", "a b c d a b c d", "Paris", "the cat sat"]
    # repeated 4-gram: only "a b c d a b c d"; bigrams: 5 + 7 + 0 + 2 = 14, distinct: 5 + 4 ("a b", "b c",
    # "c d", "d a") + 0 + 0 ("the cat", "cat sat" already seen) = 9
    assert repetition(texts) == {"repeated_4gram": 0.25, "distinct_2": 9 / 14}
    rows = [
        {"responses": texts[:2], "response_tokens": [6, 8], "finish_reasons": ["stop", "length"]},
        {"responses": texts[2:], "response_tokens": [1, 3], "finish_reasons": ["stop", "stop"]},
    ]
    stats = response_stats(rows)
    assert stats["mean_chars"] == (22 + 15 + 5 + 11) / 4 and stats["median_chars"] == 11  # torch: the lower middle
    assert stats["mean_tokens"] == 4.5 and stats["hit_max_new_tokens"] == 0.25
