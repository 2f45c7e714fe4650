import gzip
import json
import logging

import pytest
import torch

from simpo_lightning import demo
from simpo_lightning.data import (
    Columns, DataError, PairEncoder, PreferenceCollator, PreferenceDataModule, Skip, Truncation, encode_rows,
)
from simpo_lightning.logprobs import IGNORE_INDEX
from simpo_lightning.model import PolicyConfig, load_tokenizer

from conftest import SHARED_DATA, write_jsonl

MSG = lambda role, text: [{"role": role, "content": text}]  # noqa: E731


def encoder(tokenizer, **truncation) -> PairEncoder:
    return PairEncoder(tokenizer, Columns(), Truncation(**truncation), "auto")


def test_standard_row(tokenizer):
    pair = encoder(tokenizer)({"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5"})
    assert pair["prompt"] == tokenizer("Question: 2+2?\nAnswer:")["input_ids"]
    assert pair["chosen"] == tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert pair["rejected"][-1] == tokenizer.eos_token_id


def test_conversational_row_uses_chat_template(tokenizer):
    row = {"prompt": MSG("user", "Capital of France?"), "chosen": MSG("assistant", "Paris"), "rejected": MSG("assistant", "Rome")}
    pair = encoder(tokenizer)(row)
    rendered = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pair["prompt"]) == rendered
    assert tokenizer.decode(pair["chosen"]).startswith("Paris<|im_end|>")
    assert tokenizer.decode(pair["rejected"]).startswith("Rome<|im_end|>")


def test_conversational_implicit_prompt(tokenizer):
    shared = MSG("user", "Hi") + MSG("assistant", "Hello!") + MSG("user", "Capital of France?")
    implicit = {"chosen": shared + MSG("assistant", "Paris"), "rejected": shared + MSG("assistant", "Rome")}
    explicit = {"prompt": shared, "chosen": MSG("assistant", "Paris"), "rejected": MSG("assistant", "Rome")}
    assert encoder(tokenizer)(implicit) == encoder(tokenizer)(explicit)


def test_hh_row_splits_at_last_assistant_turn(tokenizer):
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Capital of France?\n\nAssistant:"
    pair = encoder(tokenizer)({"chosen": prompt + " Paris.", "rejected": prompt + " Paris is in Italy."})
    assert pair["prompt"] == tokenizer(prompt)["input_ids"]
    assert pair["chosen"] == tokenizer(" Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Q", "chosen": "  ", "rejected": "no"}, "empty response"),
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical responses"),
        ({"prompt": MSG("user", "Q"), "chosen": MSG("assistant", ""), "rejected": MSG("assistant", "x")}, "empty response"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}, "hh: no shared prompt"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x", "rejected": "\n\nHuman: a\n\nAssistant: c"},
         "hh: dialogues differ before the last assistant turn"),
    ],
)
def test_unusable_rows_are_skipped(tokenizer, row, reason):
    with pytest.raises(Skip, match=reason):
        encoder(tokenizer)(row)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q", "chosen": "a"}, "missing column 'rejected'"),
        ({"chosen": "a", "rejected": "b", "prompt": 3}, "column 'prompt' must be a string"),
        ({"prompt": MSG("user", "Q"), "chosen": [{"role": "assistant"}], "rejected": MSG("assistant", "b")},
         "column 'chosen' must be a list of"),
        ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "column 'chosen' must be a list of"),
        ("just a string", "expected an object"),
    ],
)
def test_malformed_rows_raise(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        encoder(tokenizer)(row)


def test_error_names_file_and_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}])
    dm = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=None)
    with pytest.raises(DataError, match=r"d\.jsonl row 2: missing column 'rejected'"):
        dm.setup()


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


def test_skips_are_counted_and_logged_once(tokenizer, tmp_path, caplog):
    good = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    bad = [{"prompt": "Q", "chosen": "x", "rejected": "x"}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", good + bad)
    dm = PreferenceDataModule(train_data=str(path), val_data=str(path), tokenizer=tokenizer, cache_dir=None)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert len(dm.splits["train"]) == 4 and dm.skipped["identical responses"] == 6  # train and val read the file
    messages = [r.getMessage() for r in caplog.records if "identical" in r.getMessage()]
    assert len(messages) == 2 and "skipped 3 of 7 rows: identical responses (rows 5, 6, 7)" in messages[0]


def test_all_rows_unusable(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match="no usable preference pairs"):
        PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=None).setup()


def test_tokenizer_without_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    row = {"prompt": MSG("user", "Q"), "chosen": MSG("assistant", "a"), "rejected": MSG("assistant", "b")}
    with pytest.raises(DataError, match="no chat template"):
        encoder(plain)(row)


