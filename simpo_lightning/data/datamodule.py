"""PreferenceDataModule: the training, validation and test splits of preference data."""

import hashlib
import logging
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from simpo_lightning.data.collate import GlobalBatchSampler, PackedSampler, PreferenceCollator, TaggedRows
from simpo_lightning.data.encoding import Columns, Format, PairEncoder, Truncation, tokenizer_fingerprint
from simpo_lightning.data.sources import FILE_SUFFIXES, DataError, Source
from simpo_lightning.data.store import cached_store, encoder_fingerprint, load_store, store_report
from simpo_lightning.errors import require

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)
# GlobalBatchSampler makes mid-epoch resumption exact (it skips the trained batches, see
# PreferenceDataModule.train_dataloader); Lightning cannot see that and would warn otherwise.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for training, validation and test.

    Each source is tokenised once into a store of Arrow files in ``cache_dir`` (``data.store``): in
    ``prepare_data``, which Lightning runs in one process per node (or one per run, with
    ``prepare_data_per_node`` false) before the others set up, so they all memory-map the same files
    instead of each tokenising and holding the whole set. ``setup`` alone (no Trainer, as in a notebook)
    builds what is missing itself.

    Args:
        train_data: ``demo`` (the built-in short-answer set), a ``.jsonl``/``.json``/``.parquet`` file
            (``.gz`` allowed), or a ``datasets`` name or saved directory, optionally ``name:split``.
            None (as in a config that leaves it to the user) is an error that asks for it.
        val_data: same forms. None: ``demo:val`` for the demo, else ``val_fraction`` of ``train_data``.
        test_data: same forms. None: the validation set.
        format: row format, see ``data.encoding``.
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
        cache_dir: where tokenised stores are kept, keyed by content, settings and tokenizer. None: a
            temporary folder of this process, deleted when it ends.
        num_proc: processes that tokenise a source when its store is built (each a range of its rows).
        prepare_data_per_node: true: one process per node tokenises, for a ``cache_dir`` on each node's own
            disk; false: one process of the whole run does, for a ``cache_dir`` that every node shares.
        max_tokens_per_row: pack training pairs: several ``[prompt, chosen, rejected]`` a row, up to this many
            tokens (a longer pair gets a row of its own), and ``batch_size`` rows a batch, so batches hold as
            many pairs as fit instead of a fixed count, with almost no padding (``data.collate.PackedSampler``).
            Each pair keeps its own positions and attends to itself only; the loss is a mean over the batch's
            pairs. None: ``batch_size`` pairs a batch, one a row. Needs ``shared_prompt`` and paired data.
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
        num_proc: int = 1,
        prepare_data_per_node: bool = True,
        max_tokens_per_row: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])  # for the record: it stores dataclasses as dicts
        if train_data is None:
            raise DataError(
                "data.train_data is required: give --data.train_data PATH (a .jsonl/.json/.parquet file, "
                "a datasets name or folder, or demo)"
            )
        require(batch_size >= 1, f"data.batch_size = {batch_size}: at least one pair per batch")
        require(
            max_tokens_per_row is None or (max_tokens_per_row >= 2 and shared_prompt),
            f"data.max_tokens_per_row = {max_tokens_per_row}: packing lays out [prompt, chosen, rejected] rows, "
            "so it needs data.shared_prompt true and at least 2 tokens",
        )
        require(0 < val_fraction < 1, f"data.val_fraction = {val_fraction}: must be in (0, 1)")
        require(
            num_proc >= 1 and num_workers >= 0,
            f"data.num_proc = {num_proc} must be ≥ 1, data.num_workers = {num_workers} ≥ 0",
        )
        for name, source in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
            if source is not None and source.endswith(FILE_SUFFIXES) and not Path(source).expanduser().is_file():
                # said before a run starts rather than after its set-up
                raise DataError(
                    f"data.{name}: no such file {source}; give an existing .jsonl/.json/.parquet file or 'demo'"
                )
        self.columns, self.truncation, self.tokenizer = columns, truncation, tokenizer
        self.prepare_data_per_node = prepare_data_per_node
        self.splits: dict[str, datasets.Dataset] = {}
        self.split_keys: dict[str, str] = {}  # identify each split's rows (the reference log-prob cache uses them)
        self.skipped: Counter = Counter()
        self._scratch: tempfile.TemporaryDirectory | None = None

    def _sources(self) -> list[str]:
        hp = self.hparams
        val = hp.val_data or ("demo:val" if hp.train_data == "demo" else None)
        return [s for s in (hp.train_data, val, hp.test_data) if s is not None]

    def prepare_data(self) -> None:
        """Tokenise every source into the cache, each once (a store that exists is left as it is)."""
        if self.hparams.cache_dir is not None:
            for source in self._sources():
                self._store(source, build=True)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        # With several processes the stores come from prepare_data; one process may build its own here.
        build = self.trainer is None or self.trainer.world_size == 1
        train, train_key = self._load(hp.train_data, build)
        val_source = hp.val_data or ("demo:val" if hp.train_data == "demo" else None)
        if val_source is None:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = max(1, round(hp.val_fraction * len(train)))
            if n_val >= len(train):
                raise DataError(f"{hp.train_data}: {len(train)} pairs are too few to split off a validation set")
            val, train = train.select(order[:n_val]), train.select(order[n_val:])
            val_key, train_key = (
                _hash(train_key, "val", hp.val_fraction, hp.seed),
                _hash(train_key, "train", hp.val_fraction, hp.seed),
            )
        else:
            val, val_key = self._load(val_source, build)
        test, test_key = self._load(hp.test_data, build) if hp.test_data else (val, val_key)
        self.splits = {"train": train, "val": val, "test": test}
        self.split_keys = {"train": train_key, "val": val_key, "test": test_key}
        log.info("preference pairs: %s", {k: len(v) for k, v in self.splits.items()})

    def _store(self, source: str, build: bool) -> tuple[Path, str]:
        """The store of ``source`` (built when missing and ``build``) and its key."""
        hp = self.hparams
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule needs a tokenizer (the command links it from the model)")
        opened = Source(source)
        settings = (opened.identity, hp.format, self.columns, self.truncation, tokenizer_fingerprint(self.tokenizer))
        key = _hash(*settings, encoder_fingerprint())
        if hp.cache_dir is None:
            self._scratch = self._scratch or tempfile.TemporaryDirectory(prefix="simpo-lightning-data-")
            cache_dir, build = Path(self._scratch.name), True
        else:
            cache_dir = Path(hp.cache_dir).expanduser()
        encoder = PairEncoder(self.tokenizer, self.columns, self.truncation, hp.format)
        folder = cached_store(cache_dir, key, opened, encoder, self.columns.reference, hp.num_proc, build)
        if folder is None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            raise DataError(
                f"process {rank}: no tokenised data for {source} at {cache_dir / f'data-{key}'} after prepare_data: "
                "this process does not see the files the preparing one wrote; give data.cache_dir a folder on a "
                "file system every process shares, or set data.prepare_data_per_node true for a disk per node"
            )
        return folder, key

    def _load(self, source: str, build: bool) -> tuple["datasets.Dataset", str]:
        folder, key = self._store(source, build)
        report = store_report(folder)
        report.check(source)
        self.skipped.update(report.skipped)
        return load_store(folder), key

    def add_reference_logps(self, split: str, values: torch.Tensor) -> None:
        """Precomputed reference log-probs ``[N, 2]`` (chosen, rejected) as columns of ``split`` (and of every
        split that is the same rows, such as test when it is the validation set)."""
        rows = self.splits[split]
        chosen, rejected = values[:, 0].tolist(), values[:, 1].tolist()
        scored = rows.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
        for name in [n for n, s in self.splits.items() if s is rows]:
            self.splits[name] = scored

    def _loader(self, split: str, sampler: DistributedSampler | None = None) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id, self.hparams.shared_prompt),
            num_workers=self.hparams.num_workers,
        )

    def state_dict(self) -> dict:
        """For the checkpoint (and the model card ``export`` writes): the pairs of each split and the rows skipped,
        by reason."""
        return {"rows": {name: len(rows) for name, rows in self.splits.items()}, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the data is rebuilt from its sources (the counts are a record)."""

    def train_dataloader(self) -> DataLoader:
        train, hp = self.splits["train"], self.hparams
        if hp.max_tokens_per_row is None:
            lengths = np.asarray(train.with_format("numpy")["length"]) if hp.group_by_length else None
            return self._loader("train", self.train_sampler(len(train), lengths))
        if "chosen" not in train.column_names:
            raise DataError("data.max_tokens_per_row packs pairs; these rows are unpaired completions (kto)")
        lengths = np.asarray(train.with_format("numpy")["length"]).tolist()
        sampler = self.train_sampler(len(train), packed=lengths)
        collate = PreferenceCollator(self.tokenizer.pad_token_id, shared_prompt=True)
        return DataLoader(
            TaggedRows(train), batch_size=None, sampler=sampler, collate_fn=collate, num_workers=hp.num_workers
        )

    def train_sampler(
        self, size: int, lengths: np.ndarray | None = None, packed: list[int] | None = None
    ) -> GlobalBatchSampler | PackedSampler:
        """This process's share of each global training batch (of pairs, or of rows packed from pairs of the
        ``packed`` lengths), resuming mid-epoch where a checkpoint left off."""
        trainer, hp = self.trainer, self.hparams
        # Data-parallel replicas (with tensor parallelism, fewer than the processes).
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        world_size, rank = (replicas["num_replicas"], replicas["rank"]) if replicas else (1, 0)
        if packed is not None:
            sampler = PackedSampler(packed, hp.max_tokens_per_row, hp.batch_size, world_size, rank, hp.seed)
        else:
            sampler = GlobalBatchSampler(size, hp.batch_size, world_size, rank, hp.seed, lengths)
        if trainer is not None and trainer.fit_loop.restarting:
            # Resuming: the restored loop state says how many batches of this epoch were trained on
            # ("processed": checkpoints are written in on_train_batch_end, before "completed" counts the batch).
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler.skip = (trainer.current_epoch, done)
            log.info("resuming epoch %d after %d batches", trainer.current_epoch, done)
        return sampler

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def generation_examples(
        self, split: str = "val", with_reference: bool = True
    ) -> list[tuple[list[int], str | None]]:
        """Distinct ``(prompt_ids, reference)`` of a split in order, each with the first reference answer its
        rows carry; ``with_reference``: only the prompts that have one."""
        rows = self.splits[split]
        seen: dict[tuple, str | None] = {}
        for prompt, reference in zip(rows["prompt"], rows["reference"]):
            if seen.get(tuple(prompt)) is None:
                seen[tuple(prompt)] = reference
        return [(list(p), r) for p, r in seen.items() if r is not None or not with_reference]


def _hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]
