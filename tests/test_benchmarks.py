"""The benchmark scripts run (on a tiny model); their numbers are for people, not for tests."""

import subprocess
import sys

import pytest

from helpers import ROOT, run_command, tiny_model_args


def script(command: list[str], cwd) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in a fork of a process that has imported torch and Lightning, whose measuring
    processes are forks of it in turn (``BENCHMARK_FORK``)."""
    return run_command(command[1:], cwd, check=False, script=command[0], BENCHMARK_FORK="1")


@pytest.mark.slow
def test_vs_trl_harness_runs_and_reports_every_configuration(tmp_path):
    """TRL, ours and ours with DPO, each in its own process, then the ratios and the padding report. (The
    ``--lean`` variants are the settings of configs/variants/lean.yaml, which tests/test_configs.py runs.)"""
    command = [
        str(ROOT / "benchmarks/vs_trl.py"),
        "--tiny",
        "--steps",
        "2",
        "--precisions",
        "32",
        "--threads",
        "1",
        "--max_length",
        "128",
    ]
    result = script([*command, "--tunings", "full"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| full 32")]
    assert [row[0] for row in table] == ["| full 32 trl", "| full 32 ours", "| full 32 ours dpo"]
    assert all(float(row[1]) > 0 and float(row[4]) > 0 for row in table)  # pairs/s, peak RSS
    assert (
        "SimPO / DPO (frozen reference copy)" in result.stdout
        and "shared prompt, grouped by length (ours)" in result.stdout
    )


@pytest.mark.slow
def test_packing_benchmark_runs_every_layout_and_packs_more_pairs_with_less_padding(tmp_path):
    """Each layout in its own process on the first 256 HH-RLHF pairs (the demo's where the file is absent)."""
    command = [
        str(ROOT / "benchmarks/packing.py"),
        "--tiny",
        "--pairs",
        "256",
        "--steps",
        "1",
        "--datasets",
        "hh",
        "--threads",
        "1",
    ]
    result = script(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("| data | layout |")[1]
    rows = {row[1]: row for row in (line.split(" | ") for line in table.splitlines() if line.startswith("| hh |"))}
    assert list(rows) == ["default", "grouped", "packed"]
    padding = {layout: float(row[5].rstrip("%")) for layout, row in rows.items()}
    pairs = {layout: float(row[3]) for layout, row in rows.items()}
    assert padding["packed"] < 3 < padding["default"] and pairs["packed"] > pairs["default"]
    assert all(float(row[6]) > 0 for row in rows.values())  # real tokens/s


@pytest.mark.slow
def test_gpu_7b_script_runs_on_cpu_at_tiny_size(tmp_path):
    command = [
        str(ROOT / "benchmarks/gpu_7b.py"),
        "--cpu",
        "--tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--lengths",
        "64",
        "128",
        "--architectures",
        "llama-3-8b",  # the other is the same code on another config.json
    ]
    result = script(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [
        line.split(" | ")
        for line in result.stdout.splitlines()
        if line.startswith("| mistral-7b") or line.startswith("| llama-3-8b")
    ]
    assert len(rows) == 5 and all(float(row[6]) > 0 for row in rows)  # tokens/s of every run


def test_mfu_counts_lora_as_4n_and_refuses_to_print_more_than_the_peak():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peak import matmul_peak, mfu_cell, model_flops_per_token

    assert model_flops_per_token(100, 100) == 600 and model_flops_per_token(100, 1) == 402  # 6N full, ~4N LoRA
    assert mfu_cell(50.0, 100.0) == "50.0%"
    assert mfu_cell(126.0, 100.0) == "failed (126% of the measured peak)"
    assert matmul_peak("float32", shapes=[(64, 32, 16)], repeats=1, sizes=(64,)) > 0


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    """One of its four runs, a ``fit`` process as every run: FSDP2 with one device (LoRA is every other test's
    setting, and tests/test_weights.py trains 8- and 4-bit QLoRA through the same command options)."""
    command = [str(ROOT / "benchmarks/gpu_check.py"), "--cpu", "--steps", "1", "--batch_size", "2"]
    command += ["--runs", "fsdp-1-device-full"]
    result = script(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line.endswith("| ok |")]
    assert [row.split(" | ")[0][2:] for row in rows] == ["fsdp-1-device-full"]


@pytest.mark.slow
def test_margin_sensitivity_runs_and_reports_the_margin_it_trained_with(tiny_dir, tmp_path):
    command = [str(ROOT / "benchmarks/margin_sensitivity.py"), "--settings", "demo", "--margins"]
    command += ["auto", "--workdir", str(tmp_path), "--demo_config", "configs/testing/tiny.yaml"]
    command += ["--", *tiny_model_args(tiny_dir), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    command += ["--data.cache_dir", "null", "--model.loss.auto_pairs", "16"]
    result = script(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert float(rows["auto"][5]) > 0 and float(rows["auto"][6]) > 0  # the γ/β it set; the monitor's answer lengths


@pytest.mark.slow
def test_vs_trl_grpo_harness_runs_both_sides(tmp_path):
    command = [str(ROOT / "benchmarks/vs_trl_grpo.py"), "--tiny", "--steps", "1", "--warmup", "1"]
    command += ["--prompts", "2", "--g", "2", "--length", "3", "--threads", "1"]
    result = script(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in result.stdout.splitlines()
        if line.split()[:1] in (["trl"], ["ours"])
    }
    assert set(rows) == {"trl", "ours"} and all(float(v) > 0 for r in rows.values() for v in r)
    assert "ours/TRL" in result.stdout


@pytest.mark.slow
def test_compare_methods_gives_an_online_method_its_budget(tiny_dir, tmp_path):
    """The notes' comparison path: a wall-clock budget per fit, an online method from its demo config (PPO: its
    value adapters are a column of their own)."""
    command = [str(ROOT / "benchmarks/compare_methods.py"), "--methods", "ppo"]
    command += ["--budget", "0.02", "--workdir", str(tmp_path), "--", *tiny_model_args(tiny_dir)]
    command += ["--model.sampling.max_new_tokens", "3", "--data.cache_dir", "null", "--data.batch_size", "2"]
    result = script(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| ppo")]
    # a rollout at least, then stopped by max_time (1 s)
    assert "value (2nd adapters + head, same base)" in row and int(row.split(" | ")[3]) >= 1
