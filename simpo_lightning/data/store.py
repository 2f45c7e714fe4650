"""The tokenised store of one source: its encoded rows as Arrow files, built once and memory-mapped by
every process that reads them.

A store is a folder ``data-<key>`` in the cache, the key hashing the source's content, the encoding
settings, the tokenizer and ``encoder_fingerprint()`` (the source code that reads, encodes and stores
rows, so a change to it never reads a store the old code wrote). It holds one Arrow stream file per part of the source
(``part-00000.arrow``, …, written by that many processes) and ``report.json`` (the rows seen and kept,
the skips with their row numbers). It is built under a lock in a temporary folder that is renamed into
place when complete (``cache.build_once``), so a half-written store is never read. Token ids are int32
lists, ``length`` the tokens of the row (what length grouping sorts by).
"""

import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from simpo_lightning.cache import build_once
from simpo_lightning.data.encoding import EncodeReport, PairEncoder, encode
from simpo_lightning.data.sources import Source

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


def encoder_fingerprint() -> str:
    """A hash of the code that turns a source's rows into stored pairs (reading, encoding, storing)."""
    from simpo_lightning.data import encoding, sources

    code = "".join(inspect.getsource(module) for module in (encoding, sources, sys.modules[__name__]))
    return hashlib.sha256(code.encode()).hexdigest()[:16]


BATCH_ROWS = 1000  # rows per Arrow record batch
TOKENS = pa.list_(pa.int32())
PAIRED = pa.schema(
    [
        ("row", pa.int64()),
        ("prompt", TOKENS),
        ("chosen", TOKENS),
        ("rejected", TOKENS),
        ("length", pa.int32()),
        ("reference", pa.string()),
        ("margin", pa.float64()),
    ]
)
UNPAIRED = pa.schema(
    [
        ("row", pa.int64()),
        ("prompt", TOKENS),
        ("completion", TOKENS),
        ("desirable", pa.bool_()),
        ("length", pa.int32()),
        ("reference", pa.string()),
    ]
)


def build_store(folder: Path, source: Source, encoder: PairEncoder, reference: str, parts: int) -> EncodeReport:
    """Encode ``source`` into ``folder`` (which must not exist yet), in ``parts`` processes each taking a
    contiguous range of rows, so the parts concatenate in the source's order."""
    folder.mkdir(parents=True)
    bounds = [(source.count * k // parts, source.count * (k + 1) // parts) for k in range(parts)]
    jobs = [
        (folder / f"part-{k:05d}.arrow", source, encoder, reference, start, stop)
        for k, (start, stop) in enumerate(bounds)
    ]
    if parts == 1:
        reports = [_encode_part(*jobs[0])]
    else:  # fork: the workers inherit the tokenizer instead of pickling it
        with multiprocessing.get_context("fork").Pool(parts, initializer=_quiet_tokenizers) as pool:
            reports = pool.starmap(_encode_part, jobs)
    report = EncodeReport()
    for part in reports:
        report = report.merge(part, source.name)
    saved = {
        "rows": report.rows,
        "kept": report.kept,
        "skipped": dict(report.skipped),
        "where": report.where,
        "first": report.first,
    }
    (folder / "report.json").write_text(json.dumps(saved))
    return report


def store_report(folder: Path) -> EncodeReport:
    saved = json.loads((folder / "report.json").read_text())
    first = tuple(saved["first"]) if saved["first"] else None
    return EncodeReport(saved["rows"], saved["kept"], Counter(saved["skipped"]), saved["where"], first)


def load_store(folder: Path) -> "datasets.Dataset":
    """The rows of a built store, memory-mapped (the store must have kept rows: see its report)."""
    parts = sorted(folder.glob("part-*.arrow"))  # a part whose rows were all skipped wrote no file
    import datasets  # imported here: 0.4 s a process that reads no store need not pay

    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts])


def cached_store(
    cache_dir: Path, key: str, source: Source, encoder: PairEncoder, reference: str, parts: int, build: bool
) -> Path | None:
    """The store of ``key`` under ``cache_dir``, built first when missing and ``build`` is set; None when it is
    missing and may not be built here."""
    folder = cache_dir / f"data-{key}"
    if folder.is_dir() or not build:
        return folder if folder.is_dir() else None
    with build_once(folder) as building:
        if building is not None:
            log.info("tokenising %s into %s (%d process%s)", source.name, folder, parts, "es" if parts > 1 else "")
            build_store(building, source, encoder, reference, parts)
    return folder


def _encode_part(
    path: Path, source: Source, encoder: PairEncoder, reference: str, start: int, stop: int
) -> EncodeReport:
    report, writer, rows = EncodeReport(), None, []

    def flush() -> None:
        nonlocal writer
        if not rows:
            return
        unpaired = "completion" in rows[0]
        table = pa.Table.from_pylist([_stored(r) for r in rows], schema=UNPAIRED if unpaired else PAIRED)
        if writer is None:
            writer = pa.ipc.new_stream(str(path), table.schema)
        writer.write_table(table, max_chunksize=BATCH_ROWS)
        rows.clear()

    try:
        for pair in encode(source.rows(start, stop), encoder, source.name, reference, report):
            rows.append(pair)
            if len(rows) == BATCH_ROWS:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return report


def _stored(pair: dict) -> dict:
    """An encoded pair as a stored row: ``length`` is its tokens (prompt and responses). Unpaired rows have
    no margin (it is a property of a pair)."""
    if "completion" in pair:
        pair = {k: v for k, v in pair.items() if k != "margin"}
    responses = ("completion",) if "completion" in pair else ("chosen", "rejected")
    return {**pair, "length": len(pair["prompt"]) + sum(len(pair[k]) for k in responses)}


def _quiet_tokenizers() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parent's Rust thread pool does not survive fork
