"""Diagnostics over the whole validation set, the displacement and collapse warnings, the scatter."""

import csv
import logging
import statistics

import pytest
import torch

from simpo_lightning import SimPOModule
from simpo_lightning.callbacks.diagnostics import PreferenceDiagnostics, collapse, displaced, length_diagnostics
from simpo_lightning.models.loading import PolicyConfig

from helpers import demo_data, tiny_module, trainer


def test_length_diagnostics_by_hand():
    margins = torch.tensor([1.0, -1.0, 2.0, 0.5])
    chosen, rejected = torch.tensor([5, 3, 8, 4]), torch.tensor([3, 5, 2, 4])  # differences 2, -2, 6, 0
    values = length_diagnostics(margins, chosen, rejected)
    assert values["margin_length_correlation"] == pytest.approx(statistics.correlation([1, -1, 2, 0.5], [2, -2, 6, 0]))
    assert values["chosen_longer_share"] == 0.5
    assert values["accuracy_chosen_longer"] == 1.0 and values["accuracy_chosen_shorter"] == 0.0
    assert values["accuracy_same_length"] == 1.0
    constant = length_diagnostics(margins, torch.tensor([4, 4, 4, 4]), torch.tensor([2, 2, 2, 2]))
    assert constant["accuracy_chosen_shorter"] != constant["accuracy_chosen_shorter"]  # NaN: no such pairs
    assert constant["margin_length_correlation"] != constant["margin_length_correlation"]  # NaN: constant difference


def test_displacement_is_falling_chosen_log_probs_with_rising_margins():
    curve = [(-1.0, 0.1), (-1.1, 0.2), (-1.3, 0.5)]
    assert displaced(curve, patience=2) and not displaced(curve[:2], patience=2)
    assert not displaced([(-1.0, 0.1), (-1.1, 0.2), (-1.05, 0.5)], patience=2)  # chosen rose once
    assert not displaced([(-1.0, 0.1), (-1.1, 0.3), (-1.3, 0.2)], patience=2)  # margin fell once
    assert displaced([(-0.9, 0.4), *curve], patience=2)  # the last two steps count


def test_collapse_rules():
    uniform = -torch.log(torch.tensor(100.0)).item()
    assert "same probability" in collapse(torch.full((4,), uniform + 0.01), torch.full((4,), uniform), 100, 0.05)
    assert "same log-prob" in collapse(torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0]), 100, 0.05)
    assert collapse(torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -3.0]), 100, 0.05) is None


def test_a_uniform_model_warns_collapse_and_stops(tiny_dir, caplog):
    """The tiny model with its output head zeroed gives every token the same probability; a learning rate of
    1e-12 keeps it so. The first validation warns (once) and, with stop_on, ends training."""
    module = SimPOModule(
        policy=PolicyConfig(name_or_path=tiny_dir), lora=None, optimizer=lambda p: torch.optim.SGD(p, lr=1e-12)
    )
    module.configure_model()
    torch.nn.init.zeros_(module.model.get_output_embeddings().weight)
    diagnostics = PreferenceDiagnostics(stop_on=["collapse"], scatter=False)
    fit = trainer(max_steps=5, val_check_interval=1, limit_val_batches=None, callbacks=[diagnostics])
    with caplog.at_level(logging.WARNING, logger="simpo_lightning.callbacks.diagnostics"):
        fit.fit(module, demo_data(module))
    assert fit.global_step == 1 and "within 0.05 of -log V" in diagnostics.warned["collapse"]
    assert caplog.text.count("collapse:") == 1 and "stopping" in caplog.text


def test_a_healthy_run_logs_diagnostics_over_every_validation_pair(tiny_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = tiny_module(tiny_dir)
    data = demo_data(module)
    diagnostics = PreferenceDiagnostics()
    fit = trainer(
        max_steps=2,
        val_check_interval=1,
        limit_val_batches=None,
        callbacks=[diagnostics],
        logger=CSVLogger(tmp_path, name="run"),
    )
    fit.fit(module, data)
    assert len(diagnostics.last["rewards/margins"]) == len(data.splits["val"]) and not diagnostics.warned
    rows = [
        r
        for r in csv.DictReader((tmp_path / "run/version_0/metrics.csv").open())
        if r.get("diagnostics/chosen_longer_share")
    ]
    difference = (diagnostics.last["lengths/chosen"] - diagnostics.last["lengths/rejected"]).tolist()
    assert len(rows) == 2 and float(rows[-1]["diagnostics/margin_length_correlation"]) == pytest.approx(
        statistics.correlation(diagnostics.last["rewards/margins"].tolist(), difference), rel=1e-5
    )
    assert float(rows[-1]["diagnostics/chosen_longer_share"]) == pytest.approx(
        sum(d > 0 for d in difference) / len(difference)
    )
    assert (tmp_path / "run/version_0/margin_vs_length.png").stat().st_size > 1000


def test_a_displacement_curve_warns_through_the_callback(tiny_dir, caplog):
    """Two earlier validations restored from a checkpoint's callback state (chosen log-probs above any real
    one, margins below), then a real validation: the chosen log-prob fell and the margin rose twice in a row."""
    module = tiny_module(tiny_dir)
    diagnostics = PreferenceDiagnostics(scatter=False)
    diagnostics.load_state_dict({"history": [(10.0, -1e9), (5.0, -1e8)], "warned": {}})
    with caplog.at_level(logging.WARNING, logger="simpo_lightning.callbacks.diagnostics"):
        trainer(limit_val_batches=None, callbacks=[diagnostics]).validate(module, demo_data(module))
    assert "likelihood displacement" in diagnostics.warned["displacement"] and "collapse" not in diagnostics.warned
    assert caplog.text.count("likelihood displacement") == 1 and len(diagnostics.history) == 3
