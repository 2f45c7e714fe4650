"""SimPO LoRA steps on randomly initialised 7B/8B models, on one NVIDIA GPU, in under 8 minutes.

    python benchmarks/gpu_7b.py                  # Mistral-7B and Llama-3-8B architectures, bfloat16
    python benchmarks/gpu_7b.py --cpu --tiny --lengths 64 128  # a 2-layer shrink of each, short, on CPU (the test)

The architectures are the public configs in ``configs/architectures/`` (no weights are
downloaded: the weights are random, which changes nothing about time or memory). Each run builds
``SimPOModule`` with LoRA r=16 on all linear layers and times ``steps`` optimizer steps of its real
training step (``module.step``, backward, AdamW) on batches of ``pairs`` random pairs whose chosen and
rejected sequences are each ``length`` tokens (half prompt), under bfloat16 autocast (float32 on a CPU
without bfloat16 units, where bfloat16 products are emulated about 80 times slower); for 1024 and
2048 tokens, with and without gradient checkpointing, and DPO (reference = adapters disabled) at
1024. Prints peak GPU memory (``max_memory_allocated``), real tokens per second (2 × length per
pair) and model FLOPs utilisation against the matrix-multiply peak measured in the same run
(``peak.py``: 4N FLOPs per token for LoRA's frozen base plus 2 per trainable weight).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simpo_lightning.data.batch import PairBatch, Sequences
from simpo_lightning.methods.preference import LossConfig, SimPOModule
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, load_tokenizer
from simpo_lightning.models.parallel import fast_bf16
from simpo_lightning.models.tiny import TINY_ARCHITECTURE

from peak import SQUARE_SIZES, matmul_peak, mfu_cell, model_flops_per_token, model_shapes

ARCHITECTURES = Path(__file__).resolve().parents[1] / "configs" / "architectures"


def model_folder(name: str, tiny: bool, workdir: Path) -> str:
    """A folder with the architecture's config.json and a tokenizer (only its pad id is used)."""
    folder = workdir / name
    folder.mkdir()
    config = {
        k: v for k, v in json.loads((ARCHITECTURES / f"{name}.json").read_text()).items() if not k.startswith("_")
    }
    (folder / "config.json").write_text(json.dumps({**config, **(TINY_ARCHITECTURE if tiny else {})}))
    load_tokenizer(PolicyConfig()).save_pretrained(folder)
    return str(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(pairs: int, length: int, vocab: int, device: torch.device) -> PairBatch:
    prompt = length // 2
    sides = []
    for _ in ("chosen", "rejected"):
        ids = torch.randint(0, vocab, (pairs, length), device=device)
        labels = ids.clone()
        labels[:, :prompt] = -100
        sides.append(Sequences(ids, torch.ones_like(ids), labels))
    return PairBatch(*sides)


def run(
    folder: str,
    method: str,
    length: int,
    checkpointing: bool,
    args,
    device: torch.device,
    peak: float,
    dtype: torch.dtype,
) -> dict:
    policy = PolicyConfig(
        name_or_path=folder,
        random_init=True,
        dtype=str(dtype).removeprefix("torch."),
        gradient_checkpointing=checkpointing,
    )
    module = SimPOModule(policy=policy, lora=LoraConfig(r=16, alpha=32), loss=LossConfig(name=method))
    with torch.device(device):
        module.configure_model()
    module.to(device)
    params = sum(p.numel() for p in module.model.parameters())
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    vocab = module.model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        batch = random_batch(args.pairs, length, vocab, device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = module.step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    tokens = 2 * args.pairs * length / seconds
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del module, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "params_b": params / 1e9,
        "step_s": seconds,
        "tokens_s": tokens,
        "peak_gb": memory,
        "mfu": mfu_cell(model_flops_per_token(params, trainable) * tokens, peak),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="2-layer shrink of each architecture")
    parser.add_argument("--pairs", type=int, default=1, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--architectures", nargs="+", default=["mistral-7b", "llama-3-8b"])
    parser.add_argument("--lengths", nargs=2, type=int, default=[1024, 2048], help="the two sequence lengths (tokens)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU; use --cpu --tiny to check the script")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.bfloat16 if fast_bf16(device.type) else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}: {dtype} (bfloat16 {'runs on' if dtype == torch.bfloat16 else 'has no'} hardware units here); "
        f"{args.pairs} pair(s) per step, LoRA r=16",
        flush=True,
    )
    print(
        "| architecture | method | tokens/seq | grad. checkpointing | peak GPU GB | step s | tokens/s | MFU |\n"
        "|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="gpu-7b-"))
    start = time.perf_counter()
    try:
        for arch in args.architectures:
            folder = model_folder(arch, args.tiny, workdir)
            config = json.loads((Path(folder) / "config.json").read_text())
            sizes = 8192 if device.type == "cuda" else 1024
            shapes = model_shapes(config["hidden_size"], config["intermediate_size"], config["vocab_size"], sizes)
            # --tiny checks that the script runs: two small squares stand in for this machine's peak
            peak = matmul_peak(
                str(dtype).removeprefix("torch."),
                device.type,
                [] if args.tiny else shapes,
                sizes=(256, 512) if args.tiny else SQUARE_SIZES,
            )
            short, long = args.lengths
            for method, length, checkpointing in [
                ("simpo", short, False),
                ("simpo", short, True),
                ("simpo", long, False),
                ("simpo", long, True),
                ("dpo", short, True),
            ]:
                try:
                    r = run(folder, method, length, checkpointing, args, device, peak, dtype)
                    cells = f"{r['peak_gb']:.1f} | {r['step_s']:.2f} | {r['tokens_s']:.0f} | {r['mfu']}"
                except torch.OutOfMemoryError:
                    cells = "out of memory | - | - | -"
                    torch.cuda.empty_cache()
                print(f"| {arch} | {method} | {length} | {'on' if checkpointing else 'off'} | {cells} |", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
