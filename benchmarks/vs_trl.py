"""This framework against TRL's ``CPOTrainer(loss_type="simpo")`` on the same model, pairs, batch
size, max_length, steps and threads; each configuration in its own process, TRL and ours alternating.

    python benchmarks/vs_trl.py                            # SmolLM2-135M, HH-RLHF, 12 steps × 4 pairs, fp32 and bf16
    python benchmarks/vs_trl.py --precisions 32 --steps 6         # quicker
    python benchmarks/vs_trl.py --tunings full --lean             # also the memory-lean settings
    python benchmarks/vs_trl.py --tiny --steps 2                  # a 2-layer random model: checks the harness runs
    python benchmarks/vs_trl.py --architecture llama-3.2-1b --max_length 2048 --pair_tokens 2048 --batch_size 2 \
        --steps 3 --precisions 32                                 # Llama-3.2-1B's widths and 128k vocabulary, 2 layers

Data: the HH-RLHF file in ``../shared/data/`` (else the built-in demo), split into prompt / chosen /
rejected strings, keeping the first ``steps × batch_size`` pairs in file order that fit ``max_length``
without truncation, so every run trains once on exactly the same pairs. Ours uses its defaults for
speed (chunked log-probs, shared-prompt pairs, length-grouped batches); TRL its own defaults. Both use
fused AdamW (TRL's default optimizer) and clip gradients at norm 1 (TRL's default), except ``+lean``:
gradient checkpointing, each parameter stepped in the backward pass (no clipping possible) and freed
memory returned to the OS (``ReturnFreedMemory``); ``trl +freed-memory`` gives TRL the same allocator
setting, to show how much of the memory difference is the allocator alone.

Prints per configuration: preference pairs per second and real tokens per second (pairs' non-padding
tokens as the standard layout counts them, prompt once per response: 2·prompt + chosen + rejected,
over all steps), median step time (first step excluded), peak resident memory of the process and what a
step adds to the memory that persists between steps (with and without the gradients), model FLOPs
utilisation (``training_flops``: the decoder's 6N per token for full fine-tuning, 4N with LoRA's frozen
base, over the tokens each layout needs, the shared-prompt layout computing the prompt once; the output
head's at the response positions only; against this machine's best matrix-multiply rate, measured in the
same run before every configuration over several shapes, the model's own among them), and the ratios
ours / TRL; then the padding each layout computes.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forking

from peak import SQUARE_SIZES, matmul_peak, mfu_cell, model_flops_per_token, model_shapes

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


# --------------------------------------------------------------------------- shared preparation


def model_path(tiny: bool, workdir: Path, architecture: str | None = None, layers: int = 2) -> str:
    """The float folder of the built-in SmolLM2; or (``tiny``) a 2-layer random model of its architecture; or a
    random model of ``configs/architectures/<architecture>.json`` cut to ``layers`` layers (its widths and
    vocabulary, SmolLM2's tokenizer, whose ids are a subset of its vocabulary), saved under ``workdir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from simpo_lightning.models.loading import PolicyConfig, load_tokenizer, model_folder
    from simpo_lightning.models.tiny import TINY_ARCHITECTURE, save_random_model

    if architecture is not None:
        spec = json.loads((ROOT / "configs/architectures" / f"{architecture}.json").read_text())
        spec = {k: v for k, v in spec.items() if not k.startswith("_")} | {"num_hidden_layers": layers}
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        folder = workdir / f"{architecture}-{layers}-layers"
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        load_tokenizer(PolicyConfig()).save_pretrained(folder)
        return str(folder)
    if not tiny:
        return model_folder(PolicyConfig())
    save_random_model(workdir / "tiny-model", TINY_ARCHITECTURE)
    return str(workdir / "tiny-model")


def hh_rows() -> list[dict]:
    """The HH-RLHF file's pairs as prompt / chosen / rejected strings (the demo's where the file is absent)."""
    from simpo_lightning.data import Skip, demo, read_source
    from simpo_lightning.data.encoding import split_hh

    if not HH_FILE.is_file():
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in demo.rows("train")]
    rows = []
    for _, row in read_source(str(HH_FILE))[0]:
        try:
            prompt, chosen, rejected = split_hh(row["chosen"], row["rejected"])
        except Skip:
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def joined(rows: list[dict], tokens, tokenizer) -> list[dict]:
    """Pairs of about ``tokens`` tokens a sequence (prompt and the longer response; ``tokens`` an int, or a function
    that draws each pair's): consecutive dialogues' prompts joined before the last one's, which gives the
    responses. HH-RLHF's own pairs are at most 1,000 tokens; users train on 2,048."""
    out, prompt, target = [], "", tokens() if callable(tokens) else tokens
    for row in rows:
        prompt += row["prompt"]
        longer = max(
            len(tokenizer(row[side], add_special_tokens=False)["input_ids"]) for side in ("chosen", "rejected")
        )
        if len(tokenizer(prompt)["input_ids"]) + longer + 1 >= 0.9 * target:
            out.append({**row, "prompt": prompt})
            prompt, target = "", tokens() if callable(tokens) else tokens
    return out


