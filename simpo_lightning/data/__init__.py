"""Preference data: sources (``sources``), row formats and tokenisation (``encoding``), collation and
sampling (``collate``), the DataModule (``datamodule``) and prompts for online methods (``prompts``)."""

from simpo_lightning.data.collate import GlobalBatchSampler, PreferenceCollator, pack_pairs
from simpo_lightning.data.datamodule import PreferenceDataModule
from simpo_lightning.data.encoding import (
    Columns,
    PairEncoder,
    Truncation,
    encode_rows,
    row_format,
    tokenizer_fingerprint,
)
from simpo_lightning.data.prompts import PromptBatch, PromptDataModule, PromptRow, read_prompts
from simpo_lightning.data.sources import FILE_SUFFIXES, DataError, Skip, Source, read_source

__all__ = [
    "FILE_SUFFIXES",
    "Columns",
    "DataError",
    "GlobalBatchSampler",
    "PairEncoder",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PromptBatch",
    "PromptDataModule",
    "PromptRow",
    "Skip",
    "Source",
    "Truncation",
    "encode_rows",
    "pack_pairs",
    "read_prompts",
    "read_source",
    "row_format",
    "tokenizer_fingerprint",
]
