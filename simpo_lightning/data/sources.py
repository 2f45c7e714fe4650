"""Reading preference data: the built-in demo, JSONL/JSON/Parquet files (optionally gzipped), and
``datasets`` names or saved folders, as numbered rows. A JSONL file streams line by line, a range of
lines at a time, so several processes can each read their own part of a large file. Problems with a
file raise ``DataError`` naming it; a usable row that is dropped raises ``Skip`` (counted when encoding).
"""

import functools
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from simpo_lightning.data import arithmetic, demo
from simpo_lightning.errors import UserError

Row = dict[str, Any]
BUILT_IN = {"demo": demo, "arithmetic": arithmetic}  # generated in code: ``NAME[:train|val]``
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class DataError(UserError, ValueError):
    """A row or file that cannot be used as preference data; the message names where."""


class Skip(Exception):
    """A well-formed row that is dropped and counted under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Source:
    """One data source: its rows, how many there are, and an identity that changes with its content.

    Args:
        source: ``demo[:split]`` or ``arithmetic[:split]`` (built in), a ``.jsonl``/``.json``/``.parquet`` file
            (optionally ``.gz``), or a ``datasets`` name or saved directory with an optional ``:split`` (default
            ``train``).
    """

    def __init__(self, source: str):
        self.name = source
        name, _, split = source.partition(":") if not source.endswith(FILE_SUFFIXES) else (source, "", "")
        self.path = Path(source).expanduser()
        self._rows: list[tuple[int, Row]] | None = None  # all but JSONL are read whole, when first asked for
        if name in BUILT_IN:
            task = BUILT_IN[name]
            self._rows, self.identity = list(enumerate(task.rows(split or "train"))), f"{name}:{split}:{task.VERSION}"
        elif source.endswith(FILE_SUFFIXES):
            if not self.path.is_file():
                raise DataError(f"{source}: no such file")
            self.identity = f"sha256:{file_hash(self.path)}"
        elif self.path.is_file():
            raise DataError(
                f"{source}: unknown file type; use .jsonl, .json or .parquet (each optionally .gz), "
                "a datasets save_to_disk folder, or a datasets name"
            )
        else:
            dataset = _load_dataset(source, name, split)
            self._rows, self.identity = list(enumerate(dataset)), f"datasets:{name}:{split}:{dataset._fingerprint}"

    @functools.cached_property
    def streams(self) -> bool:
        """Read line by line (JSONL) rather than whole."""
        return self._rows is None and ".jsonl" in self.path.name

    @functools.cached_property
    def count(self) -> int:
        """Rows (JSONL: lines) of the source, the positions ``rows`` takes."""
        return _count_lines(self.path) if self.streams else len(self._whole())

    def _whole(self) -> list[tuple[int, Row]]:
        if self._rows is None:
            self._rows = _read_whole_file(self.path)
        return self._rows

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Row]]:
        """``(row number, row)`` of rows ``start`` to ``stop`` (positions, as ``count``): 1-based line
        numbers for JSONL, where blank lines are passed over, 0-based indices otherwise."""
        stop = self.count if stop is None else stop
        if not self.streams:
            yield from self._whole()[start:stop]
            return
        with _text_lines(self.path) as lines:
            for index, line in enumerate(lines):
                if index >= stop:
                    break
                if index < start or not line.strip():
                    continue
                try:
                    yield index + 1, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.path}:{index + 1}: not valid JSON ({e.msg})") from e


def read_source(source: str) -> tuple[list[tuple[int, Row]], str]:
    """Every row of ``source`` in memory, and its identity (for small sources and tests)."""
    opened = Source(source)
    return list(opened.rows()), opened.identity


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _text_lines(path: Path) -> Iterator[io.TextIOBase]:
    """The file as UTF-8 text (decompressed for ``.gz``), with errors that say what is wrong with it."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            yield f
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); is it a binary file?") from e
    except (EOFError, OSError, zlib.error) as e:  # EOFError: a truncated .gz; BadGzipFile (OSError): not gzip
        raise DataError(
            f"{path}: cannot read it ({type(e).__name__}: {e}); the file is truncated or corrupt: "
            "download or write it again"
        ) from e


def _count_lines(path: Path) -> int:
    with _text_lines(path) as lines:
        return sum(1 for _ in lines)


def _read_whole_file(path: Path) -> list[tuple[int, Row]]:
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist()))
        except pyarrow.ArrowException as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    with _text_lines(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data))


def _load_dataset(source: str, name: str, split: str):
    import datasets

    try:
        path = Path(name).expanduser()
        dataset = (
            datasets.load_from_disk(path) if path.is_dir() else datasets.load_dataset(name, split=split or "train")
        )
    except Exception as e:
        raise DataError(
            f"{source}: not a data file, a saved dataset folder, or a datasets name that can be loaded "
            f"here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    return dataset[split or "train"] if isinstance(dataset, datasets.DatasetDict) else dataset