def prepare(
    workdir: Path, tiny: bool, n_pairs: int, max_length: int, architecture: str | None = None, layers: int = 2,
    pair_tokens: int | None = None,
) -> tuple[str, Path]:  # fmt: skip
    """A float model folder and a JSONL of ``n_pairs`` standard-format pairs that fit ``max_length`` (of about
    ``pair_tokens`` tokens each where given)."""
    from simpo_lightning.data import Columns, PairEncoder, Skip, Truncation
    from simpo_lightning.models.loading import PolicyConfig, load_tokenizer

    model = model_path(tiny, workdir, architecture, layers)
    tokenizer = load_tokenizer(PolicyConfig(name_or_path=model))
    rows = hh_rows()
    if pair_tokens is not None:
        rows = joined(rows, pair_tokens, tokenizer)
    encode = PairEncoder(tokenizer, Columns(), Truncation(max_length, None), "standard")
    kept = []
    for row in rows:
        try:
            pair = encode(row)
        except Skip:
            continue
        if (
            pair["chosen"][-1] == encode.tokenizer.eos_token_id
            and pair["rejected"][-1] == encode.tokenizer.eos_token_id
        ):
            kept.append(row)  # both responses whole: neither framework truncates
        if len(kept) == n_pairs:
            break
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return model, data


def pair_lengths(model: str, data: Path, max_length: int) -> list[tuple[int, int, int]]:
    from simpo_lightning.data import Columns, PairEncoder, Truncation
    from simpo_lightning.models.loading import PolicyConfig, load_tokenizer

    encode = PairEncoder(
        load_tokenizer(PolicyConfig(name_or_path=model)), Columns(), Truncation(max_length, None), "standard"
    )
    pairs = [encode(json.loads(line)) for line in data.read_text().splitlines()]
    return [(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in pairs]


# --------------------------------------------------------------------------- workers (one process each)


def worker_ours(spec: dict) -> dict:
    import lightning as L
    import torch

    from simpo_lightning.callbacks.memory import ReturnFreedMemory
    from simpo_lightning.data import PreferenceDataModule, Truncation
    from simpo_lightning.methods.preference import LossConfig, SimPOModule
    from simpo_lightning.models.loading import LoraConfig, PolicyConfig

    times = []

    memory = StepMemory()

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, *args):
            memory.start(module)
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.start)
            memory.end()

    off, variant = spec.get("without", ""), spec.get("variant", "")
    lean = variant == "lean"
    policy = PolicyConfig(name_or_path=spec["model"], gradient_checkpointing=variant in ("checkpointing", "lean"))
    module = SimPOModule(
        policy=policy,
        lora=LoraConfig() if spec["lora"] else None,
        loss=LossConfig(name=spec["method"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6, fused=True),  # TRL's default optimizer
        logits_chunk=None if off == "chunked-logps" else spec["chunk"],
        optimizer_in_backward=lean,
    )
    data = PreferenceDataModule(
        train_data=spec["data"],
        val_data=spec["data"],
        format="standard",
        batch_size=spec["batch_size"],
        truncation=Truncation(spec["max_length"], None),
        cache_dir=None,
        shared_prompt=off != "shared-prompt",
        group_by_length=off != "grouping",
        tokenizer=module.tokenizer,
    )
    trainer = timing_trainer(
        spec["steps"],
        callbacks=[Timer()] + ([ReturnFreedMemory()] if lean else []),
        gradient_clip_val=None if lean else 1.0,  # TRL's default max_grad_norm; lean steps in backward
        precision="bf16-mixed" if spec["precision"] == "bf16" else "32-true",
    )
    trainer.fit(module, data)
    return {"times": times, "step_gb": memory.gb, **parameter_counts(module.model)}


def timing_trainer(steps: int, **options):
    """A CPU Trainer that trains ``steps`` steps and nothing else: no validation, logger, checkpoints, progress."""
    import lightning as L

    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, **quiet | options)


