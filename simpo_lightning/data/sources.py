"""Reading preference data: the built-in demo, JSONL/JSON/Parquet files (optionally gzipped), and
``datasets`` names or saved folders, as numbered rows. Problems with a file raise ``DataError``
naming it; a usable row that is dropped raises ``Skip`` (counted by ``encode_rows``)."""

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from simpo_lightning import demo
from simpo_lightning.errors import UserError

Row = dict[str, Any]
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class DataError(UserError, ValueError):
    """A row or file that cannot be used as preference data; the message names where."""


class Skip(Exception):
    """A well-formed row that is dropped and counted under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_source(source: str) -> tuple[list[tuple[int, Row]], str]:
    """Read rows from ``demo[:split]``, a JSONL/JSON/Parquet file (optionally gzipped), or a
    ``datasets`` name or saved directory with an optional ``:split`` (default ``train``).

    Returns:
        ``([(row_number, row), …], identity)``; row numbers are 1-based file lines for JSONL and
        0-based indices otherwise. ``identity`` changes whenever the content may have changed.
    """
    name, _, split = source.partition(":") if not source.endswith(FILE_SUFFIXES) else (source, "", "")
    if name == "demo":
        return list(enumerate(demo.rows(split or "train"))), f"demo:{split}:{demo.VERSION}"
    path = Path(source).expanduser()
    if source.endswith(FILE_SUFFIXES):
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        stat = path.stat()
        return _read_file(path), f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_file():
        raise DataError(
            f"{source}: unknown file type; use .jsonl, .json or .parquet (each optionally .gz), "
            "a datasets save_to_disk folder, or a datasets name"
        )
    import datasets

    try:
        dataset = (
            datasets.load_from_disk(name)
            if Path(name).is_dir()
            else datasets.load_dataset(name, split=split or "train")
        )
    except Exception as e:
        raise DataError(
            f"{source}: not a data file, a saved dataset folder, or a datasets name that can be loaded "
            f"here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split or "train"]
    return list(enumerate(dataset)), f"datasets:{name}:{split}:{dataset._fingerprint}"


def _read_file(path: Path) -> list[tuple[int, Row]]:
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist()))
        except pyarrow.ArrowException as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); is it a binary file?") from e
    except (EOFError, OSError, zlib.error) as e:  # EOFError: a truncated .gz; BadGzipFile (OSError): not gzip
        raise DataError(
            f"{path}: cannot read it ({type(e).__name__}: {e}); the file is truncated or corrupt: "
            "download or write it again"
        ) from e
    if ".jsonl" in path.name:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data))
