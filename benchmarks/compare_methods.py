"""Train every method on the same model, data and settings and compare them, one after another on
this machine (so the timings share its load).

    python benchmarks/compare_methods.py                      # the quickstart settings, ~30 minutes on 2 CPU cores
    python benchmarks/compare_methods.py --methods simpo dpo -- --trainer.max_steps 10
    python benchmarks/compare_methods.py --notes --budget 4   # the design notes' comparison, 4 minutes each

Each method runs ``simpo-lightning fit`` on its config (SimPO's ``configs/quickstart.yaml``, the other offline
methods' ``configs/methods/<method>.yaml``, the online ones' ``configs/online/<method>-demo.yaml``) in its own
process with a CSV logger, plus any arguments after ``--``; ``simpo-rounds`` runs ``simpo-lightning rounds --config
configs/commands/onpolicy-demo.yaml`` (its two rounds as configured, not cut to the budget). ``--budget MINUTES``
gives every fit the same wall-clock budget (``trainer.max_time``, no step limit, constant learning rate
without warm-up, since a schedule over an unknown number of steps would stay in warm-up). ``--notes``
selects the methods the design notes compare: SimPO offline and on-policy, DPO, IPO, KTO, ORPO, PPO, GRPO
and RLOO. Prints held-out reward accuracy and exact match before and after training, the median step time
(first step excluded), the steps done, the training signal over the first and last tenth of the steps
(offline: the batch reward accuracy; online: the judge's mean reward), the process's peak resident memory,
wall time and the models each method holds; ratios are against SimPO's run.

``--task arithmetic`` compares on the built-in verifiable task instead (``data.arithmetic``, ``NumberJudge``), over
``--seeds``: GRPO, RLOO and PPO from ``configs/online/<method>-arithmetic.yaml``, ``simpo-rounds`` from
``configs/commands/onpolicy-arithmetic.yaml``, and the offline methods (SimPO, DPO, ORPO, KTO by default) on their
configs trained on pairs the framework made for the seed: the untrained model samples 4 answers per training
problem (temperature 1, 16 tokens), the verifier scores them and a problem with a right and a wrong answer gives a
pair (right over wrong; ``pairs``). Every method is measured the same way: the verifier on greedy answers (16
tokens) to the 54 held-out problems, before and after. Prints each seed's accuracy, the mean change with its
spread over seeds, the responses each method sampled (online, rounds) or trained on (offline: pairs × 2), step
time, peak memory, wall time and the models held.

    python benchmarks/compare_methods.py --task arithmetic --seeds 0 1 2 --budget 3   # 1 h 46 min on 2 cores
"""

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forking

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simpo", "dpo", "ipo", "cpo", "orpo", "kto", "alphapo", "simper", "lndpo", "rdpo"]
ONLINE = ["grpo", "rloo", "ppo"]
NOTES = ["simpo", "simpo-rounds", "dpo", "ipo", "kto", "orpo", "ppo", "grpo", "rloo"]
ARITHMETIC = ["simpo", "dpo", "orpo", "kto", "simpo-rounds", "grpo", "rloo", "ppo"]
# What each method holds while training, with LoRA (the reference is the policy with its adapters off, so
# it costs no weights of its own; the demo's judge is a rule, no model).
MODELS = {m: "policy" for m in METHODS} | {m: "policy, reference (adapters off)" for m in ("dpo", "ipo", "kto")}
MODELS |= {m: "policy, reference (adapters off)" for m in ("lndpo", "rdpo")}
MODELS |= {
    "simpo-rounds": "policy; judge between rounds",
    "grpo": "policy, judge (β 0: no reference)",
    "rloo": "policy, reference (adapters off), judge",
    "ppo": "policy, reference (adapters off), value (2nd adapters + head, same base), judge",
}


def config_of(method: str, task: str = "demo") -> Path:
    if method == "simpo":
        return ROOT / "configs/quickstart.yaml"
    return ROOT / "configs" / (f"online/{method}-{task}.yaml" if method in ONLINE else f"methods/{method}.yaml")


