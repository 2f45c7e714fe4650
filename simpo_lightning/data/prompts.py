"""Prompts for sampling and online training: reading the distinct prompts of a source, and
``PromptDataModule``, which gives online methods (``online.OnlineModule``) batches of prompts to train on
and held-out preference pairs to measure on."""

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from simpo_lightning.data.datamodule import PreferenceDataModule
from simpo_lightning.data.encoding import Columns, Format, Truncation, encode_prompt, split_hh
from simpo_lightning.data.sources import DataError, Skip, Source

log = logging.getLogger(__name__)


@dataclass
class PromptRow:
    """A prompt to sample from: as the source gives it (text or messages), its reference answer, its tokens."""

    row: int
    prompt: str | list[dict[str, str]]
    reference: str | None
    tokens: list[int]

    @property
    def key(self) -> str:
        return hashlib.sha256(repr(self.tokens).encode()).hexdigest()[:16]


def read_prompts(
    source: str,
    tokenizer,
    columns: Columns = Columns(),
    max_prompt_length: int = 1024,
    skipped: Counter | None = None,
) -> list[PromptRow]:
    """The distinct prompts of a source (a preference file, a prompt file, ``demo``), in its order. Rows
    without a usable prompt, and prompts longer than ``max_prompt_length`` tokens, are skipped and counted
    (in ``skipped``, when given, by reason)."""
    prompts, seen, skipped = [], set(), skipped if skipped is not None else Counter()
    for number, row in Source(source).rows():
        prompt = prompt_of(row, columns) if isinstance(row, dict) else None
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            skipped["missing or empty prompt"] += 1
            continue
        if not isinstance(prompt, (str, list)):
            raise DataError(f"{source} row {number}: column {columns.prompt!r} must be text or messages")
        tokens = encode_prompt(tokenizer, prompt)
        if len(tokens) > max_prompt_length:
            skipped[f"prompt over {max_prompt_length} tokens"] += 1
            continue
        reference = row.get(columns.reference, row.get("output") if ALPACA_EVAL in row else None)
        item = PromptRow(number, prompt, reference if isinstance(reference, str) else None, tokens)
        if item.key not in seen:
            seen.add(item.key)
            prompts.append(item)
    for reason, count in skipped.items():
        log.warning("%s: skipped %d rows: %s", source, count, reason)
    if not prompts:
        raise DataError(f"{source}: no usable prompts ({dict(skipped)})")
    return prompts


ALPACA_EVAL = "instruction"  # AlpacaEval's prompt column (its reference answer is ``output``)


def prompt_of(row: dict, columns: Columns) -> str | list | None:
    """A row's prompt column (AlpacaEval's ``instruction`` where there is none), or for an HH-RLHF row (two whole
    dialogues) the dialogue they share."""
    if columns.prompt not in row and ALPACA_EVAL in row:
        return row[ALPACA_EVAL]
    if columns.prompt in row or not all(isinstance(row.get(c), str) for c in (columns.chosen, columns.rejected)):
        return row.get(columns.prompt)
    try:
        return split_hh(row[columns.chosen], row[columns.rejected])[0]
    except Skip:
        return None


@dataclass
class PromptBatch:
    """Prompts to sample from: token ids, as the source gives them (for the judge), reference answers."""

    tokens: list[list[int]]
    prompts: list[str | list[dict[str, str]]]
    references: list[str | None]

    def __len__(self) -> int:
        return len(self.tokens)


def collate_prompts(rows: list[PromptRow]) -> PromptBatch:
    return PromptBatch([r.tokens for r in rows], [r.prompt for r in rows], [r.reference for r in rows])


class PromptDataModule(PreferenceDataModule):
    """Training prompts for online methods, and held-out preference pairs to measure them on.

    Training batches hold ``batch_size`` distinct prompts of ``train_data`` per process (a preference file,
    a file with only a ``prompt`` column and optional ``reference`` answers, or ``demo``); prompts longer than
    ``truncation.max_prompt_length`` tokens are skipped and counted. Validation and test batches are the
    preference pairs of ``val_data`` / ``test_data`` as ``PreferenceDataModule`` gives them (reward accuracy;
    exact match where rows carry a reference answer; ``val_prompts``, their distinct prompts, for the judge's
    score of greedy answers); None: ``demo:val`` for the demo, else no validation.
    Every other argument is ``PreferenceDataModule``'s; its ``val_fraction`` and ``group_by_length`` have no part
    here (no prompt is held out of training, prompts are drawn at random).
    """

    def __init__(
        self,
        train_data: str | None = "demo",
        val_data: str | None = None,
        test_data: str | None = None,
        format: Format = "auto",
        columns: Columns = Columns(),
        truncation: Truncation = Truncation(),
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shared_prompt: bool = True,
        cache_dir: str | None = "~/.cache/simpo-lightning",
        num_proc: int = 1,
        prepare_data_per_node: bool = True,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__(
            train_data,
            val_data,
            test_data,
            format,
            columns,
            truncation,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            shared_prompt=shared_prompt,
            cache_dir=cache_dir,
            num_proc=num_proc,
            prepare_data_per_node=prepare_data_per_node,
            tokenizer=tokenizer,
        )

    def _sources(self) -> list[str]:
        hp = self.hparams
        val = hp.val_data or ("demo:val" if hp.train_data == "demo" else None)
        return [s for s in (val, hp.test_data) if s is not None]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        if self.tokenizer is None:
            raise ValueError("PromptDataModule needs a tokenizer (the command links it from the model)")
        self.prompts = read_prompts(
            hp.train_data, self.tokenizer, self.columns, self.truncation.max_prompt_length, self.skipped
        )
        sources = self._sources()
        build = self.trainer is None or self.trainer.world_size == 1
        loaded = {s: self._load(s, build) for s in sources}
        self.splits = {"train": self.prompts}
        self.val_prompts: list[PromptRow] = []
        if sources:
            self.val_prompts = read_prompts(sources[0], self.tokenizer, self.columns, self.truncation.max_prompt_length)
            val = loaded[sources[0]][0]
            self.splits |= {"val": val, "test": loaded[hp.test_data][0] if hp.test_data else val}
        log.info("online training: %d prompts; held-out pairs: %d", len(self.prompts), len(self.splits.get("val", [])))

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(len(self.prompts))
        return DataLoader(self.prompts, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test") if "test" in self.splits else []

    def generation_examples(self, split: str = "val", with_reference: bool = True):
        return super().generation_examples(split, with_reference) if split in self.splits else []
