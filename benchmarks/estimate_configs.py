"""The design notes' resource claims, on paper: ``simpo-lightning estimate`` (the real step on fake tensors) for
Mistral-7B, Llama-3-8B and Llama-3-70B at the SimPO paper's settings (max_length 2048, bf16-mixed, gradient
checkpointing, global batch 128 by accumulation), SimPO against DPO (with LoRA its reference is the adapters
switched off; with full fine-tuning a frozen copy, or precomputed log-probs), LoRA and QLoRA on one GPU and full
fine-tuning sharded over 8 (FSDP2). Per GPU: the predicted peak (live tensors + the stated allowance). Time:
A100-hours for one epoch of 60,000 pairs at 40% MFU (312 TFLOP/s bf16), for pairs at max_length (an upper
bound) and for pairs of 256 prompt + 2 × 512 response tokens (an assumption about typical data).

    python benchmarks/estimate_configs.py              # about 5 minutes on 2 cores
    python benchmarks/estimate_configs.py --models mistral-7b
"""

import argparse
import time

A100, MFU, PAIRS = 312e12, 0.4, 60000
SETTINGS = {  # name: (lora, quantized, devices, batch per device, reference precompute)
    "LoRA, 1 GPU": (True, False, 1, 1, False),
    "QLoRA 4-bit, 1 GPU": (True, True, 1, 1, False),
    "full, FSDP 8 GPUs": (False, False, 8, 2, False),
    "full, FSDP 8 GPUs, reference precomputed": (False, False, 8, 2, True),
}
CLAIMS = {  # (model, method): (A100-hours, peak GB) in the design notes
    ("mistral-7b", "dpo"): (12, 28),
    ("mistral-7b", "simpo"): (4.5, 19),
    ("llama-3-8b", "simpo"): (5.0, 21),
    ("llama-3-70b", "dpo"): (None, 240),
    ("llama-3-70b", "simpo"): (None, 170),
}


def sections(lora: bool, quantized: bool, devices: int, batch: int, precompute: bool, loss: str) -> dict:
    policy = {"name_or_path": None, "dtype": "bfloat16" if lora else "float32", "gradient_checkpointing": True}
    if quantized:
        policy["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    return {
        "trainer": {
            "precision": "bf16-mixed",
            "devices": devices,
            "gradient_clip_val": 1.0,
            "accumulate_grad_batches": max(1, 128 // (devices * batch)),
        },
        "model": {
            "policy": policy,
            "lora": {"r": 16, "alpha": 32} if lora else None,
            "loss": {"name": loss},
            "reference": {"precompute": precompute},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-6, "fused": True}},
        },
        "data": {"truncation": {"max_length": 2048}, "batch_size": batch},
    }


def main() -> None:
    from simpo_lightning.estimate.command import GIB, predict

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mistral-7b", "llama-3-8b", "llama-3-70b"])
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for setting, (lora, quantized, devices, batch, precompute) in SETTINGS.items():
            for loss in ("simpo", "dpo"):
                if precompute and loss == "simpo":
                    continue
                started = time.perf_counter()
                config = sections(lora, quantized, devices, batch, precompute, loss)
                worst = predict(config, architecture=model)
                typical = predict(config, architecture=model, prompt_tokens=256, length=768, flops=True)
                hours = [e.measured.flops / e.pairs_per_step * PAIRS / (A100 * MFU) / 3600 for e in (worst, typical)]
                claim = CLAIMS.get((model, loss), (None, None))
                rows.append(
                    f"| {model} | {setting} | {loss} | {worst.predicted / GIB:.1f} | "
                    f"{worst.predicted * devices / GIB:.0f} | {hours[0]:.1f} | {hours[1]:.1f} | "
                    f"{claim[1] or ''} | {claim[0] or ''} |"
                )
                print(rows[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(
        "\n| model | setting | method | peak GiB per GPU | all GPUs GiB | A100-h, pairs at 2048 | A100-h, 256+2×512 "
        "| notes' peak GB | notes' A100-h |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
