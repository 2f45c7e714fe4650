"""Preference data: sources (``sources``), row formats and tokenisation (``encoding``), collation and
sampling (``collate``) and the DataModule (``datamodule``)."""

from simpo_lightning.data.collate import GlobalBatchSampler, PreferenceCollator, example_length, pack_pairs
from simpo_lightning.data.datamodule import PreferenceDataModule
from simpo_lightning.data.encoding import (
    Columns,
    PairEncoder,
    Truncation,
    encode_rows,
    row_format,
    tokenizer_fingerprint,
)
from simpo_lightning.data.sources import FILE_SUFFIXES, DataError, Skip, read_source

__all__ = [
    "FILE_SUFFIXES",
    "Columns",
    "DataError",
    "GlobalBatchSampler",
    "PairEncoder",
    "PreferenceCollator",
    "PreferenceDataModule",
    "Skip",
    "Truncation",
    "encode_rows",
    "example_length",
    "pack_pairs",
    "read_source",
    "row_format",
    "tokenizer_fingerprint",
]
