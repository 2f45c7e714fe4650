"""GRPO here against TRL's ``GRPOTrainer`` on the same model, prompts, reward function, G, completion length
(fixed: end-of-sequence refused until it is reached), β, loss type, learning rate and threads; each side in
its own process, one after the other.

    python benchmarks/vs_trl_grpo.py                   # SmolLM2-135M + LoRA, demo prompts, 4 prompts × G 8, 16 tokens
    python benchmarks/vs_trl_grpo.py --steps 2 --tiny  # a 2-layer random model: checks the harness runs

Both: LoRA r 16 on every linear layer, AdamW at 1e-4, gradient clipping at norm 1, temperature 1, β 0 (no
reference model), loss ``dapo``, one optimizer step per rollout, the demo's rule judge as the reward
function (TRL gets it as a plain function of completions and the ``reference`` column). Ours uses its
defaults for speed (a prompt's completions scored in one sequence, chunked output head, the prompt's KV cache
computed once per prompt while sampling). Prints completions per second over the timed steps (the first
``--warmup`` excluded), median step time, peak resident memory of the process, and the ratios ours / TRL.
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
from vs_trl import child_result, model_path


def demo_prompts(n: int) -> list[dict]:
    from simpo_lightning.data import demo

    seen, out = set(), []
    for row in demo.rows("train"):
        key = row["prompt"][0]["content"]
        if key not in seen:
            seen.add(key)
            out.append({"prompt": row["prompt"], "reference": row["reference"]})
    return out[:n]


def run_ours(args, model: str) -> list[float]:
    import lightning as L
    import torch

    from simpo_lightning.data import PromptDataModule
    from simpo_lightning.generation.sampling import SamplingConfig
    from simpo_lightning.methods import GRPOConfig, GRPOModule, UpdateConfig
    from simpo_lightning.models.loading import LoraConfig, PolicyConfig

    module = GRPOModule(
        policy=PolicyConfig(name_or_path=model),
        lora=LoraConfig(r=16, alpha=32),
        method=GRPOConfig(loss_type="dapo", beta=0.0),
        update=UpdateConfig(micro_batch_size=args.prompts * args.g),
        warmup_ratio=0.0,
        lr_schedule="constant",
        sampling=SamplingConfig(
            n=args.g, temperature=1.0, max_new_tokens=args.length, min_new_tokens=args.length, batch_size=64
        ),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
    )
    data = PromptDataModule(tokenizer=module.tokenizer, batch_size=args.prompts, cache_dir=None)
    times = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Clock()],
    )  # fmt: skip
    trainer.fit(module, data)
    return times


def run_trl(args, model: str) -> list[float]:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from simpo_lightning.generation.judges import RuleJudge

    judge = RuleJudge()

    def rule(prompts, completions, reference, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return judge(prompts, texts, reference)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.g, num_generations=args.g,
        max_completion_length=args.length, generation_kwargs={"min_new_tokens": args.length}, temperature=1.0,
        beta=0.0, loss_type="dapo", learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=args.warmup + args.steps, max_grad_norm=1.0, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
        reward_funcs=rule,
        args=config,
        train_dataset=datasets.Dataset.from_list(demo_prompts(10_000)),
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock()],
    )
    trainer.train()
    return times


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    times = (run_ours if args.side == "ours" else run_trl)(args, args.model)
    timed = times[args.warmup :]
    result = {
        "samples_per_sec": args.prompts * args.g * len(timed) / sum(timed),
        "median_step_s": statistics.median(timed),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed rollouts per side")
    parser.add_argument("--warmup", type=int, default=1, help="rollouts not timed")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rollout")
    parser.add_argument("--g", type=int, default=8, help="completions per prompt")
    parser.add_argument("--length", type=int, default=16, help="completion tokens (fixed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random model instead of SmolLM2")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    with tempfile.TemporaryDirectory() as workdir:
        model = model_path(args.tiny, Path(workdir))
        results = {}
        for side in ("trl", "ours"):
            command = [sys.executable, __file__, "--side", side, "--model", model, *sys.argv[1:]]
            results[side] = child_result(command, side, {**os.environ, "WANDB_MODE": "disabled"})
    print(f"GRPO, {args.prompts} prompts × G {args.g}, {args.length} tokens, {args.steps} timed rollouts, "
          f"{args.threads} threads, {'tiny' if args.tiny else 'SmolLM2-135M'} + LoRA r16")  # fmt: skip
    print(f"{'':<8}{'samples/s':>12}{'median step s':>16}{'peak RSS GB':>14}")
    for side, r in results.items():
        print(f"{side:<8}{r['samples_per_sec']:>12.2f}{r['median_step_s']:>16.2f}{r['peak_rss_gb']:>14.2f}")
    ours, trl = results["ours"], results["trl"]
    print(
        f"{'ours/TRL':<8}{ours['samples_per_sec'] / trl['samples_per_sec']:>11.2f}×"
        f"{ours['median_step_s'] / trl['median_step_s']:>15.2f}×{ours['peak_rss_gb'] / trl['peak_rss_gb']:>13.2f}×"
    )


if __name__ == "__main__":
    main()