def test_template_that_breaks_the_prefix_property(tokenizer):
    odd = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Renders the generation prompt as "A:" but a finished turn as "Assistant:": not a prefix.
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    row = {"prompt": MSG("user", "Q"), "chosen": MSG("assistant", "a"), "rejected": MSG("assistant", "b")}
    with pytest.raises(DataError, match="not a token prefix"):
        encoder(odd)(row)


def test_tokenizer_without_pad_token_uses_eos(tokenizer, tmp_path):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(PolicyConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_truncation_keeps_the_end_of_long_prompts(tokenizer):
    row = {"prompt": " ".join(f"w{i}" for i in range(100)), "chosen": " one two three four", "rejected": " no"}
    full = encoder(tokenizer, max_length=2000, max_prompt_length=None)(row)
    end = encoder(tokenizer, max_length=20, max_prompt_length=12)(row)
    start = encoder(tokenizer, max_length=20, max_prompt_length=12, mode="keep_start")(row)
    assert end["prompt"] == full["prompt"][-12:] and start["prompt"] == full["prompt"][:12]
    assert end["chosen"] == full["chosen"][:8] and end["rejected"] == full["rejected"]
    with pytest.raises(Skip, match="no room"):
        encoder(tokenizer, max_length=20, max_prompt_length=None)(row)


def test_collator_masks_prompt_and_padding():
    pairs = [{"prompt": [1, 2], "chosen": [3], "rejected": [4, 5, 6]}, {"prompt": [7], "chosen": [8, 9], "rejected": [10]}]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0]]
    assert batch["rejected_input_ids"].tolist() == [[1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    x = IGNORE_INDEX
    assert batch["chosen_labels"].tolist() == [[x, x, 3, x, x], [x, 8, 9, x, x]]
    assert batch["rejected_labels"].tolist() == [[x, x, 4, 5, 6], [x, 10, x, x, x]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


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
        dm = PreferenceDataModule(train_data=str(tmp_path / name), val_data=str(tmp_path / name), tokenizer=tokenizer, cache_dir=None)
        dm.setup()
        loaded.append(dm.splits["train"])
    assert loaded[0] == loaded[1] == loaded[2] and len(loaded[0]) == 5


def test_datasets_source_and_columns(tokenizer, tmp_path):
    import datasets

    rows = [{"q": f"Q{i}", "good": f" yes {i}", "bad": " no"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    dm = PreferenceDataModule(train_data=str(tmp_path / "ds"), columns=Columns(prompt="q", chosen="good", rejected="bad"),
                              val_fraction=0.5, tokenizer=tokenizer, cache_dir=None)
    dm.setup()
    assert len(dm.splits["train"]) == 3 and len(dm.splits["val"]) == 3


def test_validation_split_is_deterministic_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": " b"} for i in range(20)])
    splits = []
    for _ in range(2):
        dm = PreferenceDataModule(train_data=str(path), val_fraction=0.25, seed=3, tokenizer=tokenizer, cache_dir=None)
        dm.setup()
        splits.append(dm.splits)
    assert splits[0] == splits[1] and len(splits[0]["val"]) == 5 and len(splits[0]["train"]) == 15
    val = {tuple(p["prompt"]) for p in splits[0]["val"]}
    assert not val & {tuple(p["prompt"]) for p in splits[0]["train"]}


def test_tokenisation_cache(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": " b"} for i in range(10)])
    kwargs = dict(train_data=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    first = PreferenceDataModule(**kwargs)
    first.setup()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    second = PreferenceDataModule(**kwargs)
    second.setup()
    assert second.splits == first.splits and len(list((tmp_path / "cache").iterdir())) == 1
    PreferenceDataModule(**kwargs, truncation=Truncation(max_length=64)).setup()  # other settings, other entry
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_demo_data(tokenizer):
    dm = PreferenceDataModule(tokenizer=tokenizer, cache_dir=None)
    dm.setup()
    train_questions = {tuple(p["prompt"]) for p in dm.splits["train"]}
    examples = dm.generation_examples("val")
    assert len(examples) == len(demo.rows("val")) // 2 and not train_questions & {tuple(p) for p, _ in examples}
    assert all(demo.exact_match(tokenizer.decode(p["chosen"], skip_special_tokens=True), p["reference"]) for p in dm.splits["val"])
    assert demo.exact_match(' "Paris." ', "paris") and not demo.exact_match("The capital is Paris.", "Paris")


@pytest.mark.skipif(not (SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz").is_file(), reason="../shared/data absent (project checkout only)")
def test_real_hh_rlhf_file(tokenizer, caplog):
    path = SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    enc = encoder(tokenizer, max_length=512, max_prompt_length=256)
    with caplog.at_level(logging.WARNING):
        pairs, skipped = encode_rows(list(enumerate(rows, start=1)), enc, str(path), "reference")
    assert 0 < sum(skipped.values()) < 50 and len(pairs) + sum(skipped.values()) == len(rows) == 2312
    assert any("rows " in r.getMessage() for r in caplog.records)  # line numbers are reported
    for pair in pairs:
        assert pair["chosen"] and pair["rejected"] and len(pair["prompt"]) <= 256
        assert len(pair["prompt"]) + max(len(pair["chosen"]), len(pair["rejected"])) <= 512
    untruncated = [p for p in pairs if len(p["prompt"]) < 256]
    assert untruncated and all(tokenizer.decode(p["prompt"]).endswith("\n\nAssistant:") for p in untruncated)


# --------------------------------------------------------------------------- unpaired rows (KTO)


def test_unpaired_rows_text_and_messages(tokenizer):
    enc = encoder(tokenizer)
    text = enc({"prompt": "Say yes:", "completion": " yes", "label": True})
    assert text == {"prompt": tokenizer("Say yes:")["input_ids"],
                    "completion": tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                    "desirable": True}
    chat = enc({"prompt": MSG("user", "Say yes"), "completion": MSG("assistant", "no"), "label": False})
    assert tokenizer.decode(chat["completion"]).startswith("no<|im_end|>") and chat["desirable"] is False


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completion": " c", "label": "yes"}, "true or false"),
    ({"prompt": "p", "completion": " c"}, "label"),
    ({"completion": " c", "label": True}, "prompt"),
    ({"prompt": "p", "completion": 3, "label": True}, "messages"),
])
def test_malformed_unpaired_rows_raise(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        encoder(tokenizer)(row)


def test_empty_unpaired_completion_is_skipped(tokenizer):
    with pytest.raises(Skip, match="empty"):
        encoder(tokenizer)({"prompt": "p", "completion": "  ", "label": True})


def test_a_source_cannot_mix_paired_and_unpaired_rows(tokenizer):
    rows = [(1, {"prompt": "p", "chosen": " a", "rejected": " b"}), (2, {"prompt": "p", "completion": " a", "label": True})]
    with pytest.raises(DataError, match="row 2: a unpaired row, but row 1 is standard"):
        encode_rows(rows, encoder(tokenizer), "mixed.jsonl", "reference")


def test_collator_for_unpaired_rows_and_kl_rotation():
    from simpo_lightning.data import mismatched_batch

    rows = [{"prompt": [1, 2], "completion": [3], "desirable": True}, {"prompt": [4], "completion": [5, 6, 7], "desirable": False},
            {"prompt": [8, 9, 10], "completion": [11, 12], "desirable": True}]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["completion_labels"][1].tolist() == [IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX]
    kl = mismatched_batch(batch["completion_input_ids"], batch["completion_attention_mask"], batch["completion_labels"], 0)
    # row i: prompt i + completion i - 1 (cyclic), as TRL's KTOTrainer
    assert kl["input_ids"].tolist() == [[1, 2, 11, 12, 0, 0], [4, 3, 0, 0, 0, 0], [8, 9, 10, 5, 6, 7]]
    assert kl["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert kl["attention_mask"].sum(-1).tolist() == [4, 2, 6]


@pytest.mark.parametrize("world_size", [1, 2])
def test_global_batch_sampler_bucketing_is_a_seeded_partition_with_less_padding(world_size):
    from simpo_lightning.data import GlobalBatchSampler

    lengths = torch.randint(10, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()

    def epoch(sampler_lengths, epoch, seed=0):
        samplers = [GlobalBatchSampler(300, 4, world_size, rank, seed, sampler_lengths, pool=8) for rank in range(world_size)]
        for s in samplers:
            s.set_epoch(epoch)
        return [b for s in samplers for b in s._batches()]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    bucketed = epoch(lengths, 0)
    assert sorted(i for b in bucketed for i in b) == list(range(300))  # every example once
    assert bucketed == epoch(lengths, 0) and bucketed != epoch(lengths, 1) and bucketed != epoch(lengths, 0, seed=1)
    assert padding(bucketed) < 0.25 * padding(epoch(None, 0))


def test_datamodule_group_by_length_covers_the_split_with_less_padding(tokenizer):
    widths = {}
    for grouped in (False, True):
        dm = PreferenceDataModule(tokenizer=tokenizer, cache_dir=None, batch_size=4, group_by_length=grouped)
        dm.setup()
        batches = list(dm.train_dataloader())
        assert sum(len(b["chosen_input_ids"]) for b in batches) == len(dm.splits["train"])
        widths[grouped] = sum(b["chosen_input_ids"].numel() for b in batches)
    assert widths[True] < widths[False]
