"""``inspect``: the data as the model receives it, on the demo, the HH-RLHF file, a conversational file and a file
built to hold a double BOS."""

import pytest

from simpo_lightning.cli import main

from helpers import ROOT, SHARED_DATA, write_jsonl

TEMPLATE_END = "<|im_start|>assistant\n"


def run(capsys, tmp_path, config: str, *extra: str) -> str:
    main(["inspect", "--config", str(ROOT / "configs" / config), "--output_dir", str(tmp_path / "out"), *extra])
    assert (tmp_path / "out/lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return capsys.readouterr().out


def test_the_demo_as_the_model_sees_it(capsys, tmp_path):
    out = run(capsys, tmp_path, "quickstart.yaml", "--rows", "2", "--color", "false")
    assert out.count("⟦prompt: 43 tokens⟧") == 4 and "What is the capital of France?" in out  # 2 rows, 2 splits
    assert "prompt→chosen: ['ass', 'istant', 'Ċ'] [520, 9531, 198] | ['Paris', '<|im_end|>', 'Ċ']" in out
    assert "298 pairs; skipped rows by reason: none" in out and "warnings over all rows: none" in out
    assert "\x1b[" not in out  # plain when not a terminal


def test_the_hh_file_and_a_conversational_file(capsys, tmp_path):
    hh = SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz"
    if not hh.is_file():
        pytest.skip(f"{hh}: the shared HH-RLHF file is not beside this checkout")
    out = run(capsys, tmp_path, "datasets/hh-rlhf.yaml", "--train_data", str(hh), "--rows", "1")
    assert "Human:" in out and "Assistant:" in out and "tokens (min, median, 90%, 99%, max)" in out
    assert "at max_length (possibly truncated)" in out
    messages = [{"role": "user", "content": "Say yes."}]
    rows = [
        {
            "chosen": [*messages, {"role": "assistant", "content": "Yes."}],
            "rejected": [*messages, {"role": "assistant", "content": "No."}],
        }
    ] * 3
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = run(capsys, tmp_path, "quickstart.yaml", "--train_data", str(data), "--rows", "1")
    assert f"<|im_start|>user\nSay yes.<|im_end|>\n{TEMPLATE_END}" in out and "⟦chosen: 4 tokens⟧ Yes.<|im_end|>" in out
    assert "warnings over all rows: none" in out.split("train:")[1].split("val:")[0]


def test_a_double_bos_warns(capsys, tmp_path):
    prompt = f"<|im_start|><|im_start|>user\nSay yes.<|im_end|>\n{TEMPLATE_END}"
    rows = [{"prompt": prompt, "chosen": "Yes.<|im_end|>\n", "rejected": "No.<|im_end|>\n"}] * 10
    data = write_jsonl(tmp_path / "double-bos.jsonl", rows)
    out = run(capsys, tmp_path, "quickstart.yaml", "--train_data", str(data), "--rows", "1")
    assert "warning: BOS twice at the start of the prompt" in out
    train = out.split("train: ")[1].split("val:")[0]
    pairs = int(train.split(" pairs")[0])
    assert pairs >= 8 and f"{{'BOS twice at the start of the prompt': {pairs}}}" in train  # counted over every row
