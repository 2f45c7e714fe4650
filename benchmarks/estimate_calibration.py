"""The estimate against reality on this CPU: for each setting, ``simpo-lightning estimate``'s peak of live tensors
(fake tensors) against the peak of live tensors of the same step run by Lightning on real tensors (the same
trackers, ``estimate.calibrate.TrackedStep``), and the estimate's FLOPs against the analytic count
(``estimate.calibrate.analytic_flops``).

    python benchmarks/estimate_calibration.py            # every case (a few minutes)
    python benchmarks/estimate_calibration.py --cases lora-simpo-ckpt

Each real run is a process of its own (the 2-process one through Lightning's launcher). Targets: peak within ±10%,
FLOPs within ±5%.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

SMOL = None  # SmolLM2-135M's architecture (hidden 576, vocabulary 49,152), the built-in model's
CASES = {  # name: (architecture, layers, lora, loss, checkpointing, precision, max_length, batch, processes)
    "lora-simpo-ckpt": (SMOL, 4, True, "simpo", True, "32-true", 512, 2, 1),
    "full-dpo": (SMOL, 4, False, "dpo", False, "32-true", 512, 2, 1),
    "full-simpo-bf16-ckpt": (SMOL, 4, False, "simpo", True, "bf16-mixed", 512, 2, 1),
    "lora-simpo-1b-widths": ("llama-3.2-1b", 2, True, "simpo", False, "32-true", 1024, 1, 1),
    "full-simpo-2-processes": (SMOL, 4, False, "simpo", False, "32-true", 512, 2, 2),
}


def sections(case: str) -> dict:
    _, layers, lora, loss, ckpt, precision, length, batch, processes = CASES[case]
    strategy = "auto"
    if processes > 1:
        strategy = {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"data_parallel_size": processes, "tensor_parallel_size": 1},
        }
    return {
        "trainer": {"precision": precision, "gradient_clip_val": 1.0, "devices": processes, "strategy": strategy},
        "model": {
            "policy": {"config_overrides": {"num_hidden_layers": layers}, "gradient_checkpointing": ckpt},
            "lora": {"r": 16} if lora else None,
            "loss": {"name": loss},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}},
        },
        "data": {"truncation": {"max_length": length}, "batch_size": batch},
    }


def real(case: str, out: str) -> None:
    """One case's real step (every rank of it runs this; rank 0 writes the peak to ``out``)."""
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from simpo_lightning.estimate.calibrate import real_step
    from simpo_lightning.estimate.command import setup

    torch.manual_seed(0)
    processes = CASES[case][-1]
    strategy = ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1) if processes > 1 else "auto"
    with setup(sections(case), architecture=CASES[case][0]) as s:
        real_step(s, strategy=strategy, devices=processes, path=out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--real", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.real:
        return real(args.real, args.out)
    from simpo_lightning.estimate.calibrate import analytic_flops
    from simpo_lightning.estimate.command import GIB, predict, setup

    rows = []
    for case in args.cases:
        estimate = predict(sections(case), architecture=CASES[case][0])
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--real", case, "--out", out.name]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode:
                sys.exit(f"{case}: the real run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            measured = json.load(open(out.name))
        with setup(sections(case), architecture=CASES[case][0]) as s:  # the analytic count on the real model
            s.module.configure_model()
            packed = s.batch.packed
            attended = sum((end - start) ** 2 for row in packed.spans for start, end in row)
            layers = s.module.model.config.num_hidden_layers
            checkpointing = CASES[case][4]
            processes = CASES[case][-1]
            responses = len(packed.targets) if processes == 1 else None  # sharded: the model's own logits
            reference = s.module.reference.frozen is not None
            analytic = analytic_flops(
                s.module.model, packed.input_ids.numel(), responses, attended * layers, checkpointing, reference
            )
        flops = estimate.measured.flops
        rows.append(
            f"| {case} | {estimate.measured.total / GIB:.3f} | {measured['total'] / GIB:.3f} | "
            f"{estimate.measured.total / measured['total'] - 1:+.1%} | {flops / 1e12:.3f} | "
            f"{analytic / 1e12:.3f} | {flops / analytic - 1:+.1%} |"
        )
        print(rows[-1], flush=True)
    print("\n| case | estimated peak GiB | measured peak GiB | error | estimated TFLOP | analytic TFLOP | error |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