def measured(command: list[str], log_path: Path, cwd: Path) -> int:
    """Runs ``command`` with its output in ``log_path``; returns its peak RSS in KiB. A fresh wrapper process
    per command, so RUSAGE_CHILDREN's peak covers this run alone (with ``BENCHMARK_FORK=1``, a fork of this
    process: ``forking``)."""
    if forking.FORK:
        done, peak = forking.forked(command, cwd=cwd, output=log_path)
        code = done.returncode
    else:
        wrapper = (
            "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
            "sys.exit(code)"
        )
        with log_path.open("w") as log:
            wrapped = [sys.executable, "-c", wrapper, *command]
            code = subprocess.call(wrapped, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    if code != 0:
        raise SystemExit(f"{log_path.stem} failed; see {log_path}")
    if forking.FORK:
        return peak
    return next(int(line.split()[1]) for line in log_path.read_text().splitlines() if line.startswith("PEAK_RSS_KB"))


def run(method: str, extra: list[str], workdir: Path, config: Path | None = None) -> dict[str, float]:
    """One ``fit`` of ``configs/<method>.yaml`` (or ``config``) in its own process, logged under
    ``workdir/<method>``: wall time, peak RSS, median step time, held-out metrics before and after, and
    ``last``: the last logged value of every metric."""
    config = config or config_of(method)
    logger = json.dumps(
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(workdir), "name": method}}
    )
    command = [
        sys.executable,
        "-m",
        "simpo_lightning.cli",
        "fit",
        "--config",
        str(config),
        "--trainer.logger",
        logger,
        "--trainer.log_every_n_steps",
        "1",
        *extra,
    ]
    start = time.perf_counter()
    peak_kb = measured(command, workdir / f"{method}.log", workdir)
    rows = list(csv.DictReader(next((workdir / method).glob("version_*/metrics.csv")).open()))
    values = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    online = bool(values("train/reward"))
    steps = values("train/step_seconds") or [
        a + b for a, b in zip(values("train/rollout_seconds"), values("train/update_seconds"))
    ]
    signal = values("train/reward" if online else "train/rewards/accuracies")
    tenth = max(1, len(signal) // 10)
    result = {
        "wall_min": (time.perf_counter() - start) / 60,
        "peak_gb": peak_kb / 2**20,
        "step_s": statistics.median(steps[1:] or steps),
        "steps": max(int(r["step"]) for r in rows if r.get("step")) + 1,
        "signal": (statistics.mean(signal[:tenth]), statistics.mean(signal[-tenth:])) if signal else (math.nan,) * 2,
    }
    for when in ("before", "after"):
        for metric in ("rewards/accuracies", "exact_match"):
            found = values(f"heldout/{when}/{metric}")
            result[f"{when}/{metric}"] = found[-1] if found else float("nan")
    result["last"] = {key: values(key)[-1] for key in rows[0] if values(key)}
    return result


def run_rounds(workdir: Path, task: str = "demo", extra: list[str] = ()) -> dict:
    """``rounds --config configs/commands/onpolicy-<task>.yaml`` in its own process: held-out metrics before the
    first round and after the last, wall time and peak RSS."""
    command = [
        sys.executable,
        "-m",
        "simpo_lightning.cli",
        "rounds",
        "--config",
        str(ROOT / f"configs/commands/onpolicy-{task}.yaml"),
    ]
    command += ["--run_dir", str(workdir / "rounds"), *extra]
    start = time.perf_counter()
    peak_kb = measured(command, workdir / "simpo-rounds.log", ROOT)
    (summary,) = (workdir / "rounds").glob("*/rounds.json")
    rounds = json.loads(summary.read_text())
    result = {"wall_min": (time.perf_counter() - start) / 60, "peak_gb": peak_kb / 2**20, "step_s": float("nan")}
    result |= {"steps": len(rounds), "signal": (float("nan"), float("nan")), "last": {}}
    result["sampled"] = sum(r["prompts"] for r in rounds) * yaml_of(command[5])["sampling"]["n"]
    for when, source in (("before", rounds[0]), ("after", rounds[-1])):
        for metric in ("rewards/accuracies", "exact_match", "accuracy"):
            result[f"{when}/{metric}"] = source["heldout"].get(when, {}).get(metric, float("nan"))
    return result


def yaml_of(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def batch_size_of(config: Path) -> int:
    """A fit config's ``data.batch_size`` (its data section bare, or a class_path with init_args)."""
    data = yaml_of(config)["data"]
    return data.get("init_args", data)["batch_size"]


def made_pairs(workdir: Path, seed: int, policy: str | None = None) -> Path:
    """Pairs the framework makes on the arithmetic task (module docstring), in ``workdir``: ``generate`` from the
    untrained model, then ``pairs`` with the verifier."""
    from simpo_lightning.generation import NumberJudge, SamplingConfig
    from simpo_lightning.generation.commands import generate, pairs

    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=16, seed=seed)
    output = str(workdir / "generations.jsonl")
    generations = generate("arithmetic:train", output, model=policy, sampling=sampling, progress=False)
    summary = pairs(str(generations), str(workdir / "pairs.jsonl"), NumberJudge())
    print(f"seed {seed}: {summary['pairs']} pairs from {summary['prompts']} problems", flush=True)
    return workdir / "pairs.jsonl"


def judged(policy: str | None, output: Path) -> float:
    """The verifier's accuracy on a policy's greedy answers (16 tokens) to the held-out problems."""
    from simpo_lightning.generation import NumberJudge, SamplingConfig
    from simpo_lightning.generation.commands import judged_answers

    greedy = SamplingConfig(max_new_tokens=16)
    return judged_answers((policy, None), output, "arithmetic:val", NumberJudge(), greedy)["accuracy"]


def arithmetic_table(methods: list[str], seeds: list[int], budget: list[str], extra: list[str], workdir: Path) -> str:
    """Every method on the arithmetic task for every seed (module docstring); the table."""
    options = dict(zip(extra, extra[1:]))  # the untrained policy: the configs' own, or one given after --
    base = judged(options.get("--model.policy.name_or_path"), workdir / "base-answers.jsonl")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        folder = workdir / f"seed-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        seeded = ["--seed_everything", str(seed), "--data.seed", str(seed)]
        data = None
        for method in methods:
            if method == "simpo-rounds":
                fit = json.dumps(["--trainer.max_steps", "30", "--trainer.val_check_interval", "30", *seeded, *extra])
                r = run_rounds(folder, "arithmetic", ["--sampling.seed", str(seed), "--fit_args", fit])
            elif method in ONLINE:
                config = config_of(method, "arithmetic")
                r = run(method, [*budget, *seeded, "--model.sampling.seed", str(seed), *extra], folder, config)
                r["after/accuracy"] = r["last"]["heldout/after/accuracy"]
                n = yaml_of(config)["model"]["init_args"]["sampling"]["n"]
                r["sampled"] = r["steps"] * batch_size_of(config) * n
            else:
                data = data or made_pairs(folder, seed, options.get("--model.policy.name_or_path"))
                schedule = ["--model.warmup_ratio", "0.0", "--model.lr_schedule", "constant"] if budget else []
                given = ["--data.train_data", str(data), "--data.val_data", "arithmetic:val"]
                r = run(method, [*budget, *schedule, *seeded, *given, *extra], folder, config_of(method))
                (checkpoint,) = (folder / method).glob("version_*/checkpoints/last.ckpt")
                r["after/accuracy"] = judged(str(checkpoint), folder / f"{method}-answers.jsonl")
                r["sampled"] = r["steps"] * batch_size_of(config_of(method)) * 2
            results[method].append(r)
            print(f"seed {seed} {method}: accuracy {base:.3f} -> {r['after/accuracy']:.3f}", flush=True)
    lines = [
        f"Held-out greedy accuracy of the untrained model: {base:.3f} (54 problems); seeds {seeds}.",
        "",
        "| method | accuracy after, per seed | change, mean (min … max) | responses | step s | peak RSS GB | "
        "wall min | models held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        after = [r["after/accuracy"] for r in runs]
        change = [100 * (a - base) for a in after]
        lines.append(
            f"| {method} | {' '.join(f'{a:.3f}' for a in after)} | {statistics.mean(change):+.1f} "
            f"({min(change):+.1f} … {max(change):+.1f}) | {statistics.mean(r['sampled'] for r in runs):.0f} | "
            f"{statistics.mean(r['step_s'] for r in runs):.2f} | {max(r['peak_gb'] for r in runs):.2f} | "
            f"{statistics.mean(r['wall_min'] for r in runs):.1f} | {MODELS[method]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + ONLINE + ["simpo-rounds"])
    parser.add_argument("--notes", action="store_true", help="the design notes' methods: " + " ".join(NOTES))
    parser.add_argument("--budget", type=float, default=None, help="wall-clock minutes per fit (trainer.max_time)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where logs and checkpoints go (default: a temp dir)"
    )
    parser.add_argument("--task", choices=["demo", "arithmetic"], default="demo", help="arithmetic: see above")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="arithmetic: the seeds of every method")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compare-methods-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {workdir}; extra arguments: {extra or 'none'}", flush=True)
    methods = NOTES if args.notes else args.methods
    budget = []
    if args.budget is not None:
        seconds = round(args.budget * 60)
        budget = ["--trainer.max_time", f"00:00:{seconds // 60:02d}:{seconds % 60:02d}", "--trainer.max_steps", "-1"]
    if args.task == "arithmetic":
        methods = ARITHMETIC if methods == METHODS else methods
        print(arithmetic_table(methods, args.seeds, budget, extra, workdir))
        return
    results = {}
    for method in methods:
        if method == "simpo-rounds":
            results[method] = run_rounds(workdir)
        else:
            schedule = ["--model.warmup_ratio", "0.0", "--model.lr_schedule", "constant"] if budget else []
            results[method] = run(method, [*budget, *(schedule if method not in ONLINE else []), *extra], workdir)
        print(f"{method}: { {k: v for k, v in results[method].items() if k != 'last'} }", flush=True)
    base = results.get("simpo")
    header = (
        f"| method | reward acc. before → after | exact match before → after | steps | step s (median) | "
        f"train signal first → last tenth | peak RSS GB | {'step ×SimPO | RSS ×SimPO | ' if base else ''}"
        "wall min | models held |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, r in results.items():
        ratios = f"{r['step_s'] / base['step_s']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f} | " if base else ""
        lines.append(
            f"| {method} | {r['before/rewards/accuracies']:.3f} → {r['after/rewards/accuracies']:.3f} | "
            f"{r['before/exact_match']:.3f} → {r['after/exact_match']:.3f} | {r['steps']} | {r['step_s']:.2f} | "
            f"{r['signal'][0]:.3f} → {r['signal'][1]:.3f} | {r['peak_gb']:.2f} | {ratios}{r['wall_min']:.1f} | "
            f"{MODELS[method]} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
