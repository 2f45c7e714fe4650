"""generate and pairs: prompts read and counted, outputs resumed without repeats, pairs of the best and
the worst, ties and identical samples dropped, and a pair file that fit reads as it is."""

import pytest

from simpo_lightning.cli import main
from simpo_lightning.data import PreferenceDataModule
from simpo_lightning.errors import UserError
from simpo_lightning.generation.commands import pairs, read_jsonl
from simpo_lightning.generation.judges import CallableJudge, RuleJudge

from helpers import run_command, write_jsonl

PROMPTS = [{"prompt": f"Question {i}: " + "more words " * i, "reference": f"answer {i}"} for i in range(5)]


def generate_args(tiny_dir: str, prompts, output, *extra: str) -> list[str]:
    return [
        "generate",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--model",
        tiny_dir,
        "--sampling.n",
        "2",
        "--sampling.max_new_tokens",
        "4",
        "--sampling.temperature",
        "1.0",
        "--progress",
        "false",
        *extra,
    ]


def test_generate_resumes_after_an_interruption_without_repeats(tiny_dir, tmp_path, caplog):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [*PROMPTS, {"prompt": ""}, {"reference": "no prompt"}, PROMPTS[0]]
    )
    out = tmp_path / "generations.jsonl"
    main(generate_args(tiny_dir, prompts, out))
    whole = read_jsonl(out)
    assert [r["row"] for r in whole] == [1, 2, 3, 4, 5]  # the empty, missing and repeated prompts: skipped
    assert "skipped 2 rows: missing or empty prompt" in caplog.text
    assert all(len(r["responses"]) == 2 and len(r["finish_reasons"]) == 2 for r in whole)
    assert whole[0]["settings"]["n"] == 2 and whole[0]["reference"] == "answer 0"
    lines = out.read_text().splitlines(keepends=True)  # interrupted: two prompts done, the third cut off mid-line
    out.write_text("".join(lines[:2]) + lines[2][:20])
    main(generate_args(tiny_dir, prompts, out))
    assert read_jsonl(out) == whole  # the same samples: each depends on its prompt, index and seed alone


def test_pairs_keep_the_best_and_the_worst_and_drop_ties(tmp_path, tokenizer):
    rows = [
        {"prompt": "Q1", "reference": "x", "responses": ["aa", "a", "aaaa"], "response_tokens": [2, 1, 4]},
        {"prompt": "Q2", "reference": "y", "responses": ["same", "same"], "response_tokens": [1, 1]},
        {"prompt": "Q3", "reference": "z", "responses": ["bb", "cc"], "response_tokens": [2, 2]},
        {
            "prompt": [{"role": "user", "content": "Q4"}],
            "reference": None,
            "responses": ["dd", "e"],
            "response_tokens": [2, 1],
        },
    ]
    generations = write_jsonl(tmp_path / "generations.jsonl", rows)
    summary = pairs(str(generations), str(tmp_path / "pairs.jsonl"), CallableJudge("helpers.shortest_wins"))
    kept = read_jsonl(tmp_path / "pairs.jsonl")
    assert summary["pairs"] == 2 and summary["identical responses"] == 1 and summary["tied scores"] == 1
    assert (kept[0]["chosen"], kept[0]["rejected"], kept[0]["chosen_score"], kept[0]["rejected_tokens"]) == (
        "a",
        "aaaa",
        -1.0,
        4,
    )
    assert kept[1]["chosen"] == [{"role": "assistant", "content": "e"}]  # conversational prompt, assistant messages
    write_jsonl(tmp_path / "standard.jsonl", kept[:1] * 4)
    write_jsonl(tmp_path / "chat.jsonl", kept[1:] * 4)
    for name in ("standard", "chat"):  # fit reads them as they are
        data = PreferenceDataModule(
            train_data=str(tmp_path / f"{name}.jsonl"), val_fraction=0.25, cache_dir=None, tokenizer=tokenizer
        )
        data.setup()
        assert len(data.splits["train"]) == 3


def test_pairs_need_two_samples_and_a_preference(tmp_path):
    one = write_jsonl(
        tmp_path / "one.jsonl", [{"prompt": "Q", "reference": "x", "responses": ["a"], "response_tokens": [1]}]
    )
    with pytest.raises(UserError, match="at least 2 responses"):
        pairs(str(one), str(tmp_path / "pairs.jsonl"), RuleJudge())


@pytest.mark.slow
def test_two_processes_split_the_prompts_and_merge_what_one_writes(tiny_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    main(generate_args(tiny_dir, prompts, tmp_path / "one.jsonl"))
    run_command(
        [*generate_args(tiny_dir, prompts, tmp_path / "two.jsonl"), "--devices", "2", "--accelerator", "cpu"], tmp_path
    )
    assert read_jsonl(tmp_path / "two.jsonl") == read_jsonl(tmp_path / "one.jsonl")
    assert not list(tmp_path.glob("two.jsonl.part*"))
