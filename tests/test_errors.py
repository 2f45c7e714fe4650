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

from helpers import ROOT, TWO_PROCESSES, run_command, tiny_args, tiny_model_args, write_jsonl

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


# --------------------------------------------------------------------------- every command


def judge(function: str) -> str:
    return json.dumps({"class_path": "simpo_lightning.generation.CallableJudge", "init_args": {"function": function}})


def wrong_count(prompts, responses, references):
    return [1.0]


def not_a_number(prompts, responses, references):
    return [float("nan")] * len(responses)


def command_cases(tiny_dir: str, folder: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """name -> (command line, what its one error line must say, files under ``folder`` it must not leave behind
    for a rerun to take as finished work); the files the cases read: ``case_files``."""
    grpo = [
        "--config",
        str(ROOT / "configs/online/grpo-demo.yaml"),
        *tiny_model_args(tiny_dir),
        "--data.cache_dir",
        "null",
    ]
    out = str(folder / "out.jsonl")
    generate = ["generate", "--prompts", "demo", "--output", out, "--model", tiny_dir, "--max_prompts", "2"]
    pairs = ["pairs", "--generations", str(folder / "generations.jsonl"), "--output", out]
    evaluate = ["evaluate", "--output_dir", str(folder / "evaluation"), "--max_prompts", "2"]
    export = ["export", "--output_dir", str(folder / "exported")]
    return {
        # fit, validate, test
        "corrupt checkpoint": (
            tiny_fit(tiny_dir, "--ckpt_path", str(folder / "corrupt.ckpt")),
            f"--ckpt_path {folder}/corrupt.ckpt: not a checkpoint file",
            [],
        ),
        "checkpoint folder": (
            ["validate", *tiny_fit(tiny_dir, "--ckpt_path", str(folder / "no-metadata"))[1:]],
            "not a sharded checkpoint (no .metadata",
            [],
        ),
        "missing checkpoint": (
            ["test", *tiny_fit(tiny_dir, "--ckpt_path", str(folder / "none.ckpt"))[1:]],
            "none.ckpt: no such checkpoint",
            [],
        ),
        "batch size 0": (tiny_fit(tiny_dir, "--data.batch_size", "0"), "data.batch_size = 0: at least one pair", []),
        "negative beta": (tiny_fit(tiny_dir, "--model.loss.beta", "-1"), "model.loss.beta = -1.0: must be > 0", []),
        "negative margin": (
            tiny_fit(tiny_dir, "--model.loss.gamma_beta_ratio", "-0.5"),
            "model.loss.gamma_beta_ratio = -0.5: must be ≥ 0",
            [],
        ),
        "label smoothing": (
            tiny_fit(tiny_dir, "--model.loss.label_smoothing", "0.5"),
            "label_smoothing = 0.5: must be in [0, 0.5)",
            [],
        ),
        "zero learning rate": (
            tiny_fit(tiny_dir, "--model.optimizer.init_args.lr", "0"),
            "model.optimizer: learning rate 0.0: must be > 0",
            [],
        ),
        "warm-up ratio 1": (tiny_fit(tiny_dir, "--model.warmup_ratio", "1"), "model.warmup_ratio = 1.0", []),
        "prompt budget": (
            tiny_fit(tiny_dir, "--data.truncation.max_prompt_length", "0"),
            "data.truncation.max_prompt_length = 0: must be ≥ 1, or null",
            [],
        ),
        "unknown model field": (
            tiny_fit(tiny_dir, "--model.policy.config_overrides", '{"hidden_sizes": 8}'),
            "config_overrides: LlamaConfig has no field 'hidden_sizes'",
            [],
        ),
        "quantization without LoRA": (
            tiny_fit(tiny_dir, "--model.lora", "null", "--model.policy.quantization", '{"bits": 4}'),
            "model.policy.quantization needs LoRA",
            [],
        ),
        "in-backward with clipping": (
            tiny_fit(tiny_dir, "--model.optimizer_in_backward", "true"),
            "cannot be combined with trainer.gradient_clip_val",
            [],
        ),
        "precomputed KTO reference": (
            tiny_fit(tiny_dir, "--model.loss.name", "kto", "--model.reference.precompute", "true"),
            "reference.precompute does not apply to kto",
            [],
        ),
        "GRPO one sample": (
            ["fit", *grpo, "--model.sampling.n", "1"],
            "GRPOModule needs 2 or more samples per prompt",
            [],
        ),
        "GRPO greedy": (
            ["fit", *grpo, "--model.sampling.temperature", "0"],
            "online sampling needs sampling.temperature > 0",
            [],
        ),
        "negative clip range": (
            ["fit", *grpo, "--model.update.epsilon", "-0.1"],
            "model.update.epsilon = -0.1: must be ≥ 0",
            [],
        ),
        # generate
        "negative temperature": (
            [*generate, "--sampling.temperature", "-1"],
            "sampling.temperature = -1.0: must be ≥ 0",
            ["out.jsonl", "out.jsonl.part0"],
        ),
        "top-p 0": ([*generate, "--sampling.top_p", "0"], "sampling.top_p = 0.0: must be in (0, 1]", ["out.jsonl"]),
        "missing model": (
            [*generate, "--model", str(folder / "nowhere")],
            f"--model {folder}/nowhere: no such checkpoint or model folder",
            ["out.jsonl"],
        ),
        "missing prompts": (
            [*generate, "--prompts", str(folder / "nowhere.jsonl")],
            "nowhere.jsonl: no such file",
            ["out.jsonl", "out.jsonl.part0"],
        ),
        # pairs
        "judge returns NaN": (
            [*pairs, "--judge", judge("test_errors.not_a_number")],
            "judge CallableJudge returned a non-finite score",
            ["out.jsonl"],
        ),
        "judge returns too few": (
            [*pairs, "--judge", judge("test_errors.wrong_count")],
            "judge CallableJudge returned 1 scores for 2 responses",
            ["out.jsonl"],
        ),
        "rule judge without references": (
            [*pairs, "--judge", "RuleJudge"],
            "RuleJudge needs a reference answer for every prompt",
            ["out.jsonl"],
        ),
        "one response per prompt": (
            ["pairs", "--generations", str(folder / "one-response.jsonl"), "--output", out, "--judge", "RuleJudge"],
            "pairs need at least 2 responses per prompt",
            ["out.jsonl"],
        ),
        "generations without responses": (
            ["pairs", "--generations", str(folder / "no-responses.jsonl"), "--output", out, "--judge", "RuleJudge"],
            "no-responses.jsonl:1: a row needs 'prompt' and 'responses'",
            ["out.jsonl"],
        ),
        "no generations": (
            ["pairs", "--generations", str(folder / "nowhere.jsonl"), "--output", out, "--judge", "RuleJudge"],
            "nowhere.jsonl: no generations (run generate first)",
            ["out.jsonl"],
        ),
        # rounds
        "missing fit config": (
            ["rounds", "--fit_config", str(folder / "none.yaml"), "--run_dir", str(folder / "rounds")],
            "none.yaml: no such file",
            ["rounds"],
        ),
        "random-init fit config": (
            ["rounds", "--fit_config", str(ROOT / "configs/testing/tiny.yaml"), "--run_dir", str(folder / "rounds")],
            "random_init weights are made anew by every fit",
            ["rounds"],
        ),
        "zero rounds": (
            ["rounds", "--fit_config", str(ROOT / "configs/testing/tiny.yaml"), "--rounds", "0"],
            "rounds = 0: at least one round",
            [],
        ),
        # evaluate
        "missing candidate": (
            [*evaluate, "--candidates", json.dumps([str(folder / "none.ckpt")])],
            "none.ckpt: no such checkpoint or model folder",
            ["evaluation"],
        ),
        "pattern matching nothing": (
            [*evaluate, "--candidates", json.dumps([str(folder / "runs/*/last.ckpt")])],
            "matches nothing",
            ["evaluation"],
        ),
        "missing reward model": (
            [
                *evaluate,
                "--candidates",
                json.dumps([tiny_dir]),
                "--judge",
                json.dumps({"class_path": "RewardModelJudge", "init_args": {"name_or_path": str(folder / "rm")}}),
            ],
            "judge (RewardModelJudge) name_or_path",
            ["evaluation"],
        ),
        "reference on both sides": (
            [*evaluate, "--candidates", '["reference"]', "--baseline", "reference"],
            "the reference answers cannot be both the baseline and a candidate",
            ["evaluation"],
        ),
        # export
        "export a corrupt checkpoint": (
            [*export, "--ckpt_path", str(folder / "corrupt.ckpt")],
            "corrupt.ckpt: not a readable checkpoint",
            ["exported"],
        ),
        # estimate
        "estimate without a config file": (
            ["estimate", "--config", str(folder / "none.yaml")],
            "none.yaml: no such file",
            [],
        ),
        "estimate on an unknown GPU": (
            ["estimate", "--config", str(ROOT / "configs/testing/tiny.yaml"), "--gpu", "V100"],
            "--gpu V100: one of A100, H100, H200",
            [],
        ),
        "estimate an unknown architecture": (
            ["estimate", "--config", str(ROOT / "configs/testing/tiny.yaml"), "--architecture", "gpt-9"],
            "--architecture gpt-9: no such file; the shipped ones are llama-3-70b, llama-3-8b, llama-3.2-1b, "
            "mistral-7b",
            [],
        ),
        # the command itself
        "unknown command": (
            ["frobnicate"],
            "no command 'frobnicate'; the commands are fit, validate, test, estimate, evaluate, export, generate, "
            "inspect, pairs, rounds",
            [],
        ),
        "predict": (["predict", "--config", str(ROOT / "configs/testing/tiny.yaml")], "`generate` answers prompts", []),
        "unknown option": ([*generate, "--frob", "1"], "unrecognized arguments: --frob", ["out.jsonl"]),
    }


def case_files(folder: Path) -> None:
    (folder / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not a whole zip file")
    (folder / "no-metadata").mkdir()
    generations = {"prompt": "Say hi.", "responses": ["hi", "hello there"]}
    write_jsonl(folder / "generations.jsonl", [generations])  # as another tool writes it: no reference, no tokens
    write_jsonl(folder / "one-response.jsonl", [{**generations, "responses": ["hi"]}])
    write_jsonl(folder / "no-responses.jsonl", [{"prompt": "Say hi."}])


@pytest.mark.parametrize("name", list(command_cases("tiny", Path("folder"))))
def test_bad_input_through_every_command_is_one_line_and_exit_status_2(name, tiny_dir, tmp_path, capsys):
    """The command's own entry point (``cli.main``, which the console script calls) in this process; two cases
    also run through the installed console script below."""
    case_files(tmp_path)
    args, said, absent = command_cases(tiny_dir, tmp_path)[name]
    with pytest.raises(SystemExit) as exit:
        main(args)
    lines = error_lines(capsys.readouterr().err)
    assert exit.value.code == 2 and len(lines) == 1, lines
    assert said in lines[0], lines[0]
    assert not [path for path in absent if (tmp_path / path).exists()]


@pytest.mark.slow
def test_the_console_script_prints_one_line_and_exits_2(tiny_dir, tmp_path):
    """The installed command, as a user runs it, on a data error in fit (a process costs seconds of start-up; every
    case of the catalogue runs the same entry point in this process above)."""
    path = str(write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Q"}]))
    args = tiny_fit(tiny_dir, "--data.train_data", path)
    result = run_command(args, tmp_path, check=False, fresh=True)
    lines = error_lines(result.stderr)
    said = f"{path} row 2: missing column 'chosen' (has ['prompt'])"
    assert result.returncode == 2 and len(lines) == 1 and said in lines[0], lines


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
