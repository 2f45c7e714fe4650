"""``simpo-lightning evaluate``: are the answers better, or only longer?

Candidates and a baseline answer the same prompts; a judge (pointwise or pairwise, both orders) compares each
prompt's two answers; the report gives per candidate the win rate with a bootstrap interval, a length-controlled
win rate (AlpacaEval 2's regression without its difficulty term), answer lengths and repetition, and the cost.
Definitions and outputs: docs/evaluation.md.

    simpo-lightning evaluate --candidates '[runs/quickstart/.../last.ckpt]' --judge RuleJudge
"""

import glob
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from simpo_lightning.data.encoding import Columns
from simpo_lightning.errors import UserError
from simpo_lightning.evaluation.comparison import judge_outcomes, length_controlled_win_rate, response_stats, win_rate
from simpo_lightning.generation.commands import generate, read_jsonl
from simpo_lightning.generation.judges import Judge, PairwiseJudge, RuleJudge
from simpo_lightning.generation.sampling import SamplingConfig
from simpo_lightning.models.loading import check_model_source

log = logging.getLogger(__name__)

REFERENCE = "reference"  # the baseline that answers with each prompt's reference column


def evaluate(
    candidates: list[str],
    prompts: str = "demo:val",
    baseline: str | None = None,
    judge: Judge | PairwiseJudge | None = None,
    sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0, max_new_tokens=64),
    output_dir: str = "runs/evaluate",
    max_prompts: int | None = None,
    max_prompt_length: int = 1024,
    columns: Columns = Columns(),
    bootstrap: int = 2000,
    min_prompts_for_lc: int = 10,
    seed: int = 0,
    wandb: bool = False,
) -> list[dict]:
    """Win rate, length-controlled win rate, lengths and repetition of candidates against a baseline.

    Args:
        candidates: models to evaluate: ``fit`` checkpoints (``.ckpt``), model or exported folders, hub ids,
            ``default`` for the built-in SmolLM2, ``reference`` for the prompts' reference answers; a glob
            pattern (``runs/x/checkpoints/*.ckpt``) takes every match; ``NAME=SOURCE`` names one in the table.
        prompts: the prompts (as ``generate`` takes them: ``demo:val``, a JSONL file, …).
        baseline: the model the candidates are compared with (as a candidate), None for the built-in SmolLM2,
            or ``reference`` for the prompts' reference answers.
        judge: ``class_path`` of a ``Judge`` (scores each answer) or a ``PairwiseJudge`` (compares two);
            None: ``RuleJudge`` (the demo's: right and short beats right and wordy beats wrong).
        sampling: how every side answers (default: greedy, one answer, 64 tokens at most).
        output_dir: where the report and the answers go.
        max_prompts: the first this many prompts only.
        max_prompt_length: longer prompts are skipped (counted).
        columns: column names of ``prompts``.
        bootstrap: resamples of the prompts for the 95% interval.
        min_prompts_for_lc: fewer prompts than this give no length-controlled win rate.
        seed: seeds the bootstrap.
        wandb: also log the table and the picture to W&B.

    Returns:
        One result per candidate (as in ``results.json``).
    """
    named = [_named(c) for c in candidates]
    sources, names = _expand([source for source, _ in named]), {source: name for source, name in named if name}
    judge = judge if judge is not None else RuleJudge()
    out = Path(output_dir)
    clock = {"generation": 0.0, "judging": 0.0}
    common = dict(columns=columns, max_prompt_length=max_prompt_length, max_prompts=max_prompts)

    def answers(source: str | None, index: int) -> dict[str, dict]:
        start = time.perf_counter()
        settings = {**asdict(sampling), "seed": sampling.seed + index + 1}
        name = hashlib.sha256(json.dumps([source, settings, prompts, max_prompts]).encode()).hexdigest()[:12]
        path = out / "generations" / f"{_label(source)}-{name}.jsonl".replace("/", "_")
        model = None if source == "default" else source
        generate(prompts, str(path), model=model, sampling=SamplingConfig(**settings), progress=False, **common)
        clock["generation"] += time.perf_counter() - start
        # Keyed by the prompt as written: sides with different tokenizers answer the same prompts.
        return {json.dumps(r["prompt"], sort_keys=True): r for r in read_jsonl(path)}

    for source in [baseline, *sources]:  # before any model answers: a wrong path should not cost a generation
        if source not in ("default", REFERENCE):
            check_model_source(source, "evaluate: candidate or baseline")
    if baseline == REFERENCE and REFERENCE in sources:
        raise UserError("evaluate: the reference answers cannot be both the baseline and a candidate")
    if baseline == REFERENCE and not sources:
        raise UserError("evaluate needs at least one candidate")
    base = None if baseline == REFERENCE else answers(baseline or "default", -1)
    results, rows, sides = [], [], {}
    base_scores: dict[str, list[float]] = {}
    for i, source in enumerate(sources):
        mine = _reference_answers(base, sampling.n) if source == REFERENCE else answers(source, i)
        if source != REFERENCE:
            sides[names.get(source) or _label(source)] = mine
        if base is None:
            base = _reference_answers(mine, sampling.n)
        keys = [k for k in mine if k in base]
        if not keys:
            raise UserError(f"{source}: no prompt has an answer from both sides")
        start = time.perf_counter()
        outcomes, judged = judge_outcomes(judge, keys, mine, base, base_scores)
        clock["judging"] += time.perf_counter() - start
        result = {"candidate": names.get(source) or _label(source), "source": source, "prompts": len(keys)}
        result.update(win_rate(outcomes, bootstrap, seed))
        lengths = [[len(t) for t in side[k]["responses"]] for side in (mine, base) for k in keys]
        mine_chars = torch.tensor(lengths[: len(keys)], dtype=torch.float64).mean(1)
        base_chars = torch.tensor(lengths[len(keys) :], dtype=torch.float64).mean(1)
        lc, how = length_controlled_win_rate(outcomes, mine_chars - base_chars, min_prompts_for_lc)
        result.update({"lc_win_rate": lc, "lc_note": how})
        result["candidate_stats"] = response_stats([mine[k] for k in keys])
        result["baseline_stats"] = response_stats([base[k] for k in keys])
        results.append(result)
        for k, outcome, numbers in zip(keys, outcomes.tolist(), judged):
            rows.append(
                {
                    "candidate": result["candidate"],
                    "prompt": mine[k]["prompt"],
                    "reference": mine[k]["reference"],
                    "candidate_responses": mine[k]["responses"],
                    "baseline_responses": base[k]["responses"],
                    **numbers,
                    "outcome": outcome,
                }
            )
    total = clock["generation"] + clock["judging"]
    cost = {
        "prompts_per_second": sum(r["prompts"] for r in results) / max(total, 1e-9),
        "generation_share": clock["generation"] / max(total, 1e-9),
        "judging_share": clock["judging"] / max(total, 1e-9),
        "seconds": total,
    }
    _write(out, results, rows, cost, _label(baseline), wandb)
    if baseline != REFERENCE:
        sides[_label(baseline)] = base
    datasets = _datasets(prompts, columns)
    for label, side in sides.items():
        write_model_outputs(out / "alpaca_eval" / label.replace("/", "_") / "model_outputs.json", side, label, datasets)
    print(f"wrote AlpacaEval's model_outputs.json of each side under {out}/alpaca_eval", flush=True)
    return results


