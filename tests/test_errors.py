"""User errors through the real command: one line, ``simpo-lightning: error: …``, exit status 2, no
traceback; bugs keep theirs; a failing process ends a multi-process run."""

import gzip
import json
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from simpo_lightning.cli import main
from simpo_lightning.data import DataError
from simpo_lightning.errors import one_line

from helpers import ROOT, TWO_PROCESSES, run_command, tiny_args, write_jsonl

GOOD = {"prompt": "Q", "chosen": " yes", "rejected": " no"}


def bad_inputs(folder) -> dict[str, tuple[str, str]]:
    """name -> (data file, what the error line must say)."""
    (folder / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    with gzip.open(folder / "whole.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({**GOOD, "prompt": f"Q{i}"}) for i in range(200)))
    (folder / "truncated.jsonl.gz").write_bytes((folder / "whole.jsonl.gz").read_bytes()[:-40])
    (folder / "empty.jsonl").write_text("")
    chat = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    files = {
        "missing column": ([GOOD, {"prompt": "Q", "chosen": "a"}], "row 2: missing column 'rejected'"),
        "wrong type": ([GOOD, {**GOOD, "chosen": 3}], "row 2: column 'chosen' must be a string"),
        "null": ([GOOD, {**GOOD, "rejected": None}], "row 2: column 'rejected' must be a string"),
        "bad json": ([GOOD, '{"prompt": "Q",'], ":2: not valid JSON"),
        "all skipped": ([{**GOOD, "chosen": " same", "rejected": " same"}] * 3, "all 3 rows were skipped"),
        "format mix": ([GOOD, chat], "row 2: a conversational row, but row 1 is standard"),
    }
    cases = {
        name: (str(write_jsonl(folder / f"{name.replace(' ', '-')}.jsonl", rows)), said)
        for name, (rows, said) in files.items()
    }
    cases["binary file"] = (str(folder / "binary.jsonl"), "not UTF-8 text")
    cases["truncated gz"] = (str(folder / "truncated.jsonl.gz"), "truncated or corrupt")
    cases["empty file"] = (str(folder / "empty.jsonl"), "no rows (the file is empty)")
    cases["missing file"] = (str(folder / "nowhere.jsonl"), "data.train_data: no such file")
    return cases


def tiny_fit(tiny_dir: str, *extra: str) -> list[str]:
    """``fit`` on the tiny model with no logger, callbacks or checkpoints."""
    quiet = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    return ["fit", *tiny_args(tiny_dir, Path("."), *quiet, *extra)]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith("simpo-lightning: error")]


def test_every_bad_input_is_one_line_and_exit_status_2(tiny_dir, tmp_path, capsys):
    for name, (path, said) in bad_inputs(tmp_path).items():
        with pytest.raises(SystemExit) as exit:
            main(tiny_fit(tiny_dir, "--data.train_data", path, "--data.val_data", path))
        lines = error_lines(capsys.readouterr().err)
        assert exit.value.code == 2 and len(lines) == 1, (name, lines)
        assert said in lines[0] and path.split("/")[-1] in lines[0], (name, lines[0])


@pytest.mark.parametrize(
    "args, said",
    [
        (
            ["--model.loss.loss_type", "cubic"],
            "model.loss.loss_type: got 'cubic'; expected one of 'sigmoid', 'hinge' or null",
        ),
        (["--model.los.beta", "3"], "model: unrecognized arguments: --los.beta=3"),
        (["--data.batch_size", "four"], "data.batch_size: got 'four'; expected int (see --help)"),
        (["--model.policy.name_or_path", "/no/such/model"], "model.policy.name_or_path: no such folder /no/such/model"),
        (["--ckpt_path", "/no/such.ckpt"], "--ckpt_path /no/such.ckpt: no such checkpoint"),
        (["--config", "/no/such.yaml"], "config: File does not exist: '/no/such.yaml'"),
    ],
    ids=["bad value", "unknown key", "bad type", "model path", "checkpoint", "config file"],
)
def test_configuration_errors_are_one_line(tiny_dir, capsys, args, said):
    with pytest.raises(SystemExit) as exit:
        main(tiny_fit(tiny_dir, *args))
    lines = error_lines(capsys.readouterr().err)
    assert exit.value.code == 2 and len(lines) == 1 and said in lines[0], lines


def test_one_line_condenses_jsonargparse_messages():
    text = (
        'Parser key "data.batch_size":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
        "[<class 'int'>, <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'int'>\n    - Expected a <class "
        "'NoneType'>\n  Given value type: <class 'str'>\n  Given value: four"
    )
    assert one_line(ValueError(text)) == "data.batch_size: got 'four'; expected int or null (see --help)"
    assert one_line(ValueError("first\n  second")) == "first second"


@pytest.mark.slow
def test_the_console_script_prints_one_line_and_exits_2(tiny_dir, tmp_path):
    """The installed command, as a user runs it."""
    path = str(write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Q"}]))
    result = run_command(tiny_fit(tiny_dir, "--data.train_data", path), tmp_path, check=False)
    assert result.returncode == 2 and error_lines(result.stderr) == [
        f"simpo-lightning: error: {path} row 2: missing column 'chosen' (has ['prompt']); set data.columns"
    ]


def test_debugging_shows_the_traceback_and_bugs_keep_theirs(tiny_dir, tmp_path, monkeypatch):
    """SIMPO_LIGHTNING_DEBUG=1 lets a user error through as the exception; a bug always goes through."""
    path = str(write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Q"}]))
    monkeypatch.setenv("SIMPO_LIGHTNING_DEBUG", "1")
    with pytest.raises(DataError, match="missing column 'chosen'"):
        main(tiny_fit(tiny_dir, "--data.train_data", path))
    monkeypatch.delenv("SIMPO_LIGHTNING_DEBUG")
    crash = {"class_path": "test_errors.FailIn", "init_args": {"rank": 0, "error": "RuntimeError"}}
    with pytest.raises(RuntimeError, match="failed on purpose"):
        main(tiny_fit(tiny_dir, "--trainer.callbacks", json.dumps([crash])))


class FailIn(Callback):
    """Raises ``error`` in process ``rank`` at set-up, as bad data on one node or a bug would."""

    def __init__(self, rank: int, error: str = "DataError"):
        self.rank, self.error = rank, error

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.global_rank == self.rank:
            raise {"DataError": DataError, "RuntimeError": RuntimeError}[self.error]("failed on purpose")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_an_error_in_one_process_ends_the_whole_run(tiny_dir, tmp_path, rank):
    """Two FSDP2 processes; one fails at set-up while the other goes on to its first collective and
    would wait there for ever: the run must end, non-zero, with the one-line error."""
    fail = json.dumps([{"class_path": "test_errors.FailIn", "init_args": {"rank": rank}}])
    start = time.perf_counter()
    args = tiny_fit(tiny_dir, *TWO_PROCESSES, "--data.batch_size", "2", "--trainer.callbacks", fail)
    result = run_command(args, tmp_path, check=False, PYTHONPATH=str(ROOT / "tests"))
    assert result.returncode != 0 and time.perf_counter() - start < 120
    assert "failed on purpose" in " ".join(error_lines(result.stderr))
