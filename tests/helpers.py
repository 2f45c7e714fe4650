"""Test helpers: the rounding rule for comparing floating-point paths, the tiny module and Trainer the
unit tests build, the real command in a subprocess, and readers of the files runs write.

The rounding rule.

Two computations that are equal in exact arithmetic (chunked and full logits, a shared-prompt
sequence and two separate ones, this package and TRL) differ in floating point by their rounding,
and the rounding differs between CPUs: AVX2, AVX-512 and AMX kernels block a matrix product
differently and so sum in a different order. A tolerance tuned on one machine fails on another.
The rule used instead, written once here:

    |computed - reference| <= c · eps · √K · max|reference|

with ``reference`` the same quantity in float64 (rounding 2^-53, negligible against float32's
2^-24), ``eps`` the machine epsilon of the dtype the path computes in, and K the length of the
longest reduction (sum) on the way: a sum of K rounded terms drifts like a random walk of K steps
of eps times the size of the terms (Higham and Mary, "A new approach to probabilistic rounding
error analysis", 2019), whatever order the kernel sums in. ``max|reference|`` over the whole
tensor stands for the size of the terms, because an element that cancels to near 0 still carries
the rounding of its large terms. ``c`` (default 8) covers a few reductions in a row (a layer's
products, then the log-softmax over the vocabulary). Each path is checked against float64 on its
own, so neither float32 path is the reference for the other.

Training curves of two such paths (a few optimizer steps, each amplifying differences) are run with
float64 weights and plain SGD. Adam would not do: it divides each step by √v + eps and so multiplies
a gradient's rounding by up to lr / eps (10^6 at lr 1e-2). Float64 weights do not make every step
float64: transformers' Llama computes RMSNorm and the rotary embedding in float32 whatever the
weights, so an element can carry one float32 rounding there, not a sum of them. The curves are held
to the float32 rule (K: the vocabulary), which a run in float32 with Adam would exceed, while a real
difference in the computation moves the loss by 1e-2 or more. Where a path can only run in float32
(FSDP converts the weights to float32), its curve is held to the same rule around a float64 run of
the other path, step by step.
"""

import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from simpo_lightning.data import PreferenceDataModule
from simpo_lightning.generation.judges import Judge
from simpo_lightning.losses.config import LossConfig
from simpo_lightning.methods.preference import SimPOModule
from simpo_lightning.methods.reference import ReferenceConfig
from simpo_lightning.models.loading import LoraConfig, PolicyConfig

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SHARED_DATA = ROOT.parent / "shared" / "data"
VOCAB = 49152  # SmolLM2's vocabulary: the longest reduction of a step (the log-softmax)
TINY_LORA = LoraConfig(r=4, alpha=8)

EPS = {
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float64: torch.finfo(torch.float64).eps,
}


def rounding_bound(
    reference: Tensor | float, reduction: int, dtype: torch.dtype = torch.float32, c: float = 8.0
) -> float:
    """c · eps(dtype) · √K · max|reference|: the largest error the rule allows (module docstring)."""
    scale = torch.as_tensor(reference).abs().max().item()
    return c * EPS[dtype] * math.sqrt(reduction) * scale


def assert_rounding_close(
    actual: Tensor | float,
    reference: Tensor | float,
    reduction: int,
    dtype: torch.dtype = torch.float32,
    c: float = 8.0,
    what: str = "",
) -> None:
    """``actual`` (computed in ``dtype``) is within the rounding rule of ``reference`` (float64)."""
    actual, reference = torch.as_tensor(actual).double(), torch.as_tensor(reference).double()
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    error = (actual - reference).abs().max().item()
    bound = rounding_bound(reference, reduction, dtype, c)
    assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g} = {c}·eps({dtype})·√{reduction}·max|reference|"


def assert_curves_equal(curve: list[float], reference: list[float], reduction: int = 49152) -> None:
    """Loss curves of two float64, SGD runs of algebraically equal paths, step by step (module docstring)."""
    assert len(curve) == len(reference) > 0
    for step, (a, b) in enumerate(zip(curve, reference)):
        assert_rounding_close(a, b, reduction, what=f"step {step}")


def slow_reference(model, prompt: list[int], response: list[int]) -> float:
    """Mean log p(response | prompt), one unpadded sequence, token by token."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    total = 0.0
    for i, token in enumerate(response):
        position = len(prompt) + i - 1  # logits at position t predict token t + 1
        total += torch.log_softmax(logits[position].double(), -1)[token].item()
    return total / len(response)


# --------------------------------------------------------------------------- tiny runs


def tiny_module(
    tiny_dir: str,
    name: str = "simpo",
    lora: LoraConfig | None = TINY_LORA,
    sgd: bool = False,
    reference: ReferenceConfig = ReferenceConfig(),
    **kwargs,
) -> SimPOModule:
    """A module on the tiny model: AdamW at lr 1e-2, or plain SGD (``sgd``, for float64 curves: see the
    rounding rule), no warm-up."""
    optimizer = (lambda p: torch.optim.SGD(p, lr=0.5)) if sgd else (lambda p: torch.optim.AdamW(p, lr=1e-2))
    return SimPOModule(
        policy=PolicyConfig(name_or_path=tiny_dir),
        lora=lora,
        loss=kwargs.pop("loss", LossConfig(name=name)),
        reference=reference,
        optimizer=optimizer,
        warmup_ratio=0.0,
        **kwargs,
    )


def demo_data(module: SimPOModule, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(tokenizer=module.tokenizer, **({"batch_size": 4, "cache_dir": None} | kwargs))


def trainer(**kwargs) -> L.Trainer:
    """A quiet CPU Trainer: 3 steps, no logger, checkpoints or progress bar, 2 validation batches."""
    defaults = dict(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class LossCurve(L.Callback):
    """Records the training loss of each step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