def write_model_outputs(path: Path, answers: dict[str, dict], generator: str, datasets: dict[str, str]) -> None:
    """One side's answers in AlpacaEval's ``model_outputs.json`` format: a list of ``instruction`` (the prompt's
    text; a conversation's user turns), ``output`` (the first answer), ``generator``, and ``dataset`` where the prompt
    file names one."""
    rows = []
    for answer in answers.values():
        prompt = answer["prompt"]
        if isinstance(prompt, list):
            prompt = "\n\n".join(m["content"] for m in prompt if m.get("role") == "user")
        row = {"instruction": prompt, "output": answer["responses"][0], "generator": generator}
        if prompt in datasets:
            row["dataset"] = datasets[prompt]
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))


def _datasets(prompts: str, columns: Columns) -> dict[str, str]:
    """Each prompt's ``dataset`` column (AlpacaEval's prompt files have one), where the file has it."""
    from simpo_lightning.data.prompts import prompt_of
    from simpo_lightning.data.sources import Source

    found = {}
    for _, row in Source(prompts).rows():
        if isinstance(row, dict) and isinstance(row.get("dataset"), str):
            prompt = prompt_of(row, columns)
            if isinstance(prompt, str):
                found[prompt] = row["dataset"]
    return found


def _expand(candidates: list[str]) -> list[str]:
    sources = []
    for c in candidates:
        if any(ch in c for ch in "*?["):
            matches = sorted(glob.glob(c))
            if not matches:
                raise UserError(f"candidate pattern {c!r} matches nothing")
            sources += matches
        else:
            sources.append(c)
    return sources


def _named(candidate: str) -> tuple[str, str | None]:
    """``NAME=SOURCE`` as (source, name); a plain source as (source, None)."""
    name, sep, source = candidate.partition("=")
    if sep and name and "/" not in name and not name.startswith("."):
        return source, name
    return candidate, None


