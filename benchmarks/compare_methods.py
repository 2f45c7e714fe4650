"""Train every method on the same model, data and settings and compare them, one after another on
this machine (so the timings share its load).

    python benchmarks/compare_methods.py                      # the quickstart settings, ~30 minutes on 2 CPU cores
    python benchmarks/compare_methods.py --methods simpo dpo -- --trainer.max_steps 10

Each method runs ``simpo-lightning fit --config configs/<method>.yaml`` (the SimPO one is
``configs/quickstart.yaml``) in its own process with a CSV logger, plus any arguments after ``--``.
Prints held-out reward accuracy and exact match before and after training, the median step time
(first step excluded) and the process's peak resident memory; ratios are against SimPO's run.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simpo", "dpo", "ipo", "cpo", "orpo", "kto", "alphapo", "simper", "lndpo", "rdpo"]


def run(method: str, extra: list[str], workdir: Path, config: Path | None = None) -> dict[str, float]:
    """One ``fit`` of ``configs/<method>.yaml`` (or ``config``) in its own process, logged under
    ``workdir/<method>``: wall time, peak RSS, median step time, held-out metrics before and after, and
    ``last``: the last logged value of every metric."""
    config = config or ROOT / "configs" / ("quickstart.yaml" if method == "simpo" else f"{method}.yaml")
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
    # A fresh wrapper process per method, so RUSAGE_CHILDREN's peak covers this run alone.
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(code)"
    )
    start = time.perf_counter()
    log_path = workdir / f"{method}.log"
    with log_path.open("w") as log:
        code = subprocess.call(
            [sys.executable, "-c", wrapper, *command], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    if code != 0:
        raise SystemExit(f"{method} failed; see {log_path}")
    peak_kb = next(int(line.split()[1]) for line in log_path.read_text().splitlines() if line.startswith("PEAK_RSS_KB"))
    rows = list(csv.DictReader(next((workdir / method).glob("version_*/metrics.csv")).open()))
    values = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    result = {
        "wall_min": (time.perf_counter() - start) / 60,
        "peak_gb": peak_kb / 2**20,
        "step_s": statistics.median(values("train/step_seconds")[1:]),
    }
    for when in ("before", "after"):
        for metric in ("rewards/accuracies", "exact_match"):
            found = values(f"heldout/{when}/{metric}")
            result[f"{when}/{metric}"] = found[-1] if found else float("nan")
    result["last"] = {key: values(key)[-1] for key in rows[0] if values(key)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where logs and checkpoints go (default: a temp dir)"
    )
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compare-methods-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {workdir}; extra arguments: {extra or 'none'}", flush=True)
    results = {}
    for method in args.methods:
        results[method] = run(method, extra, workdir)
        print(f"{method}: { {k: v for k, v in results[method].items() if k != 'last'} }", flush=True)
    base = results.get("simpo")
    header = (
        f"| method | reward acc. before → after | exact match before → after | step s (median) | "
        f"peak RSS GB | {'step ×SimPO | RSS ×SimPO | ' if base else ''}wall min |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, r in results.items():
        ratios = f"{r['step_s'] / base['step_s']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f} | " if base else ""
        lines.append(
            f"| {method} | {r['before/rewards/accuracies']:.3f} → {r['after/rewards/accuracies']:.3f} | "
            f"{r['before/exact_match']:.3f} → {r['after/exact_match']:.3f} | {r['step_s']:.2f} | {r['peak_gb']:.2f} | "
            f"{ratios}{r['wall_min']:.1f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
