"""PreferenceDataModule: the training, validation and test splits of preference data."""

import hashlib
import logging
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from simpo_lightning.data.collate import GlobalBatchSampler, PreferenceCollator, example_length
from simpo_lightning.data.encoding import Columns, Format, PairEncoder, Truncation, encode_rows, tokenizer_fingerprint
from simpo_lightning.data.sources import FILE_SUFFIXES, DataError, read_source

log = logging.getLogger(__name__)
# GlobalBatchSampler makes mid-epoch resumption exact (it skips the trained batches, see
# PreferenceDataModule.train_dataloader); Lightning cannot see that and would warn otherwise.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# Recorded in checkpoints' hyperparameters; they lived in simpo_lightning.data before it became a package.
torch.serialization.add_safe_globals(
    [Columns, Truncation, (Columns, "simpo_lightning.data.Columns"), (Truncation, "simpo_lightning.data.Truncation")]
)


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for training, validation and test.

    Args:
        train_data: ``demo`` (the built-in short-answer set), a ``.jsonl``/``.json``/``.parquet`` file
            (``.gz`` allowed), or a ``datasets`` name or saved directory, optionally ``name:split``.
            None (as in a config that leaves it to the user) is an error that asks for it.
        val_data: same forms. None: ``demo:val`` for the demo, else ``val_fraction`` of ``train_data``.
        test_data: same forms. None: the validation set.
        format: row format, see the module docstring.
        columns: column names.
        truncation: token budget per sequence.
        val_fraction: share of the training rows held out when ``val_data`` is None.
        batch_size: preference pairs per batch (each pair is two sequences).
        num_workers: DataLoader worker processes.
        seed: seed for the validation split and the shuffling of training batches.
        shared_prompt: also encode each pair as one sequence ``[prompt, chosen, rejected]`` (see ``pack_pairs``),
            which the model computes instead of two sequences: the prompt once, half the activation memory
            on prompt-heavy data; the log-probs equal separate sequences'. kto uses the separate ones.
        group_by_length: training batches of similar-length pairs (less padding; the order is still
            random and seeded). Off: batches as drawn.
        cache_dir: where tokenised data is cached, keyed by content, settings and tokenizer; None disables it.
        tokenizer: set by the command from the model; pass one when building the DataModule by hand.
    """

    def __init__(
        self,
        train_data: str | None = "demo",
        val_data: str | None = None,
        test_data: str | None = None,
        format: Format = "auto",
        columns: Columns = Columns(),
        truncation: Truncation = Truncation(),
        val_fraction: float = 0.1,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shared_prompt: bool = True,
        group_by_length: bool = False,
        cache_dir: str | None = "~/.cache/simpo-lightning",
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])  # for the record: it stores dataclasses as dicts
        if train_data is None:
            raise DataError(
                "data.train_data is required: give --data.train_data PATH (a .jsonl/.json/.parquet file, "
                "a datasets name or folder, or demo)"
            )
        for name, source in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
            if source is not None and source.endswith(FILE_SUFFIXES) and not Path(source).expanduser().is_file():
                # said before a run starts rather than after its set-up
                raise DataError(
                    f"data.{name}: no such file {source}; give an existing .jsonl/.json/.parquet file or 'demo'"
                )
        self.columns, self.truncation, self.tokenizer = columns, truncation, tokenizer
        self.splits: dict[str, list[dict]] = {}
        self.skipped: Counter = Counter()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule needs a tokenizer (the command links it from the model)")
        hp = self.hparams
        train = self._load(hp.train_data)
        val_source = hp.val_data or ("demo:val" if hp.train_data == "demo" else None)
        if val_source is None:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = max(1, round(hp.val_fraction * len(train)))
            if n_val >= len(train):
                raise DataError(f"{hp.train_data}: {len(train)} pairs are too few to split off a validation set")
            val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        else:
            val = self._load(val_source)
        self.splits = {"train": train, "val": val, "test": self._load(hp.test_data) if hp.test_data else val}
        log.info("preference pairs: %s", {k: len(v) for k, v in self.splits.items()})

    def _load(self, source: str) -> list[dict]:
        hp = self.hparams
        rows, identity = read_source(source)
        settings = repr((identity, hp.format, self.columns, self.truncation, tokenizer_fingerprint(self.tokenizer)))
        cache = None
        if hp.cache_dir is not None:
            cache = Path(hp.cache_dir).expanduser() / f"{hashlib.sha256(settings.encode()).hexdigest()[:24]}.pt"
            if cache.is_file():
                pairs, skipped = torch.load(cache)
                self.skipped.update(skipped)
                return pairs
        encoder = PairEncoder(self.tokenizer, self.columns, self.truncation, hp.format)
        pairs, skipped = encode_rows(rows, encoder, source, self.columns.reference)
        self.skipped.update(skipped)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((pairs, dict(skipped)), cache)
        return pairs

    def _loader(self, split: str, sampler: DistributedSampler | None = None) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id, self.hparams.shared_prompt),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Data-parallel replicas (with tensor parallelism, fewer than the processes).
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        world_size, rank = (replicas["num_replicas"], replicas["rank"]) if replicas else (1, 0)
        lengths = [example_length(e) for e in self.splits["train"]] if self.hparams.group_by_length else None
        sampler = GlobalBatchSampler(
            len(self.splits["train"]), self.hparams.batch_size, world_size, rank, self.hparams.seed, lengths
        )
        if trainer is not None and trainer.fit_loop.restarting:
            # Resuming: the restored loop state says how many batches of this epoch were trained on
            # ("processed": checkpoints are written in on_train_batch_end, before "completed" counts the batch).
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler.skip = (trainer.current_epoch, done)
            log.info("resuming epoch %d after %d batches", trainer.current_epoch, done)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def generation_examples(self, split: str = "val") -> list[tuple[list[int], str]]:
        """Distinct ``(prompt_ids, reference)`` of a split, for rows that carry a reference answer."""
        seen = {}
        for pair in self.splits[split]:
            if "reference" in pair:
                seen.setdefault(tuple(pair["prompt"]), pair["reference"])
        return [(list(p), r) for p, r in seen.items()]
