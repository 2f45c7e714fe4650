"""The DataModule: tokenised stores built once, keyed by content and settings, never read half-written,
shared by processes that start together; splits, datasets sources and column names."""

import gzip
import json
import logging
import multiprocessing
import os
from types import SimpleNamespace

import pytest

from simpo_lightning.data import (
    Columns,
    DataError,
    PairEncoder,
    PreferenceDataModule,
    Truncation,
    encode_rows,
    read_source,
)

from helpers import ROOT, SHARED_DATA, write_jsonl

ROWS = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": " b"} for i in range(20)]
HH = SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz"


def stores(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_datasets_source_and_columns(tokenizer, tmp_path):
    import datasets

    rows = [{"q": f"Q{i}", "good": f" yes {i}", "bad": " no"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    columns = Columns(prompt="q", chosen="good", rejected="bad")
    dm = PreferenceDataModule(
        train_data=str(tmp_path / "ds"), columns=columns, val_fraction=0.5, tokenizer=tokenizer, cache_dir=None
    )
    dm.setup()
    assert len(dm.splits["train"]) == 3 and len(dm.splits["val"]) == 3


def test_validation_split_is_deterministic_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    splits = []
    for _ in range(2):
        dm = PreferenceDataModule(train_data=str(path), val_fraction=0.25, seed=3, tokenizer=tokenizer, cache_dir=None)
        dm.setup()
        splits.append({name: rows.to_list() for name, rows in dm.splits.items()})
    assert splits[0] == splits[1] and len(splits[0]["val"]) == 5 and len(splits[0]["train"]) == 15
    val = {tuple(p["prompt"]) for p in splits[0]["val"]}
    assert not val & {tuple(p["prompt"]) for p in splits[0]["train"]}


@pytest.mark.parametrize("source", ["demo", "hh"])
def test_the_store_gives_the_pairs_order_and_skips_of_encoding_in_memory(tokenizer, tmp_path, source):
    """The demo and the real HH-RLHF file (when ../shared/data is there), tokenised into Arrow by two
    processes, against every row encoded in memory by the same encoder."""
    if source == "hh" and not HH.is_file():
        pytest.skip("../shared/data absent (project checkout only)")
    name = "demo" if source == "demo" else str(HH)
    truncation = Truncation(max_length=512, max_prompt_length=256)
    dm = PreferenceDataModule(
        train_data=name,
        val_data=name,
        truncation=truncation,
        num_proc=2,
        tokenizer=tokenizer,
        cache_dir=str(tmp_path),
        format="auto",
    )
    dm.setup()
    expected, skipped = encode_rows(
        read_source(name)[0], PairEncoder(tokenizer, Columns(), truncation, "auto"), name, "reference"
    )
    stored = dm.splits["train"].to_list()
    assert [{k: p[k] for k in expected[0]} for p in stored] == expected
    assert [p["length"] for p in stored] == [len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in expected]
    assert dm.skipped == skipped + skipped and (source == "demo") == (not skipped)  # train and val read the source


def character_tokenizer(rows: list[dict]):
    """A tokenizer of another kind than SmolLM2's: one id per character of the rows' text, and an eos."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted({c for row in rows for text in row.values() for c in text})
    vocab = {"</s>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def stored_pairs(dm: PreferenceDataModule) -> list[dict]:
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in [*dm.splits["train"], *dm.splits["val"]]]


def test_the_store_is_built_once_and_keyed_by_content_settings_and_tokenizer(tokenizer, tmp_path):
    path, cache = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"
    first = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache))
    first.setup()
    (store,) = stores(cache)
    built = (cache / store / "report.json").stat().st_mtime_ns
    second = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache))
    second.setup()
    assert second.splits["train"].to_list() == first.splits["train"].to_list()
    assert stores(cache) == [store] and (cache / store / "report.json").stat().st_mtime_ns == built  # read, not rebuilt
    PreferenceDataModule(
        train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache), truncation=Truncation(64)
    ).setup()
    assert len(stores(cache)) == 2  # other settings, other store
    characters = character_tokenizer(ROWS)
    other = PreferenceDataModule(train_data=str(path), tokenizer=characters, cache_dir=str(cache))
    other.setup()
    assert len(stores(cache)) == 3  # another tokenizer, another store: its own ids, not the first one's
    pairs = stored_pairs(other)
    assert pairs != stored_pairs(first)
    assert sorted(characters.decode(p["prompt"]).replace(" ", "") for p in pairs) == sorted(r["prompt"] for r in ROWS)
    write_jsonl(path, [*ROWS[:-1], {**ROWS[-1], "chosen": " changed"}])  # same size, other content
    changed = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache))
    changed.setup()
    assert len(stores(cache)) == 4
    assert " changed" in {tokenizer.decode(p["chosen"][:-1]) for p in stored_pairs(changed)}


BUILD = """
import sys
from transformers import AutoTokenizer
from simpo_lightning.data import PreferenceDataModule
from simpo_lightning.data.store import encoder_fingerprint
tokenizer = AutoTokenizer.from_pretrained(sys.argv[3])
PreferenceDataModule(train_data=sys.argv[1], tokenizer=tokenizer, cache_dir=sys.argv[2]).setup()
print(encoder_fingerprint())
"""


@pytest.mark.slow
def test_the_store_key_follows_the_encoding_code(tiny_dir, tokenizer, tmp_path):
    """A copy of the package whose encoding module differs by one comment line, run in a fresh interpreter, has
    another fingerprint and builds its own store beside the one this code built from the same file and
    tokenizer: stores written by other code are never read. (The same code reads its store again: above.)"""
    import shutil
    import subprocess
    import sys

    from simpo_lightning.data.store import encoder_fingerprint

    path, cache = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"
    PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache)).setup()
    assert len(stores(cache)) == 1
    copy = tmp_path / "edited"
    shutil.copytree(ROOT / "simpo_lightning", copy / "simpo_lightning")
    encoding = copy / "simpo_lightning/data/encoding.py"
    encoding.write_text(encoding.read_text() + "\n# an edit\n")
    # run in tmp_path: the working folder comes first on the path, before PYTHONPATH
    command = [sys.executable, "-c", BUILD, str(path), str(cache), tiny_dir]
    env = {**os.environ, "PYTHONPATH": str(copy)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.strip()) == 16 and result.stdout.strip() != encoder_fingerprint()
    assert len(stores(cache)) == 2


def test_a_half_written_store_is_never_read(tokenizer, tmp_path, monkeypatch):
    """A build that fails part-way leaves no store; a temporary folder left by a killed build is ignored, and
    the store built afterwards holds every pair as encoding in memory gives it."""
    path, cache = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"
    calls = []
    original = PairEncoder.__call__

    def breaks_half_way(self, row):
        calls.append(row)
        if len(calls) == 10:
            raise RuntimeError("killed part-way")
        return original(self, row)

    monkeypatch.setattr(PairEncoder, "__call__", breaks_half_way)
    with pytest.raises(RuntimeError, match="killed part-way"):
        PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache)).setup()
    assert stores(cache) == []  # nothing half-written where a store would be read
    monkeypatch.setattr(PairEncoder, "__call__", original)
    store = next(cache.glob("data-*.lock")).name.removesuffix(".lock")
    (cache / f"{store}.tmp-99999").mkdir()  # as a killed process would leave it
    (cache / f"{store}.tmp-99999" / "part-00000.arrow").write_text("garbage")
    dm = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(cache))
    dm.setup()
    encoder = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    expected, _ = encode_rows(read_source(str(path))[0], encoder, str(path), "reference")
    stored = {p["row"]: p for p in [*dm.splits["train"], *dm.splits["val"]]}
    assert stored.keys() == {e["row"] for e in expected} and len(stored) == 20
    assert all({k: stored[e["row"]][k] for k in e} == e for e in expected)
    assert (cache / store / "report.json").is_file()


def prepare_and_read(path: str, cache: str, tokenizer_dir: str, queue) -> None:
    """One of two processes started together: prepare_data then setup, as Lightning calls them."""
    from transformers import AutoTokenizer

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("simpo_lightning.data.store").addHandler(handler)
    logging.getLogger("simpo_lightning.data.store").setLevel(logging.INFO)
    dm = PreferenceDataModule(
        train_data=path,
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
        cache_dir=cache,
        batch_size=4,
        group_by_length=True,
    )
    dm.prepare_data()
    dm.setup()
    batches = [b.chosen.input_ids.tolist() for b in dm.train_dataloader()]
    queue.put((sum("tokenising" in r.getMessage() for r in records), batches))


def test_two_processes_starting_together_build_one_store_and_read_the_same_batches(tiny_dir, tmp_path):
    rows = [
        {"prompt": f"Question {i}: " + "word " * (i % 13), "chosen": f" yes {i}", "rejected": " no"} for i in range(200)
    ]
    path, cache = write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "cache"
    context = multiprocessing.get_context("fork")  # two processes, as two launched ranks, without importing again
    queue = context.Queue()
    workers = [
        context.Process(target=prepare_and_read, args=(str(path), str(cache), tiny_dir, queue)) for _ in range(2)
    ]
    for w in workers:
        w.start()
    results = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    assert sorted(built for built, _ in results) == [0, 1]  # one tokenised, the other waited and read
    assert results[0][1] == results[1][1] and len(results[0][1]) == 45
    assert len(stores(cache)) == 1 and not list(cache.glob("*.tmp-*"))


def test_a_process_that_finds_no_store_after_prepare_data_says_why(tokenizer, tmp_path):
    """In a run of several processes, setup reads the stores prepare_data built; on a file system that
    process cannot see, that is a clear error, not a second tokenisation racing the first."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    dm = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "elsewhere"))
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # what setup reads of the Trainer
    with pytest.raises(DataError, match="process 1: no tokenised data for .*d.jsonl.*data.cache_dir"):
        dm.setup()


def test_a_gzipped_jsonl_streams_by_line_with_its_line_numbers(tokenizer, tmp_path, caplog):
    lines = [json.dumps(ROWS[0]), "", json.dumps({**ROWS[1], "rejected": " a1"}), json.dumps(ROWS[2])]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(lines))
    dm = PreferenceDataModule(
        train_data=str(tmp_path / "d.jsonl.gz"),
        val_data=str(tmp_path / "d.jsonl.gz"),
        tokenizer=tokenizer,
        cache_dir=str(tmp_path / "cache"),
        num_proc=2,
    )
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert [p["row"] for p in dm.splits["train"]] == [1, 4]  # blank line 2 passed over, line 3 skipped
    assert "skipped 1 of 3 rows: identical responses (rows 3)" in caplog.text