def _label(source: str | None) -> str:
    """A short name: the built-in model's, a checkpoint's run folder and file, a folder's or hub id's last part."""
    if source in (None, "default"):
        return "SmolLM2-135M-Instruct"
    if source == REFERENCE:
        return REFERENCE
    path = Path(source)
    if path.suffix == ".ckpt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{run.name}/{path.stem}"
    return path.name or source


def _reference_answers(generations: dict[str, dict], n: int) -> dict[str, dict]:
    """The reference column as the baseline's answers (n copies each); prompts without one are skipped."""
    answers = {}
    for key, row in generations.items():
        if isinstance(row.get("reference"), str):
            answers[key] = {
                **{k: v for k, v in row.items() if k != "response_tokens"},
                "responses": [row["reference"]] * n,
                "finish_reasons": ["stop"] * n,
            }
    if len(answers) < len(generations):
        log.warning("baseline reference: %d prompts have no reference answer; skipped", len(generations) - len(answers))
    if not answers:
        raise UserError("baseline reference: no prompt has a reference answer (the data's reference column)")
    return answers


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(results: list[dict], baseline: str) -> str:
    lines = [
        f"Baseline: {baseline}.",
        "",
        "| candidate | prompts | win rate [95% CI] | LC win rate | mean / median chars (baseline) | "
        "hit max tokens | repeated 4-gram | distinct-2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, b = r["candidate_stats"], r["baseline_stats"]
        lines.append(
            f"| {r['candidate']} | {r['prompts']} | {_percent(r['win_rate'])} "
            f"[{_percent(r['win_rate_low'])}, {_percent(r['win_rate_high'])}] | {_percent(r['lc_win_rate'])} | "
            f"{c['mean_chars']:.0f} / {c['median_chars']:.0f} ({b['mean_chars']:.0f} / {b['median_chars']:.0f}) | "
            f"{_percent(c['hit_max_new_tokens'])} ({_percent(b['hit_max_new_tokens'])}) | "
            f"{_percent(c['repeated_4gram'])} ({_percent(b['repeated_4gram'])}) | "
            f"{c['distinct_2']:.2f} ({b['distinct_2']:.2f}) |"
        )
    lines += ["", *[f"- {r['candidate']}: {r['lc_note']}" for r in results]]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Win rate (with its interval) and LC win rate per candidate; mean answer length beside the baseline's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["candidate"] for r in results]
    x = range(len(results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(results), 3.6))
    rates = [r["win_rate"] for r in results]
    errors = [
        [w - r["win_rate_low"] for w, r in zip(rates, results)],
        [r["win_rate_high"] - w for w, r in zip(rates, results)],
    ]
    left.errorbar(x, rates, yerr=errors, fmt="o", capsize=4, label="win rate (95% CI)")
    lc = [(i, r["lc_win_rate"]) for i, r in enumerate(results) if r["lc_win_rate"] is not None]
    if lc:
        left.plot([i for i, _ in lc], [v for _, v in lc], "s", color="tab:orange", label="length-controlled")
    left.axhline(0.5, color="grey", lw=0.8, ls="--")
    left.set(ylim=(0, 1), ylabel="against the baseline", title="win rate")
    left.legend(fontsize=8)
    width = 0.38
    right.bar(
        [i - width / 2 for i in x], [r["candidate_stats"]["mean_chars"] for r in results], width, label="candidate"
    )
    right.bar([i + width / 2 for i in x], [r["baseline_stats"]["mean_chars"] for r in results], width, label="baseline")
    right.set(ylabel="characters", title="mean answer length")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        axis.set_xlim(-0.6, len(results) - 0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out: Path, results: list[dict], rows: list[dict], cost: dict, baseline: str, use_wandb: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = table(results, baseline)
    text += (
        f"\n\nCost: {cost['prompts_per_second']:.2f} prompts/s over {cost['seconds']:.0f} s, "
        f"{100 * cost['generation_share']:.0f}% generating, {100 * cost['judging_share']:.0f}% judging."
    )
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "results": results, "cost": cost}, indent=1))
    (out / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(results, out / "win_rate.png")
    if use_wandb:
        _log_wandb(out, results)
    print(text, flush=True)
    print(f"wrote {out}/results.md, results.json, per_prompt.jsonl, win_rate.png", flush=True)


def _log_wandb(out: Path, results: list[dict]) -> None:
    import wandb

    from simpo_lightning.loggers import wandb_configured

    run = wandb.init(
        project="simpo-lightning", name="evaluate", dir=str(out), mode="online" if wandb_configured() else "offline"
    )
    columns = ["candidate", "prompts", "win_rate", "win_rate_low", "win_rate_high", "lc_win_rate"]
    run.log(
        {
            "evaluate/results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in results]),
            "evaluate/win_rate": wandb.Image(str(out / "win_rate.png")),
        }
    )
    run.finish()
