"""Callbacks for any training module: held-out metrics before and after training (``heldout``), peak memory and
freed memory returned on CPU (``memory``), sample answers during training and the progress bar (``monitor``), and
the preference data's diagnostics (``diagnostics``)."""

from simpo_lightning.callbacks.diagnostics import PreferenceDiagnostics
from simpo_lightning.callbacks.heldout import HeldOutReport, reward_metrics
from simpo_lightning.callbacks.memory import PeakMemory, ReturnFreedMemory, return_freed_memory
from simpo_lightning.callbacks.monitor import GenerationMonitor, ProgressBar

__all__ = [
    "GenerationMonitor",
    "HeldOutReport",
    "PeakMemory",
    "PreferenceDiagnostics",
    "ProgressBar",
    "ReturnFreedMemory",
    "return_freed_memory",
    "reward_metrics",
]
