"""A reward model and an evaluation on real data, HH-RLHF harmless, through the documented commands.

    python benchmarks/hh_evaluation.py --data ../shared/data/hh-rlhf-harmless-test.jsonl.gz --workdir /tmp/hh

1. Splits the file by row order: the first ``--train`` rows train both the reward model and the SimPO
   policy, the next ``--val`` rows are held-out pairs for the reward model's accuracy, and the prompts of
   the rows after those (seen by neither) are the evaluation prompts.
2. ``fit --config configs/methods/reward.yaml`` (LoRA on SmolLM2-135M-Instruct's backbone): held-out pair accuracy
   before and after; ``export`` of the reward model.
3. ``fit --config configs/datasets/hh-rlhf.yaml``: the SimPO policy (LoRA).
4. ``evaluate``: the SimPO policy against the base SmolLM2 on the held-out prompts, judged by that reward
   model (``format: text``, as it was trained on HH's text dialogues); greedy answers.

Prints the reward model's accuracy, the evaluation table and the time of each stage. Every size is an
option; the defaults run in about half an hour on a 2-core CPU.
"""

import argparse
import csv
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(["simpo-lightning", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode:
        sys.exit(f"simpo-lightning {args[0]} failed: see {log}")
    return time.perf_counter() - start


def heldout(metrics: Path) -> dict[str, float]:
    values = {}
    for row in csv.DictReader(metrics.open()):
        values.update({k: float(v) for k, v in row.items() if k.startswith(("heldout/", "val/rewards/")) and v})
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/hh-rlhf-harmless-test.jsonl.gz"))
    parser.add_argument("--workdir", default="/tmp/hh-evaluation")
    parser.add_argument("--train", type=int, default=2000, help="rows that train both models")
    parser.add_argument("--val", type=int, default=100, help="held-out pairs for the reward model's accuracy")
    parser.add_argument("--reward_steps", type=int, default=150)
    parser.add_argument("--reward_batch", type=int, default=4)
    parser.add_argument("--policy_steps", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=64, help="evaluation prompts")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in gzip.open(args.data, "rt")]
    parts = {
        "train": rows[: args.train],
        "val": rows[args.train : args.train + args.val],
        "eval": rows[args.train + args.val :],
    }
    for name, part in parts.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print({name: len(part) for name, part in parts.items()}, flush=True)
    times = {}

    def logger(name: str) -> str:
        return json.dumps(
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(work), "name": name}}
        )

    times["reward model fit"] = command(
        [
            "fit",
            "--config",
            "configs/methods/reward.yaml",
            "--data.train_data",
            str(work / "train.jsonl"),
            "--data.val_data",
            str(work / "val.jsonl"),
            "--data.batch_size",
            str(args.reward_batch),
            "--trainer.max_steps",
            str(args.reward_steps),
            "--trainer.val_check_interval",
            str(args.reward_steps),
            "--trainer.logger",
            logger("reward"),
        ],
        work / "reward.log",
    )
    reward = heldout(work / "reward/version_0/metrics.csv")
    (ckpt,) = (work / "reward/version_0/checkpoints").glob("last.ckpt")
    times["reward model export"] = command(
        ["export", "--ckpt_path", str(ckpt), "--output_dir", str(work / "reward-model")], work / "export.log"
    )
    times["SimPO policy fit"] = command(
        [
            "fit",
            "--config",
            "configs/datasets/hh-rlhf.yaml",
            "--data.train_data",
            str(work / "train.jsonl"),
            "--data.val_data",
            str(work / "val.jsonl"),
            "--trainer.max_steps",
            str(args.policy_steps),
            "--trainer.val_check_interval",
            str(args.policy_steps),
            "--trainer.logger",
            logger("policy"),
        ],
        work / "policy.log",
    )
    policy = heldout(work / "policy/version_0/metrics.csv")
    judge = {
        "class_path": "simpo_lightning.generation.RewardModelJudge",
        "init_args": {"name_or_path": str(work / "reward-model"), "format": "text", "max_length": 1024},
    }
    times["evaluate"] = command(
        [
            "evaluate",
            "--candidates",
            json.dumps([str(work / "policy/version_0/checkpoints/last.ckpt")]),
            "--prompts",
            str(work / "eval.jsonl"),
            "--judge",
            json.dumps(judge),
            "--sampling.max_new_tokens",
            str(args.max_new_tokens),
            "--max_prompts",
            str(args.prompts),
            "--output_dir",
            str(work / "evaluate"),
        ],
        work / "evaluate.log",
    )
    print(f"reward model, held-out pairs: {json.dumps(reward)}")
    print(f"SimPO policy, held-out pairs: {json.dumps(policy)}")
    print((work / "evaluate/results.md").read_text())
    print("times (s): " + json.dumps({k: round(v) for k, v in times.items()}))


if __name__ == "__main__":
    main()
