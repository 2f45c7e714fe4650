"""Reading sources: files of every kind, their errors, datasets folders."""

import gzip
import json

import pytest

from simpo_lightning.data import DataError, PreferenceDataModule

from helpers import write_jsonl


def test_undecodable_line_names_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, '{"prompt": "Q",'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=None).setup()
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        PreferenceDataModule(train_data=str(tmp_path / "bad.jsonl"), tokenizer=tokenizer, cache_dir=None).setup()


def test_missing_file(tokenizer):
    with pytest.raises(DataError, match="no such file"):
        PreferenceDataModule(train_data="nope.jsonl", tokenizer=tokenizer, cache_dir=None).setup()


def test_file_formats_agree(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}", "chosen": f" yes {i}", "rejected": " no"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(map(json.dumps, rows)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    loaded = []
    for name in ("d.json", "d.jsonl.gz", "d.parquet"):
        dm = PreferenceDataModule(
            train_data=str(tmp_path / name), val_data=str(tmp_path / name), tokenizer=tokenizer, cache_dir=None
        )
        dm.setup()
        loaded.append([{k: v for k, v in p.items() if k != "row"} for p in dm.splits["train"]])  # numbering differs
    assert loaded[0] == loaded[1] == loaded[2] and len(loaded[0]) == 5
