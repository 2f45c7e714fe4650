"""Row formats and tokenisation: what each row becomes, and which rows are errors or skips."""

import gzip
import json
import logging

import pytest

from simpo_lightning.data import (
    Columns,
    DataError,
    PairEncoder,
    PreferenceDataModule,
    Skip,
    Truncation,
    encode_rows,
)

from helpers import SHARED_DATA, write_jsonl

MSG = lambda role, text: [{"role": role, "content": text}]  # noqa: E731


def encoder(tokenizer, **truncation) -> PairEncoder:
    return PairEncoder(tokenizer, Columns(), Truncation(**truncation), "auto")


def test_standard_row(tokenizer):
    pair = encoder(tokenizer)({"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5"})
    assert pair["prompt"] == tokenizer("Question: 2+2?\nAnswer:")["input_ids"]
    assert pair["chosen"] == tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert pair["rejected"][-1] == tokenizer.eos_token_id


def test_conversational_row_uses_chat_template(tokenizer):
    row = {
        "prompt": MSG("user", "Capital of France?"),
        "chosen": MSG("assistant", "Paris"),
        "rejected": MSG("assistant", "Rome"),
    }
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
        (
            {"prompt": MSG("user", "Q"), "chosen": MSG("assistant", ""), "rejected": MSG("assistant", "x")},
            "empty response",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"},
            "hh: no shared prompt",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            "hh: dialogues differ before the last assistant turn",
        ),
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
        (
            {"prompt": MSG("user", "Q"), "chosen": [{"role": "assistant"}], "rejected": MSG("assistant", "b")},
            "column 'chosen' must be a list of",
        ),
        ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "column 'chosen' must be a list of"),
        ("just a string", "expected an object"),
    ],
)
def test_malformed_rows_raise(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        encoder(tokenizer)(row)


def test_error_names_file_and_row(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}]
    )
    dm = PreferenceDataModule(train_data=str(path), tokenizer=tokenizer, cache_dir=None)
    with pytest.raises(DataError, match=r"d\.jsonl row 2: missing column 'rejected'"):
        dm.setup()


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


def test_truncation_keeps_the_end_of_long_prompts(tokenizer):
    row = {"prompt": " ".join(f"w{i}" for i in range(100)), "chosen": " one two three four", "rejected": " no"}
    full = encoder(tokenizer, max_length=2000, max_prompt_length=None)(row)
    end = encoder(tokenizer, max_length=20, max_prompt_length=12)(row)
    start = encoder(tokenizer, max_length=20, max_prompt_length=12, mode="keep_start")(row)
    assert end["prompt"] == full["prompt"][-12:] and start["prompt"] == full["prompt"][:12]
    assert end["chosen"] == full["chosen"][:8] and end["rejected"] == full["rejected"]
    with pytest.raises(Skip, match="no room"):
        encoder(tokenizer, max_length=20, max_prompt_length=None)(row)


@pytest.mark.skipif(
    not (SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz").is_file(),
    reason="../shared/data absent (project checkout only)",
)
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


def test_unpaired_rows_text_and_messages(tokenizer):
    enc = encoder(tokenizer)
    text = enc({"prompt": "Say yes:", "completion": " yes", "label": True})
    assert text == {
        "prompt": tokenizer("Say yes:")["input_ids"],
        "completion": tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        "desirable": True,
    }
    chat = enc({"prompt": MSG("user", "Say yes"), "completion": MSG("assistant", "no"), "label": False})
    assert tokenizer.decode(chat["completion"]).startswith("no<|im_end|>") and chat["desirable"] is False


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "completion": " c", "label": "yes"}, "true or false"),
        ({"prompt": "p", "completion": " c"}, "label"),
        ({"completion": " c", "label": True}, "prompt"),
        ({"prompt": "p", "completion": 3, "label": True}, "messages"),
    ],
)
def test_malformed_unpaired_rows_raise(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        encoder(tokenizer)(row)


def test_empty_unpaired_completion_is_skipped(tokenizer):
    with pytest.raises(Skip, match="empty"):
        encoder(tokenizer)({"prompt": "p", "completion": "  ", "label": True})


def test_a_source_cannot_mix_paired_and_unpaired_rows(tokenizer):
    rows = [
        (1, {"prompt": "p", "chosen": " a", "rejected": " b"}),
        (2, {"prompt": "p", "completion": " a", "label": True}),
    ]
    with pytest.raises(DataError, match="row 2: a unpaired row, but row 1 is standard"):
        encode_rows(rows, encoder(tokenizer), "mixed.jsonl", "reference")
