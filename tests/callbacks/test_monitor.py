"""GenerationMonitor: what it logs during training is what the model answers at that point."""

from lightning.pytorch.loggers import CSVLogger

from simpo_lightning.callbacks.monitor import GenerationMonitor
from simpo_lightning.evaluation.comparison import response_stats
from simpo_lightning.generation.judges import CallableJudge

from helpers import demo_data, tiny_module, trainer


def test_the_monitor_logs_the_answers_of_the_start_and_of_each_validation(tiny_dir, tmp_path):
    module = tiny_module(tiny_dir)
    monitor = GenerationMonitor(max_prompts=4, max_new_tokens=6, judge=CallableJudge("helpers.shortest_wins"))
    logger = CSVLogger(tmp_path)
    run = trainer(max_steps=4, val_check_interval=2, callbacks=[monitor], logger=logger)
    run.fit(module, demo_data(module))
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    assert monitor.history[0]["win_rate_vs_start"] == 0.5  # the start against itself: all ties
    assert all(set(h) >= {"mean_chars", "distinct_2", "repeated_4gram", "hit_max_new_tokens"} for h in monitor.history)
    # The last entry is the trained model's greedy answers, measured again here.
    again = response_stats(list(monitor.answers(run, module).values()))
    assert {k: monitor.history[-1][k] for k in again} == again
    logged = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()
    assert "monitor/mean_chars" in logged and "monitor/win_rate_vs_start" in logged


def test_the_progress_bar_counts_a_step_bounded_run_without_a_negative_epoch(tiny_dir):
    """Lightning sets max_epochs to -1 for a run bounded by max_steps; its own bar then reads "Epoch 0/-2"."""
    from lightning.pytorch.callbacks import RichProgressBar

    from simpo_lightning.callbacks import ProgressBar

    module = tiny_module(tiny_dir)
    bar = ProgressBar()
    run = trainer(max_steps=2, callbacks=[bar], enable_progress_bar=True, limit_val_batches=0)
    run.fit(module, demo_data(module))
    assert run.max_epochs == -1 and bar._get_train_description(0).strip() == "Epoch 0 · max_steps 2"
    plain = RichProgressBar()
    plain._trainer = run
    assert plain._get_train_description(0).strip() == "Epoch 0/-2"  # what it replaces
