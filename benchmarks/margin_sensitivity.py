"""SimPO's margin γ/β: fixed values, ``auto`` and ``adaptive`` on the demo and on a short HH-RLHF run.

    python benchmarks/margin_sensitivity.py                          # both settings, ~35 minutes on 2 CPU cores
    python benchmarks/margin_sensitivity.py --settings demo --margins 0 0.5 auto -- --trainer.max_steps 10

Each run is ``simpo-lightning fit`` in its own process (``benchmarks/compare_methods.py``'s runner) with
``--model.loss.gamma_beta_ratio`` set, plus the ``GenerationMonitor`` for the greedy answers' length and
repetition, one after another on this machine:

- demo: ``configs/quickstart.yaml`` (SmolLM2-135M-Instruct, LoRA, 60 steps of 4 pairs).
- hh: ``configs/datasets/hh-rlhf.yaml`` on the first ``--hh_rows`` rows of ``--hh`` (5% held out), ``--hh_steps``
  steps of 2 pairs, with the ``HeldOutReport`` for reward accuracy and log-probs before and after.

Prints per margin: held-out reward accuracy before → after, exact match (demo), the change of the mean
log-prob per token of the chosen and the rejected held-out responses, the γ/β trained with (last step),
and the monitor's mean answer length (tokens), share of answers hitting the limit and share with a
repeated 4-gram after training.
"""

import argparse
import gzip
import json
import tempfile
from pathlib import Path

from compare_methods import ROOT, run

COLUMNS = [
    "Δ log-prob chosen",
    "Δ log-prob rejected",
    "γ/β trained",
    "answer tokens",
    "hit limit",
    "repeated 4-gram",
    "wall min",
]
MARGINS = ["0", "0.25", "0.5", "1.0", "2.0", "auto", "adaptive"]


def monitor(max_prompts: int, max_new_tokens: int) -> str:
    return json.dumps(
        {
            "class_path": "simpo_lightning.callbacks.GenerationMonitor",
            "init_args": {"max_prompts": max_prompts, "max_new_tokens": max_new_tokens, "every_n_validations": 1},
        }
    )


def setting_args(setting: str, args, workdir: Path) -> tuple[Path, list[str]]:
    if setting == "demo":
        return ROOT / args.demo_config, ["--trainer.callbacks+", monitor(16, 16)]
    rows = workdir / "hh.jsonl"
    if not rows.is_file():
        with gzip.open(args.hh, "rt") as source:
            rows.write_text("".join(line for _, line in zip(range(args.hh_rows), source)))
    held_out = json.dumps({"class_path": "simpo_lightning.callbacks.HeldOutReport", "init_args": {"max_new_tokens": 1}})
    return ROOT / "configs/datasets/hh-rlhf.yaml", [
        "--data.train_data",
        str(rows),
        "--data.cache_dir",
        str(workdir / "cache"),
        "--trainer.max_steps",
        str(args.hh_steps),
        "--trainer.val_check_interval",
        str(args.hh_steps),
        "--trainer.callbacks+",
        held_out,
        "--trainer.callbacks+",
        monitor(8, 48),
    ]


def row(margin: str, r: dict, demo: bool) -> str:
    last = r["last"]

    def change(side: str) -> str:
        before, after = last.get(f"heldout/before/logps/{side}"), last.get(f"heldout/after/logps/{side}")
        return "-" if before is None or after is None else f"{after - before:+.3f}"

    exact = f"{r['before/exact_match']:.3f} → {r['after/exact_match']:.3f} | " if demo else ""
    trained = last.get("train/gamma_beta_ratio", float(margin) if margin[0].isdigit() else float("nan"))
    answers = [last.get(f"monitor/{k}", float("nan")) for k in ("mean_tokens", "hit_max_new_tokens", "repeated_4gram")]
    return (
        f"| {margin} | {r['before/rewards/accuracies']:.3f} → {r['after/rewards/accuracies']:.3f} | {exact}"
        f"{change('chosen')} | {change('rejected')} | {trained:.3f} | {answers[0]:.1f} | {answers[1]:.2f} | "
        f"{answers[2]:.2f} | {r['wall_min']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["demo", "hh"], choices=["demo", "hh"])
    parser.add_argument("--margins", nargs="+", default=MARGINS)
    parser.add_argument("--demo_config", default="configs/quickstart.yaml", help="the demo setting's config")
    parser.add_argument("--hh", default=str(ROOT.parent / "shared/data/hh-rlhf-harmless-test.jsonl.gz"))
    parser.add_argument("--hh_rows", type=int, default=800)
    parser.add_argument("--hh_steps", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None)
    args, passed = parser.parse_known_args()
    passed = [a for a in passed if a != "--"]  # given to every fit
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="margin-sensitivity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {workdir}", flush=True)
    for setting in args.settings:
        config, extra = setting_args(setting, args, workdir)
        extra += passed
        demo = setting == "demo"
        lines = [
            f"\n{setting}: {config.name}\n",
            "| γ/β | reward acc. before → after | "
            + ("exact match before → after | " if demo else "")
            + " | ".join(COLUMNS)
            + " |",
        ]
        lines.append("|" + "---|" * (lines[-1].count("|") - 1))
        for margin in args.margins:
            result = run(f"{setting}-{margin}", [*extra, "--model.loss.gamma_beta_ratio", margin], workdir, config)
            lines.append(row(margin, result, demo))
            print(lines[-1], flush=True)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
