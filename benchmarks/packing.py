"""Packed pairs (``data.max_tokens_per_row``) against today's default at the same token budget: the padding each
layout computes and the real tokens it trains on per second, in one run.

    python benchmarks/packing.py                          # HH-RLHF and pairs of up to 2,048 tokens, SmolLM2-135M
    python benchmarks/packing.py --datasets hh --steps 4  # quicker
    python benchmarks/packing.py --tiny --steps 1         # a 2-layer random model: checks the harness runs

Every layout is the shared-prompt row ``[prompt, chosen, rejected]`` (the prompt once), SimPO with LoRA in float32,
each in its own process:

- default: ``batch_size`` pairs a batch, one a row, drawn at random (``data.group_by_length`` false: the
  DataModule's default);
- grouped: the same, in batches of similar lengths (``data.group_by_length`` true);
- packed: ``batch_size`` rows a batch, each of several pairs up to ``budget`` tokens (``data.max_tokens_per_row``).

The budget is the data's longest pair, so each layout computes at most ``batch_size × budget`` positions a step: the
same bound on a step's activation memory. Data: ``hh``, the HH-RLHF file in ``../shared/data/`` (the demo's pairs
where it is absent) at the default truncation (512 tokens a sequence, 256 of prompt); ``long``, HH-RLHF
dialogues joined into pairs of 256 to 2,048 tokens a sequence (``vs_trl.joined``, lengths drawn uniformly).
Real tokens: each pair's prompt, chosen and rejected tokens; padding share: 1 − real tokens / positions
computed; real tokens per second over the steps after the first (which allocates the optimizer state).
The mask is dense (``[rows, 1, T, T]``): on a CPU the attention of a packed row costs its full width squared.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import child_result, hh_rows, joined, model_path, timing_trainer

LAYOUTS = ("default", "grouped", "packed")
TRUNCATION = {"hh": (512, 256), "long": (2048, 1792)}


def prepare(workdir: Path, tiny: bool, dataset: str, pairs: int | None = None) -> tuple[str, Path, int]:
    """The model folder, a JSONL of the data set's pairs (its first ``pairs``; None: all), and the longest pair's
    tokens (the row budget)."""
    from simpo_lightning.data import Columns, PairEncoder, Skip, Truncation
    from simpo_lightning.models.loading import PolicyConfig, load_tokenizer

    model = model_path(tiny, workdir)
    tokenizer = load_tokenizer(PolicyConfig(name_or_path=model))
    rows = hh_rows()
    if dataset == "long":
        rng = random.Random(0)
        rows = joined(rows, lambda: rng.randint(256, 2048), tokenizer)
    rows = rows[:pairs]
    encode = PairEncoder(tokenizer, Columns(), Truncation(*TRUNCATION[dataset]), "standard")
    longest = 0
    for row in rows:
        try:
            pair = encode(row)
        except Skip:
            continue
        longest = max(longest, len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"]))
    path = workdir / f"{dataset}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model, path, longest


def worker(spec: dict) -> dict:
    """One layout's run: per step after the first, its seconds, positions computed and real tokens."""
    import lightning as L
    import torch

    from simpo_lightning.data import PreferenceDataModule, Truncation
    from simpo_lightning.methods.preference import SimPOModule
    from simpo_lightning.models.loading import LoraConfig, PolicyConfig

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    steps = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seconds = time.perf_counter() - self.start
            if batch_idx:  # the first step allocates the optimizer state
                real = int((batch.packed.segments >= 0).sum())
                steps.append({"seconds": seconds, "positions": batch.positions(), "real": real, "pairs": len(batch)})

    module = SimPOModule(
        policy=PolicyConfig(name_or_path=spec["model"]),
        lora=LoraConfig(),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6),
    )
    layout = spec["layout"]
    data = PreferenceDataModule(
        train_data=spec["data"],
        val_data=spec["data"],
        format="standard",
        batch_size=spec["batch_size"],
        truncation=Truncation(*TRUNCATION[spec["dataset"]]),
        cache_dir=None,
        group_by_length=layout == "grouped",
        max_tokens_per_row=spec["budget"] if layout == "packed" else None,
        tokenizer=module.tokenizer,
    )
    trainer = timing_trainer(spec["steps"] + 1, callbacks=[Timer()])
    trainer.fit(module, data)
    return {"steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["hh", "long"], choices=["hh", "long"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per layout (after one untimed)")
    parser.add_argument("--batch_size", type=int, help="pairs (default, grouped) or rows (packed) a batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="2-layer random model (a check that the harness runs)")
    parser.add_argument("--pairs", type=int, help="the data set's first this many pairs (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    workdir = Path(tempfile.mkdtemp(prefix="packing-"))
    lines = [
        f"# Packed pairs against the default layout ({'tiny random model' if args.tiny else 'SmolLM2-135M'}, "
        f"LoRA, float32, {args.threads} threads)",
        "",
        "| data | layout | batch | pairs/step | positions/step | padding share | real tokens/s | ×default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for dataset in args.datasets:
        model, data, budget = prepare(workdir, args.tiny, dataset, args.pairs)
        batch_size = args.batch_size or {"hh": 4, "long": 2}[dataset]
        results = {}
        for layout in args.layouts:
            spec = {
                "model": model,
                "data": str(data),
                "dataset": dataset,
                "layout": layout,
                "budget": budget,
                "batch_size": batch_size,
                "steps": args.steps,
                "threads": args.threads,
            }
            command = [sys.executable, __file__, "--worker", json.dumps(spec)]
            steps = child_result(command, f"{dataset} {layout}", env)["steps"]
            total = {key: sum(s[key] for s in steps) for key in ("seconds", "positions", "real", "pairs")}
            results[layout] = total
            base = results.get("default")
            ratio = f"{(total['real'] / total['seconds']) / (base['real'] / base['seconds']):.2f}" if base else "-"
            batch = f"{batch_size} rows of ≤{budget}" if layout == "packed" else f"{batch_size} pairs"
            lines.append(
                f"| {dataset} | {layout} | {batch} | {total['pairs'] / len(steps):.1f} | "
                f"{total['positions'] / len(steps):.0f} | {1 - total['real'] / total['positions']:.1%} | "
                f"{total['real'] / total['seconds']:.0f} | {ratio} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"Budget: the data's longest pair (prompt + chosen + rejected tokens); {args.steps} timed steps a layout "
        "after one untimed. Targets: packed padding < 3% and real tokens/s ≥ 1.25× default.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
