"""Quantized and sharded training on one GPU: a few SimPO steps each of LoRA in bfloat16, 8-bit and
4-bit QLoRA, and FSDP with one device, on a randomly initialised Llama-architecture model; prints
the peak GPU memory and step time of each.

    python benchmarks/gpu_check.py              # on an NVIDIA GPU, about 2 minutes
    python benchmarks/gpu_check.py --cpu        # the same runs at toy size on CPU (FSDP2 via ModelParallelStrategy)

Each run is ``simpo-lightning fit --config configs/testing/tiny.yaml`` in its own process, with the model
saved to a temporary folder first (bitsandbytes loads saved weights only).
"""

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import forking

from simpo_lightning.models.tiny import TINY_ARCHITECTURE, save_random_model

ROOT = Path(__file__).resolve().parents[1]
# ~0.5 B parameters: big enough that quantization shows in memory, small enough to finish fast.
GPU_SIZE = dict(
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=128,
)


def runs(cpu: bool) -> dict[str, list[str]]:
    if cpu:
        fsdp = {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1},
        }
        precision, compute = "32-true", "float32"
    else:
        fsdp = {
            "class_path": "lightning.pytorch.strategies.FSDPStrategy",
            "init_args": {"auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]},
        }
        precision, compute = "bf16-mixed", "bfloat16"
    quant = lambda bits: ["--model.policy.quantization", json.dumps({"bits": bits, "compute_dtype": compute})]  # noqa: E731
    return {
        "lora": ["--trainer.precision", precision],
        "qlora-8bit": ["--trainer.precision", precision, *quant(8)],
        "qlora-4bit": ["--trainer.precision", precision, *quant(4)],
        "fsdp-1-device-full": [
            "--trainer.precision",
            precision,
            "--model.lora",
            "null",
            "--trainer.strategy",
            json.dumps(fsdp),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="toy size on CPU instead of a GPU")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--runs", nargs="+", choices=list(runs(False)), default=list(runs(False)), help="which runs")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    save_random_model(workdir / "model", TINY_ARCHITECTURE if args.cpu else GPU_SIZE)  # SmolLM2's architecture, resized
    common = [
        "--config",
        str(ROOT / "configs/testing/tiny.yaml"),
        "--model.policy.name_or_path",
        str(workdir / "model"),
        "--model.policy.random_init",
        "false",
        "--model.policy.config_overrides",
        "{}",
        "--trainer.accelerator",
        "cpu" if args.cpu else "gpu",
        "--trainer.max_steps",
        str(args.steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        json.dumps([{"class_path": "simpo_lightning.callbacks.PeakMemory"}]),
        "--data.batch_size",
        str(args.batch_size),
        "--data.cache_dir",
        str(workdir / "cache"),
    ]
    if not args.cpu:  # the estimate's prediction for the same run, at its worst-case batch (batch_size × max_length)
        common += ["--estimate", "true"]
    print(
        "| run | peak memory GB | predicted GiB (worst-case batch) | s per step (incl. start-up) | status |\n"
        "|---|---|---|---|---|",
        flush=True,
    )
    failed = 0
    for name, extra in runs(args.cpu).items():
        if name not in args.runs:
            continue
        start = time.perf_counter()
        result = forking.run([sys.executable, "-m", "simpo_lightning.cli", "fit", *common, *extra], cwd=workdir)
        seconds = (time.perf_counter() - start) / args.steps
        peak = re.search(r"PEAK_MEMORY_GB (\S+) rank 0 ([\d.]+)", result.stdout)
        predicted = re.search(r"estimate: predicted peak ([\d.]+) GiB", result.stdout)
        predicted = predicted.group(1) if predicted else "-"
        if result.returncode != 0 or peak is None:
            failed += 1
            (workdir / f"{name}.log").write_text(result.stdout + result.stderr)
            said = (result.stderr.strip().splitlines() or ["?"])[-1][:120]
            print(f"| {name} | - | {predicted} | - | failed: {said} |", flush=True)
        else:
            print(
                f"| {name} | {float(peak.group(2)):.3f} ({peak.group(1)}) | {predicted} | {seconds:.2f} | ok |",
                flush=True,
            )
    print(f"logs of failed runs in {workdir}" if failed else "all runs finished")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