class LogGradientNorm(L.Callback):
    """Logs ``train/grad_norm``: the global norm (float64) of the gradients each optimizer step uses, before
    clipping; under DDP, after its averaging over processes."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad.double() for p in module.parameters() if p.grad is not None]
        module.log("train/grad_norm", torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


class GradientsHeld(L.Callback):
    """Records, after each training batch (gradients are kept until the next step), how many trainable
    parameters still hold a gradient and the global norm of those gradients."""

    def __init__(self):
        self.counts, self.norms = [], []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        self.counts.append(len(grads))
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0)


class Interrupt(L.Callback):
    """Stops a run with an exception after ``step`` optimizer steps, as a crash or a kill would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt("interrupted for the test")


class StepsTaken(L.Callback):
    """Records ``global_step`` at the start of each training batch: where a (resumed) run began, and how far."""

    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.steps.append(trainer.global_step)


def snapshot(module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before: dict[str, Tensor], module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


# --------------------------------------------------------------------------- the command


FSDP2 = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}
TWO_PROCESSES = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", json.dumps(FSDP2)]
EVERY_STEP_CHECKPOINT = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1},
}


def csv_logger(save_dir: Path, name: str = "run") -> str:
    """A CSVLogger writing ``save_dir/name/version_N/metrics.csv``, as a command-line value."""
    return json.dumps(
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir), "name": name}}
    )


def tiny_model_args(tiny_dir: str) -> list[str]:
    """Command-line options that make a config's policy the tiny model."""
    return ["--model.policy.name_or_path", tiny_dir, "--model.policy.random_init", "false"] + [
        "--model.policy.config_overrides",
        "{}",
    ]


def tiny_args(tiny_dir: str, save_dir: Path, *extra: str, config: str = "testing/tiny.yaml") -> list[str]:
    """``--config configs/<config>`` on the tiny model, a CSV logger under ``save_dir/run``, a checkpoint
    every step, no validation, no data cache."""
    tiny = tiny_model_args(tiny_dir)
    run = ["--trainer.logger", csv_logger(save_dir), "--trainer.callbacks", json.dumps([EVERY_STEP_CHECKPOINT])]
    return [
        "--config",
        str(ROOT / "configs" / config),
        *tiny,
        *run,
        "--trainer.limit_val_batches",
        "0",
        "--data.cache_dir",
        "null",
        *extra,
    ]


CONSOLE_SCRIPT = str(Path(sys.executable).with_name("simpo-lightning"))

