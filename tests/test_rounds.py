"""rounds: generate, pair, fit, round after round, each stage skipped when it is done."""

import pytest

from simpo_lightning.generation.commands import read_jsonl
from simpo_lightning.rounds import rounds

from helpers import ROOT, tiny_model_args, wandb_history, write_jsonl


@pytest.mark.slow
def test_rounds_train_from_the_previous_round_and_skip_finished_stages(tiny_dir, tmp_path):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"Question {i}:" + " word" * i, "reference": f"answer {i}"} for i in range(6)],
    )
    tiny = [*tiny_model_args(tiny_dir), "--data.cache_dir", "null", "--data.batch_size", "2"]
    val = write_jsonl(
        tmp_path / "val.jsonl",
        [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no no", "reference": "yes"} for i in range(4)],
    )
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    common = dict(
        fit_config=str(ROOT / "configs/testing/tiny.yaml"),
        prompts=str(prompts),
        val_data=str(val),
        fit_args=tiny + steps,
        run_dir=str(tmp_path / "runs"),
        name="test",
    )
    from simpo_lightning.generation.judges import CallableJudge
    from simpo_lightning.generation.sampling import SamplingConfig

    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=4)
    judge = CallableJudge("helpers.shortest_wins")
    first = rounds(rounds=1, judge=judge, sampling=sampling, **common)
    home = tmp_path / "runs/test"
    stamps = {p: p.stat().st_mtime_ns for p in (home / "round-1").rglob("*") if p.is_file()}
    both = rounds(rounds=2, judge=judge, sampling=sampling, **common)
    assert both[0] == first[0]  # round 1 was read, not done again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if "wandb" not in p.parts)
    assert both[1]["pairs"] > 0 and (home / "round-2/fit/checkpoints/last.ckpt").is_file()
    # round 2 sampled from and started from round 1's trained weights: its held-out "before" is round 1's "after"
    assert both[1]["heldout"]["before"] == both[0]["heldout"]["after"] != both[0]["heldout"]["before"]
    # round 1 sampled from the model its fit trained (fit_args applied to the fit config), not the config's own
    assert read_jsonl(home / "round-1/generations.jsonl")[0]["settings"]["model"] == tiny_dir
    generated = read_jsonl(home / "round-2/generations.jsonl")
    assert generated[0]["settings"]["model"] == str(home / "round-1/fit/checkpoints/last.ckpt")
    # W&B (offline): one run per round's fit and one for the rounds, each a run of its own in one group.
    runs = sorted(home.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 4  # round 1's fit, the first call's rounds run, round 2's fit, the second call's rounds run
    histories = [wandb_history(path) for path in runs]
    rounds_runs = [(h, c) for h, c in histories if "kept_share" in h]
    fit_runs = [(h, c) for h, c in histories if "train/loss" in h]
    assert len(rounds_runs) == 2 and len(fit_runs) == 2
    assert rounds_runs[-1][0]["round"] == 2 and rounds_runs[-1][0]["samples/_type"] == "table-file"
    assert all("kept_share" not in h for h, _ in fit_runs)  # no run was reused by the next
