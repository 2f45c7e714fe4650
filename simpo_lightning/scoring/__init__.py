"""Scoring responses with a causal LM: log-probabilities of label tokens and the chunked output head
(``logprobs``), and the sums over each response of sequences, shared-prompt pairs and packed completions
(``sequences``)."""

from simpo_lightning.scoring.logprobs import at_least_float32, label_logps, sequence_logps, token_logps
from simpo_lightning.scoring.sequences import (
    Scores,
    pack_completions,
    score_completions,
    score_packed,
    score_pair_batch,
    score_sequences,
)

__all__ = [
    "Scores",
    "at_least_float32",
    "label_logps",
    "pack_completions",
    "score_completions",
    "score_packed",
    "score_pair_batch",
    "score_sequences",
    "sequence_logps",
    "token_logps",
]
