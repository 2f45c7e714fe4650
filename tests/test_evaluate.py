"""evaluate: the win rate and its interval, the length-controlled win rate against a regression whose answer
is known by construction, length and repetition statistics of hand-written strings, pairwise judging in
both orders, and the files a run writes."""

import json
import math

import pytest
import torch

from simpo_lightning.cli import main
from simpo_lightning.errors import UserError
from simpo_lightning.evaluate import evaluate, length_controlled_win_rate, repetition, response_stats, win_rate
from simpo_lightning.generation import SamplingConfig
from simpo_lightning.judges import CallableJudge, CallablePairwiseJudge

from helpers import assert_rounding_close, write_jsonl


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


def first_shown_wins(prompts, first, second):
    """A judge with nothing but position bias."""
    return [1.0] * len(first)


def shorter_with_position_bias(prompts, first, second):
    """Prefers the shorter answer, and the first shown: 0.9 / 0.3 when the first is shorter / longer, 0.6 on a tie."""
    return [0.9 if len(a) < len(b) else 0.3 if len(a) > len(b) else 0.6 for a, b in zip(first, second)]


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"Question {i}:" + " and" * (i % 3), "reference": "yes"} for i in range(12)]
    return str(write_jsonl(tmp_path / "prompts.jsonl", rows))


def test_pairwise_judges_see_both_orders(tiny_dir, prompts, tmp_path):
    sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=6)
    common = dict(prompts=prompts, baseline=tiny_dir, sampling=sampling, output_dir=str(tmp_path / "eval"))
    (biased,) = evaluate([tiny_dir], judge=CallablePairwiseJudge("test_evaluate.first_shown_wins"), **common)
    assert biased["win_rate"] == 0.5  # position bias alone cancels
    (result,) = evaluate([tiny_dir], judge=CallablePairwiseJudge("test_evaluate.shorter_with_position_bias"), **common)
    rows = [json.loads(line) for line in (tmp_path / "eval/per_prompt.jsonl").read_text().splitlines()]
    expected = []
    for row in rows:
        ours, theirs = len(row["candidate_responses"][0]), len(row["baseline_responses"][0])
        expected.append((0.9 + 1 - 0.3) / 2 if ours < theirs else (0.3 + 1 - 0.9) / 2 if ours > theirs else 0.5)
    assert [r["outcome"] for r in rows] == expected and len(set(expected)) > 1
    assert result["win_rate"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_a_model_against_itself_with_sampling_is_a_coin_and_the_reference_always_wins(tiny_dir, prompts, tmp_path):
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6)
    judge = CallableJudge("helpers.shortest_wins")
    (itself,) = evaluate([tiny_dir], prompts, tiny_dir, judge, sampling, str(tmp_path / "self"))
    assert itself["win_rate_low"] <= 0.5 <= itself["win_rate_high"] and itself["win_rate"] != 0.5
    (right,) = evaluate(["reference"], prompts, tiny_dir, None, sampling, str(tmp_path / "right"))  # RuleJudge
    assert (right["win_rate"], right["win_rate_low"], right["lc_win_rate"]) == (1.0, 1.0, 1.0)
    assert right["candidate_stats"]["mean_chars"] == 3  # "yes"
    with pytest.raises(UserError, match="both the baseline and a candidate"):
        evaluate(["reference"], prompts, "reference", None, sampling, str(tmp_path / "no"))


def test_the_command_writes_table_jsonl_and_picture(tiny_dir, prompts, tmp_path):
    out = tmp_path / "eval"
    main(
        [
            "evaluate",
            "--candidates",
            json.dumps([f"tiny={tiny_dir}"]),
            "--prompts",
            prompts,
            "--baseline",
            "reference",
            "--sampling.max_new_tokens",
            "4",
            "--output_dir",
            str(out),
        ]
    )
    table = (out / "results.md").read_text()
    assert "| win rate [95% CI] |" in table and "Baseline: reference." in table and "prompts/s" in table
    assert "\n| tiny | 12 |" in table  # named NAME=SOURCE
    assert len((out / "per_prompt.jsonl").read_text().splitlines()) == 12
    assert (out / "win_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert result["win_rate"] == 0.0  # a random tiny model against the right answers
