"""Data, read in order: sources (``sources``), row formats and tokenisation (``encoding``), tokenised stores
(``store``), the batch types (``batch``), collation and sampling (``collate``), the DataModule (``datamodule``),
prompts for online methods (``prompts``), and the built-in demo task (``demo``)."""

from simpo_lightning.data.batch import IGNORE_INDEX, PackedPairs, PairBatch, Sequences, UnpairedBatch, pad_right
from simpo_lightning.data.collate import (
    GlobalBatchSampler,
    PackedSampler,
    PreferenceCollator,
    TaggedRows,
    first_fit,
    pack_pairs,
)
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
    "IGNORE_INDEX",
    "PackedPairs",
    "PairBatch",
    "Sequences",
    "UnpairedBatch",
    "pad_right",
    "Columns",
    "DataError",
    "GlobalBatchSampler",
    "PackedSampler",
    "PairEncoder",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PromptBatch",
    "PromptDataModule",
    "PromptRow",
    "Skip",
    "Source",
    "TaggedRows",
    "Truncation",
    "encode_rows",
    "first_fit",
    "pack_pairs",
    "read_prompts",
    "read_source",
    "row_format",
    "tokenizer_fingerprint",
]
