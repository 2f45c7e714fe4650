"""Are the answers better? Win rates, length control and answer statistics (``comparison``), and the
``evaluate`` command (``evaluate``)."""

from simpo_lightning.evaluation.comparison import judge_outcomes, length_controlled_win_rate, response_stats, win_rate
from simpo_lightning.evaluation.evaluate import evaluate

__all__ = ["evaluate", "judge_outcomes", "length_controlled_win_rate", "response_stats", "win_rate"]
