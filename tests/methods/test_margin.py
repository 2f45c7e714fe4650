"""gamma_beta_ratio auto and adaptive: the rules by hand-computed values, auto against a slow reference
scorer, both kept in checkpoints so a resumed run continues exactly."""

import csv

import pytest
import torch

from simpo_lightning.cli import cli_main
from simpo_lightning.errors import UserError
from simpo_lightning.losses.config import LossConfig
from simpo_lightning.methods.margin import (
    Margin,
    adaptive_gamma_beta_ratio,
    auto_gamma_beta_ratio,
    gap_summary,
    margin_of,
)
from simpo_lightning.models.loading import PolicyConfig, build_policy

from helpers import assert_rounding_close, csv_losses, demo_data, slow_reference, tiny_args, tiny_module, trainer


def test_auto_is_the_clamped_median_of_the_absolute_gaps():
    gaps = torch.tensor([-0.3, 0.1, 0.5, -1.2, 4.0], dtype=torch.float64)  # |Δ| sorted: 0.1 0.3 0.5 1.2 4.0
    assert auto_gamma_beta_ratio(gaps) == 0.5 and auto_gamma_beta_ratio(gaps, max_ratio=0.4) == 0.4
    assert auto_gamma_beta_ratio(torch.tensor([0.2, -0.6, 1.0, -0.1])) == pytest.approx(0.2)  # even: lower middle
    summary = gap_summary(gaps)
    assert summary["share_positive"] == 0.6 and summary["mean_gap"] == pytest.approx(3.1 / 5)


def test_the_adaptive_margin_by_hand():
    margin = Margin("adaptive", max_ratio=2.0, decay=0.5, spread=1.0)
    assert margin.ratio() == 0.0  # no batch seen yet
    # batch 1: mean Δ 0.2, mean Δ² 0.08 -> moments 0.5 * (0.2, 0.08) = (0.1, 0.04); corrected by 1 - 0.5:
    # mean 0.2, E Δ² 0.08, variance 0.04, spread 0.2 -> 0.2 + 1 * 0.2
    margin.observe(torch.tensor([0.2, 0.08]))
    assert margin.ratio() == pytest.approx(0.4)
    # batch 2: mean 0.6, E Δ² 0.4 -> moments (0.05 + 0.3, 0.02 + 0.2) = (0.35, 0.22); corrected by 1 - 0.25:
    # mean 0.46667, E Δ² 0.29333, variance 0.29333 - 0.21778 = 0.07556, spread 0.27487
    margin.observe(torch.tensor([0.6, 0.4]))
    assert margin.ratio() == pytest.approx(0.46667 + 0.27487, abs=1e-5) and int(margin.steps) == 2
    # clamped at 0 (a negative running gap) and at max_ratio
    assert adaptive_gamma_beta_ratio(torch.tensor([-0.15, 0.1]), steps=1, decay=0.5) == 0.0
    assert adaptive_gamma_beta_ratio(torch.tensor([1.5, 4.5]), steps=1, decay=0.5, max_ratio=2.0) == 2.0
    with pytest.raises(UserError, match="margin_decay"):
        Margin("adaptive", max_ratio=2.0, decay=1.0, spread=0.0)


def test_only_methods_with_a_margin_take_it(caplog):
    assert margin_of(LossConfig(name="simpo", gamma_beta_ratio="adaptive")).mode == "adaptive"
    assert "gamma_beta_ratio" not in LossConfig(name="simpo", gamma_beta_ratio="auto").hparams()
    assert margin_of(LossConfig(name="dpo", gamma_beta_ratio="auto")) is None
    LossConfig(name="dpo", gamma_beta_ratio="auto").hparams()
    assert "loss.gamma_beta_ratio = 'auto' is ignored" in caplog.text


def logged(metrics_csv, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in csv.DictReader(metrics_csv.open()) if r.get(key)}


def test_auto_is_set_once_from_the_initial_policy_and_kept_through_resume(tiny_dir, tokenizer, tmp_path):
    """The value is the median |Δ| of the sampled training pairs as a slow float64 scorer computes them with
    the untrained model; a resumed run with other auto settings keeps the checkpoint's value."""
    args = tiny_args(tiny_dir, tmp_path, "--model.loss.gamma_beta_ratio", "auto", "--model.loss.auto_pairs", "12")
    cli = cli_main(["fit", *args, "--trainer.max_steps", "2"])
    saved = torch.load(tmp_path / "run/version_0/checkpoints/last.ckpt", weights_only=True)
    value = saved["state_dict"]["margin.value"].item()
    rows = cli.datamodule.splits["train"]
    picked = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:12].tolist()
    model = build_policy(PolicyConfig(name_or_path=tiny_dir), None).double()
    with torch.no_grad():
        gaps = torch.tensor(
            [
                slow_reference(model, p["prompt"], p["chosen"]) - slow_reference(model, p["prompt"], p["rejected"])
                for p in rows.select(picked)
            ],
            dtype=torch.float64,
        )
    assert_rounding_close(value, gaps.abs().median(), reduction=tokenizer.vocab_size)
    assert set(logged(tmp_path / "run/version_0/metrics.csv", "train/gamma_beta_ratio").values()) == {value}
    # Resumed with 3 sampled pairs, whose median differs: the checkpoint's value is kept, not recomputed.
    assert gaps[:3].abs().median().item() != pytest.approx(value, rel=1e-3)
    resume = tiny_args(tiny_dir, tmp_path, "--model.loss.gamma_beta_ratio", "auto", "--model.loss.auto_pairs", "3")
    cli_main(["fit", *resume, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert set(logged(tmp_path / "run/version_1/metrics.csv", "train/gamma_beta_ratio").values()) == {value}


def test_adaptive_margin_resumes_exactly(tiny_dir, tmp_path):
    steps = [
        "--model.loss.gamma_beta_ratio",
        "adaptive",
        "--trainer.max_steps",
        "6",
        "--trainer.log_every_n_steps",
        "1",
    ]
    cli_main(["fit", *tiny_args(tiny_dir, tmp_path / "straight", *steps)])
    straight = csv_losses(tmp_path / "straight/run/version_0/metrics.csv")
    margins = logged(tmp_path / "straight/run/version_0/metrics.csv", "train/gamma_beta_ratio")
    assert margins[0] == 0.0 and len(set(margins.values())) == 6  # it moves every step
    interrupted = tmp_path / "interrupted"
    stop = '{"class_path": "helpers.Interrupt", "init_args": {"step": 3}}'
    with pytest.raises(SystemExit):
        cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--trainer.callbacks+", stop])
    cli_main(["fit", *tiny_args(tiny_dir, interrupted, *steps), "--ckpt_path", "last"])
    resumed = csv_losses(interrupted / "run/version_1/metrics.csv")
    assert sorted(resumed) == [2, 3, 4, 5] and all(resumed[s] == straight[s] for s in resumed)
    assert logged(interrupted / "run/version_1/metrics.csv", "train/gamma_beta_ratio") == {
        s: margins[s] for s in resumed
    }


def test_validating_an_auto_margin_that_no_fit_set_is_a_user_error(tiny_dir):
    module = tiny_module(tiny_dir, loss=LossConfig(gamma_beta_ratio="auto"))
    with pytest.raises(UserError, match="set when fit starts"):
        trainer().validate(module, demo_data(module))
