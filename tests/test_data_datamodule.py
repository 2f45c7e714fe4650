"""The DataModule: splits, the tokenisation cache, datasets sources and column names."""

from simpo_lightning.data import Columns, PreferenceDataModule, Truncation

from helpers import write_jsonl


def test_datasets_source_and_columns(tokenizer, tmp_path):
    import datasets

    rows = [{"q": f"Q{i}", "good": f" yes {i}", "bad": " no"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    dm = PreferenceDataModule(
        train_data=str(tmp_path / "ds"),
        columns=Columns(prompt="q", chosen="good", rejected="bad"),
        val_fraction=0.5,
        tokenizer=tokenizer,
        cache_dir=None,
    )
    dm.setup()
    assert len(dm.splits["train"]) == 3 and len(dm.splits["val"]) == 3


def test_validation_split_is_deterministic_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": " b"} for i in range(20)]
    )
    splits = []
    for _ in range(2):
        dm = PreferenceDataModule(train_data=str(path), val_fraction=0.25, seed=3, tokenizer=tokenizer, cache_dir=None)
        dm.setup()
        splits.append(dm.splits)
    assert splits[0] == splits[1] and len(splits[0]["val"]) == 5 and len(splits[0]["train"]) == 15
    val = {tuple(p["prompt"]) for p in splits[0]["val"]}
    assert not val & {tuple(p["prompt"]) for p in splits[0]["train"]}


def test_tokenisation_cache(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": " b"} for i in range(10)]
    )
    kwargs = dict(train_data=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    first = PreferenceDataModule(**kwargs)
    first.setup()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    second = PreferenceDataModule(**kwargs)
    second.setup()
    assert second.splits == first.splits and len(list((tmp_path / "cache").iterdir())) == 1
    PreferenceDataModule(**kwargs, truncation=Truncation(max_length=64)).setup()  # other settings, other entry
    assert len(list((tmp_path / "cache").iterdir())) == 2