# The process behind ``run_command``: it imports the command once, then forks a child for each run (a child for each
# rank of a run of several processes), which sets its argv, working folder, environment and output files as a new
# process would and calls the console script's function; importing torch, Lightning and transformers takes seconds
# a process, on a slow CPU twice that. Nothing has run a computation in it before a fork (no thread pool to copy
# half-alive). As torchrun's agent does, a rank that fails ends the others.
FORK_SERVER = r"""
import json, os, runpy, signal, sys
import simpo_lightning.cli, simpo_lightning.methods, peft
from simpo_lightning.cli import main

def run(job, process):
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(process["env"])
    sys.path[:0] = [p for p in process["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    for fd, path in ((1, process["stdout"]), (2, process["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [job["script"], *job["args"]]
    code = 0
    try:
        if job["script"].endswith(".py"):  # a script, run as ``python SCRIPT`` would
            sys.path.insert(0, os.path.dirname(job["script"]))
            runpy.run_path(job["script"], run_name="__main__")
        else:
            main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    import atexit
    atexit._run_exitfuncs()  # what the interpreter runs at exit (W&B finishes its run there)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    job = json.loads(line)
    ranks = {}
    for rank, process in enumerate(job["processes"]):
        pid = os.fork()
        if pid == 0:
            run(job, process)
        ranks[pid] = rank
    ended = []  # exit statuses in the order the ranks ended
    while ranks:
        pid, status = os.wait()
        if pid in ranks:
            ranks.pop(pid)
            ended.append(os.waitstatus_to_exitcode(status))
            if ended[-1] != 0:
                for other in ranks:
                    os.kill(other, signal.SIGKILL)
    print(json.dumps(ended), flush=True)
"""
_server: subprocess.Popen | None = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_command(
    args: list[str],
    cwd: Path,
    check: bool = True,
    fresh: bool = False,
    script: Path | None = None,
    ranks: int = 1,
    **env: str,
) -> subprocess.CompletedProcess:
    """The ``simpo-lightning`` command (or the Python ``script``) in a process of its own, without W&B settings or
    ~/.netrc (HOME is ``cwd``), so W&B must fall back to offline by itself; ``check`` asserts exit status 0. The
    model cache stays the session's, so the default model is not de-quantized again in every new HOME. The process
    is a fork of one that has imported the command (``FORK_SERVER``); ``fresh`` runs the installed console script
    (or ``python script``) itself. ``ranks`` > 1: that many processes started as ``torchrun --nproc-per-node``
    starts them (its environment variables: Lightning takes the processes as made outside it and starts none), the
    first one's output as stdout and stderr, then the others' stderr; the exit status is that of the first to end
    non-zero."""
    from simpo_lightning.cache import CACHE_ENV, cache_root

    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(cwd)}
    environment |= {CACHE_ENV: str(cache_root())} | env
    if fresh:
        executable = [sys.executable, str(script)] if script else [CONSOLE_SCRIPT]
        result = subprocess.run(
            [*executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
        )
    else:
        result = forked_run(args, cwd, environment, script, ranks)
    assert not check or result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def forked_run(
    args: list[str], cwd: Path, environment: dict[str, str], script: Path | None, ranks: int
) -> subprocess.CompletedProcess:
    """``run_command``'s run in ``ranks`` forks of the fork server (started on first use)."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    torchrun = {}  # the variables torchrun sets, where there are several ranks
    if ranks > 1:
        torchrun = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "GROUP_RANK": "0"}
        torchrun |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TORCHELASTIC_RUN_ID": "tests"}
    processes = []
    for rank in range(ranks):
        out, err = (Path(cwd) / f".run-{os.getpid()}-{rank}.{kind}" for kind in ("out", "err"))
        own = torchrun | {"RANK": str(rank), "LOCAL_RANK": str(rank)} if torchrun else {}
        processes.append({"env": environment | own, "stdout": str(out), "stderr": str(err)})
    job = {"args": args, "cwd": str(cwd), "processes": processes, "script": str(script or CONSOLE_SCRIPT)}
    _server.stdin.write(json.dumps(job) + "\n")
    _server.stdin.flush()
    ended = json.loads(_server.stdout.readline())
    outputs = [(Path(p["stdout"]).read_text(), Path(p["stderr"]).read_text()) for p in processes]
    for p in processes:
        Path(p["stdout"]).unlink()
        Path(p["stderr"]).unlink()
    stderr = "".join(err if rank == 0 else f"\n--- rank {rank}\n{err}" for rank, (_, err) in enumerate(outputs))
    code = next((c for c in ended if c != 0), 0)
    return subprocess.CompletedProcess(args, code, outputs[0][0], stderr)


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args`` in a process of its own, a fork of the one behind ``run_command`` (torch, Lightning
    and the package imported: seconds of start-up less); the code is written to a file in ``cwd`` first."""
    script = Path(cwd) / "probe.py"
    script.write_text(code)
    return run_command(list(args), cwd, check=False, script=script)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def csv_losses(metrics: Path, key: str = "train/loss") -> dict[int, float]:
    """``key`` (``train/loss``) by step from a CSVLogger's metrics.csv."""
    return {int(r["step"]): float(r[key]) for r in csv.DictReader(metrics.open()) if r.get(key)}


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
        if (kind == 0 and length == 0) or offset + 7 + length > len(data):  # the end, or a record being written
            break
        chunk += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def finished_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished offline run, once W&B has written them all: ``run.finish()`` can return
    before its writer process has flushed the file, whose last record is the run's ``exit``."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s (the run did not finish)"
        time.sleep(0.1)


def wandb_history(path: Path) -> tuple[dict, dict]:
    """Last logged value of every history key, and the run config, from a finished offline run file."""
    history, config = {}, {}
    for record in finished_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return history, config


def shortest_wins(prompts: list, responses: list[str], references: list) -> list[float]:
    """A judge for tests (``CallableJudge("helpers.shortest_wins")``): the shorter response scores higher."""
    return [-float(len(r)) for r in responses]


class HashVerifier(Judge):
    """A verifier for tests (``class_path: helpers.HashVerifier``): a (prompt, response) is right for about half
    of all pairs, by a hash of both, and scores a number in (0.5, 1) from the same hash; a wrong one scores 0.
    Any change in a response changes its score, so a mean over the wrong answers cannot pass for the right one."""

    verifier = True

    def score(self, prompts: list, responses: list[str], references: list) -> list[float]:
        return [hash_score(prompt, response) for prompt, response in zip(prompts, responses)]


def hash_score(prompt, response: str) -> float:
    import hashlib

    digest = hashlib.sha256(json.dumps([prompt, response]).encode()).digest()
    fraction = int.from_bytes(digest[:4], "big") / 2**32
    return fraction if fraction > 0.5 else 0.0
