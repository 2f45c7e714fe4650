"""Answers and their judges: seeded, batched sampling (``sampling``), judges that score answers (``judges``), and
the ``generate`` and ``pairs`` commands that make on-policy preference pairs (``commands``)."""

from simpo_lightning.generation.commands import generate, pairs, read_jsonl
from simpo_lightning.generation.judges import (
    CallableJudge,
    CallablePairwiseJudge,
    Judge,
    NumberJudge,
    PairwiseJudge,
    RewardModelJudge,
    RuleJudge,
)
from simpo_lightning.generation.sampling import (
    Sample,
    SamplingConfig,
    derived_seed,
    greedy_answers,
    sample_responses,
    sample_seed,
)

__all__ = [
    "CallableJudge",
    "CallablePairwiseJudge",
    "Judge",
    "PairwiseJudge",
    "RewardModelJudge",
    "NumberJudge",
    "RuleJudge",
    "Sample",
    "SamplingConfig",
    "derived_seed",
    "generate",
    "greedy_answers",
    "pairs",
    "read_jsonl",
    "sample_responses",
    "sample_seed",
]
