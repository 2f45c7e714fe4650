"""evaluate: pairwise judging in both orders, a model against itself and against the references, and the
files a run writes (the statistics themselves: test_comparison.py)."""

import json
from pathlib import Path

import pytest

from simpo_lightning.cli import main
from simpo_lightning.errors import UserError
from simpo_lightning.evaluation.evaluate import evaluate
from simpo_lightning.generation.judges import CallableJudge, CallablePairwiseJudge
from simpo_lightning.generation.sampling import SamplingConfig

from helpers import write_jsonl


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


def test_alpaca_eval_prompts_in_and_model_outputs_out(tiny_dir, tmp_path):
    """A prompt file in AlpacaEval's shape (a JSON list: instruction, output, generator, dataset) is read by its
    ``instruction``, its ``output`` serving as the reference; each side's answers come out as AlpacaEval's
    ``model_outputs.json`` (instruction, output, generator, dataset), which ``alpaca_eval --model_outputs`` reads."""
    rows = [
        {
            "instruction": f"Name a colour ({i}).",
            "output": "red",
            "generator": "gpt4_1106_preview",
            "dataset": f"set{i % 2}",
        }
        for i in range(4)
    ]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(rows))
    out = tmp_path / "eval"
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=3)
    evaluate([f"tiny={tiny_dir}"], str(tmp_path / "alpaca_eval.json"), tiny_dir, None, sampling, str(out))
    for generator in ("tiny", Path(tiny_dir).name):
        outputs = json.loads((out / "alpaca_eval" / generator / "model_outputs.json").read_text())
        assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 4
        assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]
        assert [o["dataset"] for o in outputs] == [r["dataset"] for r in rows]
        assert all(o["generator"] == generator and isinstance(o["output"], str) for o in outputs)
    per_prompt = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in per_prompt] == ["red"] * 4  # AlpacaEval's output as the reference answer