def worker_trl(spec: dict) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if spec.get("variant") == "freed-memory":
        from simpo_lightning.callbacks.memory import return_freed_memory

        return_freed_memory()
    times = []

    memory = StepMemory()

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, model=None, **kwargs):
            memory.start(model)
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)
            memory.end()

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = CPOConfig(
        output_dir=spec["workdir"],
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=1.0,
        cpo_alpha=0.0,
        learning_rate=1e-6,
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        bf16=spec["precision"] == "bf16",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = CPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_json(spec["data"]),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=[Timer()],
        peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        if spec["lora"]
        else None,
    )
    trainer.train()
    return {"times": times, "step_gb": memory.gb, **parameter_counts(trainer.model)}


def status_gb(field: str) -> float:
    """A memory field of this process's /proc status (VmRSS: resident now; VmHWM: its peak), in GB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 2**20


def rss_gb() -> float:
    return status_gb("VmRSS")


class StepMemory:
    """What a training step adds to the memory that persists between steps (weights, optimizer state): the peak
    resident memory during the step (VmHWM, reset at its start) less the resident memory at its start without the
    gradients then held (Lightning frees the last step's inside the next one, TRL before it). The first step,
    which allocates the optimizer state, is left out; the largest of the others is kept."""

    def __init__(self):
        self.gb, self.steps, self.base = 0.0, 0, 0.0

    def start(self, model) -> None:
        self.steps += 1
        if self.steps > 1:
            held = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None) / 2**30
            self.base = rss_gb() - held
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM

    def end(self) -> None:
        if self.steps > 1:
            self.gb = max(self.gb, status_gb("VmHWM") - self.base)


def training_flops(r: dict, config, lora: bool, positions: int, response_tokens: int) -> float:
    """A run's model FLOPs: the decoder's (``model_flops_per_token``) at every position the layout needs, the output
    head's (4·d·V, or 6·d·V where it trains) at the positions that predict a response token, the only ones whose
    logits the loss needs. The input embedding is a lookup."""
    head = config.vocab_size * config.hidden_size
    body = r["params"] - head * (1 if config.tie_word_embeddings else 2)
    head_flops = 4 * head if lora else 6 * head
    return model_flops_per_token(body, r["trainable"] if lora else body) * positions + head_flops * response_tokens


def parameter_counts(model) -> dict[str, int]:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TRL_EXPERIMENTAL_SILENCE": "1"}
    return child_result([sys.executable, __file__, "--worker", json.dumps(spec)], spec["name"], env)


def child_result(command: list[str], name: str, env: dict[str, str]) -> dict:
    """Runs a measuring child process (``python SCRIPT ARGS``): the JSON its ``RESULT`` line printed, or exit with
    its output (a fork of this process with ``BENCHMARK_FORK=1``: ``forking``)."""
    result = forking.run(command, env)
    line = next((text for text in result.stdout.splitlines() if text.startswith("RESULT ")), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


# --------------------------------------------------------------------------- report


def padding_report(lengths: list[tuple[int, int, int]], batch_size: int) -> str:
    """Token positions each layout computes, for batches of ``batch_size`` pairs."""
    from simpo_lightning.data import GlobalBatchSampler

    real = sum(2 * p + c + r for p, c, r in lengths)

    def standard(batches):  # chosen and rejected rows padded to one width (TRL's concatenated forward)
        return sum(2 * len(b) * max(lengths[i][0] + max(lengths[i][1:]) for i in b) for b in batches)

    def packed(batches):  # one [prompt, chosen, rejected] row per pair
        return sum(len(b) * max(sum(lengths[i]) for i in b) for b in batches)

    in_order = [list(range(s, min(s + batch_size, len(lengths)))) for s in range(0, len(lengths), batch_size)]
    sampler = GlobalBatchSampler(len(lengths), batch_size, lengths=[sum(x) for x in lengths])
    grouped = sampler._batches()
    second_prompt = sum(p for p, _, _ in lengths)
    rows = [
        ("standard, file order (TRL)", standard(in_order)),
        ("standard, grouped by length", standard(grouped)),
        ("shared prompt, file order", packed(in_order)),
        ("shared prompt, grouped by length (ours)", packed(grouped)),
    ]
    lines = [
        f"\nPadding, {len(lengths)} pairs in batches of {batch_size}: "
        f"real tokens (2·prompt + chosen + rejected) = {real}; "
        f"the prompt's second copy is {second_prompt / real:.0%} of them.",
        "| layout | positions computed | padding share | positions / TRL's |",
        "|---|---|---|---|",
    ]
    base = rows[0][1]
    for name, computed in rows:
        useful = real if name.startswith("standard") else real - second_prompt
        lines.append(f"| {name} | {computed} | {1 - useful / computed:.0%} | {computed / base:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16"], choices=["32", "bf16"])
    parser.add_argument("--tunings", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--tiny", action="store_true", help="2-layer random model (a check that the harness runs)")
    parser.add_argument(
        "--architecture",
        help="a random model of configs/architectures/NAME.json (its widths and vocabulary) with --layers layers",
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of --architecture's model")
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[1024], help="ours' logits_chunk; each further value adds a run"
    )
    parser.add_argument(
        "--pair_tokens", type=int, help="pairs of about this many tokens a sequence (HH-RLHF dialogues joined)"
    )
    parser.add_argument(
        "--ablation", action="store_true", help="also ours without each speed-up in turn (full fine-tuning, float32)"
    )
    parser.add_argument("--checkpointing", action="store_true", help="also ours with gradient checkpointing")
    parser.add_argument(
        "--lean",
        action="store_true",
        help="also ours lean (gradient checkpointing, optimizer step in "
        "backward, freed memory returned to the OS; no clipping) and TRL with freed memory returned",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        import torch

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        out = (worker_trl if spec["framework"] == "trl" else worker_ours)(spec)
        out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(out), flush=True)
        return

    workdir = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    n_pairs = args.steps * args.batch_size
    model, data = prepare(
        workdir, args.tiny, n_pairs, args.max_length, args.architecture, args.layers, args.pair_tokens
    )
    lengths = pair_lengths(model, data, args.max_length)
    if len(lengths) < args.steps * args.batch_size:
        raise SystemExit(f"only {len(lengths)} pairs fit max_length {args.max_length}")
    real_tokens = sum(2 * p + c + r for p, c, r in lengths)
    response_tokens = sum(c + r for p, c, r in lengths)  # the positions whose logits the loss needs
    shared_tokens = sum(p + c + r for p, c, r in lengths)  # what the shared-prompt layout needs
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(model)
    rows = 512 if args.architecture else 2048  # a 128k-vocabulary head at 2,048 rows takes seconds a product
    shapes, sizes = model_shapes(config.hidden_size, config.intermediate_size, config.vocab_size, rows), SQUARE_SIZES
    if args.tiny:  # the harness check need not find this machine's peak: two small squares stand in for it
        shapes, sizes = [], (256, 512)
    # This machine's matmul rate varies between moments (bf16 by up to 3x, with AMX), so it is measured
    # before every configuration and MFU is reported against the highest value seen: a conservative MFU.
    samples = {p: [] for p in args.precisions}

    def measure_peaks() -> None:
        for p in args.precisions:
            samples[p].append(matmul_peak("float32" if p == "32" else "bfloat16", shapes=shapes, sizes=sizes))

    print(
        f"{len(lengths)} pairs from {HH_FILE.name if HH_FILE.is_file() else 'demo'}, {real_tokens} real tokens; "
        f"{args.threads} threads",
        flush=True,
    )

    configs = []
    for tuning in args.tunings:
        for precision in args.precisions:
            runs = [("trl", "simpo", "", ""), ("ours", "simpo", "", "")]
            if tuning == "full":
                runs.append(("ours", "dpo", "", ""))
            for variant, wanted in (("checkpointing", args.checkpointing), ("lean", args.lean)):
                if wanted:
                    runs += [("ours", "simpo", "", variant)] + (
                        [("ours", "dpo", "", variant)] if tuning == "full" else []
                    )
            if args.lean:
                runs.append(("trl", "simpo", "", "freed-memory"))
            runs += [("ours", "simpo", "", f"chunk {chunk}") for chunk in args.chunks[1:]]
            if tuning == "full" and precision == "32" and args.ablation:
                runs += [("ours", "simpo", off, "") for off in ("chunked-logps", "shared-prompt", "grouping")]
            for framework, method, off, variant in runs:
                name = (
                    f"{tuning} {precision} {framework}{' dpo' if method == 'dpo' else ''}"
                    f"{f' +{variant}' if variant else ''}"
                    f"{f' without {off}' if off else ''}"
                )
                configs.append(
                    {
                        "name": name,
                        "framework": framework,
                        "method": method,
                        "without": off,
                        "lora": tuning == "lora",
                        "variant": variant,
                        "precision": precision,
                        "model": model,
                        "data": str(data),
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "max_length": args.max_length,
                        "chunk": int(variant.split()[1]) if variant.startswith("chunk") else args.chunks[0],
                        "threads": args.threads,
                        "workdir": str(workdir),
                    }
                )
    results = {}
    for spec in configs:
        measure_peaks()
        r = run_worker(spec)
        total = sum(r["times"])
        r.update(
            pairs_s=len(lengths) / total,
            tokens_s=real_tokens / total,
            step_s=statistics.median(r["times"][1:] or r["times"]),
            flops_s=training_flops(
                r, config, spec["lora"], real_tokens if spec["framework"] == "trl" else shared_tokens, response_tokens
            )
            / total,
            grads_gb=r["trainable"] * 4 / 2**30,  # float32 gradients (float32 weights, also under bf16-mixed)
        )
        results[spec["name"]] = r
        print(
            f"{spec['name']}: {r['pairs_s']:.3f} pairs/s, {r['step_s']:.2f} s/step, {r['peak_gb']:.2f} GB", flush=True
        )
    measure_peaks()
    peaks = {p: max(v) for p, v in samples.items()}
    for spec in configs:
        results[spec["name"]]["mfu"] = mfu_cell(results[spec["name"]]["flops_s"], peaks[spec["precision"]])

    lines = [
        "",
        "Matmul peak (GFLOP/s, best over square and model shapes and thread settings, "
        "measured before each configuration and at the end): "
        + "; ".join(
            f"{p}: max {max(v) / 1e9:.0f}, median {statistics.median(v) / 1e9:.0f}, min {min(v) / 1e9:.0f}"
            for p, v in samples.items()
        )
        + ". MFU is against the max.",
        "",
        "Peak RSS: the process's. Step: what a step adds to the memory that persists between steps (weights, "
        "optimizer state): its activations, logits, gradients and temporaries, the largest over the steps after "
        "the first (StepMemory). Less grads: the step's memory without the float32 gradients of the trainable "
        "weights, which both frameworks hold alike (full fine-tuning: every weight's).",
        "",
        "| configuration | pairs/s | real tokens/s | step s (median) | peak RSS GB | step GB | less grads GB | MFU "
        "| pairs/s ×TRL | peak ×TRL | step ×TRL | less grads ×TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        trl = results.get(" ".join(name.split()[:2]) + " trl")
        ratio = (
            f"{r['pairs_s'] / trl['pairs_s']:.2f} | {r['peak_gb'] / trl['peak_gb']:.2f} | "
            f"{r['step_gb'] / trl['step_gb']:.2f} | "
            f"{(r['step_gb'] - r['grads_gb']) / (trl['step_gb'] - trl['grads_gb']):.2f}"
            if trl
            else "- | - | - | -"
        )
        lines.append(
            f"| {name} | {r['pairs_s']:.3f} | {r['tokens_s']:.0f} | {r['step_s']:.2f} | {r['peak_gb']:.2f} | "
            f"{r['step_gb']:.2f} | {r['step_gb'] - r['grads_gb']:.2f} | {r['mfu']} | {ratio} |"
        )
    for precision in args.precisions:
        for suffix in ("", " +checkpointing", " +lean"):
            simpo, dpo = (
                results.get(f"full {precision} ours{suffix}"),
                results.get(f"full {precision} ours dpo{suffix}"),
            )
            if simpo and dpo:
                lines.append(
                    f"\nfull {precision}{suffix}: SimPO / DPO (frozen reference copy) in this framework: peak memory "
                    f"{simpo['peak_gb'] / dpo['peak_gb']:.2f}, time per pair {dpo['pairs_s'] / simpo['pairs_s']:.2f}"
                )
    print("\n".join(lines))
    print(padding_report(lengths, args.batch_size))


if __name__ == "__main__":
    main()
