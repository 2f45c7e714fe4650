"""``simpo-lightning rounds``: generate, judge, pair and fit, round after round, in one run folder.

Round k samples from round k-1's trained policy (round 1 from the fit config's model), pairs the samples
with the judge and trains on the pairs with the fit config, starting from round k-1's weights (LoRA
adapters carried over) with a fresh optimizer and a fresh learning-rate warm-up. Everything lands under
``run_dir/name/round-k/``: ``generations.jsonl``, ``pairs.jsonl`` and ``pairs.json`` (its summary), the
fit's checkpoints and logs under ``fit/``, ``fit.json`` when the round is done and ``heldout.jsonl``, its greedy
answers to the held-out prompts (the base model's in ``heldout-0.jsonl``); ``rounds.json`` holds the summary.
Run the same command again after an interruption: finished stages are skipped, an interrupted generation goes on
where it stopped and an interrupted fit resumes from its last checkpoint. The W&B runs of the rounds share a group
named after the run, with one more run that holds the rounds' sample rewards, kept shares, lengths and a
table of sample completions.
"""

import json
from functools import partial
from pathlib import Path

import yaml

from simpo_lightning.data.encoding import Columns
from simpo_lightning.errors import UserError
from simpo_lightning.generation.commands import generate, judged_answers, pairs, read_jsonl
from simpo_lightning.generation.judges import Judge, RuleJudge
from simpo_lightning.generation.sampling import SamplingConfig


def rounds(
    fit_config: str,
    rounds: int = 2,
    prompts: str = "demo",
    val_data: str | None = "demo:val",
    judge: Judge | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    fit_args: list[str] = [],  # noqa: B006  (jsonargparse reads the default from the signature)
    run_dir: str = "runs/rounds",
    name: str = "onpolicy",
    columns: Columns = Columns(),
    max_prompt_length: int = 1024,
) -> list[dict]:
    """On-policy SimPO in rounds: sample, judge, pair, train, from each round's trained policy.

    Args:
        fit_config: the ``fit`` YAML that trains each round (model, LoRA, loss, optimizer, trainer, data
            settings); its training data is replaced by each round's pairs.
        rounds: how many rounds.
        prompts: the prompts to sample from (as ``generate`` takes them).
        val_data: the validation pairs of every round's fit, and the held-out prompts whose greedy answers the
            judge scores before the first round and after each (None: part of the round's pairs, no scores).
        judge: scores the samples (``class_path`` in YAML); None: ``RuleJudge``, the demo's.
        sampling: samples per prompt, temperature, lengths; round k uses seed ``sampling.seed + k``.
        fit_args: more ``fit`` options for every round, e.g. ``["--trainer.max_steps", "30"]``.
        run_dir: where the run folders are.
        name: this run's folder under ``run_dir`` and its W&B group.
        columns: column names of ``prompts``.
        max_prompt_length: longer prompts are skipped.

    Returns:
        One summary per round: the pairs' summary and the held-out metrics before and after its fit (the
        judge's ``reward`` and, for a verifier, ``accuracy`` among them).
    """
    if rounds < 1:
        raise UserError(f"rounds = {rounds}: at least one round")
    home = Path(run_dir) / name
    judge = judge if judge is not None else RuleJudge()
    base = _base_policy(fit_config, fit_args)
    judged = partial(judged_answers, prompts=val_data, judge=judge, sampling=sampling, columns=columns)
    before = judged(base, home / "heldout-0.jsonl") if val_data is not None else None
    results = []
    for k in range(1, rounds + 1):
        folder = home / f"round-{k}"
        previous = None if k == 1 else str(home / f"round-{k - 1}" / "fit" / "checkpoints" / "last.ckpt")
        policy = base if previous is None else (previous, None)
        round_sampling = SamplingConfig(**{**vars(sampling), "seed": sampling.seed + k})
        generations = generate(
            prompts,
            str(folder / "generations.jsonl"),
            model=policy[0],
            gguf_file=policy[1],
            sampling=round_sampling,
            columns=columns,
            max_prompt_length=max_prompt_length,
        )
        summary_file = folder / "pairs.json"
        if not summary_file.is_file():
            summary_file.write_text(json.dumps(pairs(str(generations), str(folder / "pairs.jsonl"), judge)))
        summary = json.loads(summary_file.read_text())
        if not summary["pairs"]:
            raise UserError(
                f"round {k}: no pair had a preference (all samples identical or tied); sample with a higher "
                "temperature or more samples per prompt"
            )
        done = folder / "fit.json"
        if not done.is_file():
            heldout = _fit(fit_config, folder, k, previous, val_data, fit_args, name)
            done.write_text(json.dumps(heldout))
        heldout = json.loads(done.read_text())
        if before is not None:  # the judge on greedy answers to the held-out prompts, before and after the round
            after = judged((str(folder / "fit" / "checkpoints" / "last.ckpt"), None), folder / "heldout.jsonl")
            for when, metrics in (("before", before), ("after", after)):
                heldout.setdefault(when, {}).update(metrics)
            before = after
        results.append({"round": k, **summary, "heldout": heldout})
    (home / "rounds.json").write_text(json.dumps(results))
    _log_rounds(home, name, results)
    print(_table(results), flush=True)
    return results


def _base_policy(fit_config: str, fit_args: list[str]) -> tuple[str | None, str | None]:
    """``name_or_path`` and ``gguf_file`` of the policy that round 1's fit trains: the fit config's, with
    ``fit_args`` applied, resolved as ``fit`` resolves them (so round 1 samples from the model it trains)."""
    import contextlib
    import io

    from simpo_lightning.cli import cli_main

    if not Path(fit_config).is_file():
        raise UserError(f"fit_config {fit_config}: no such file")
    printed = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(printed):
        cli_main(["fit", "--config", fit_config, *fit_args, "--print_config"])
    policy = yaml.safe_load(printed.getvalue())["model"]["init_args"]["policy"]
    if policy.get("random_init"):
        raise UserError(
            f"{fit_config}: rounds sample from the model each round trains, and random_init weights are made anew "
            "by every fit; save the random model first and give its folder as model.policy.name_or_path"
        )
    return policy.get("name_or_path"), policy.get("gguf_file")


def _fit(
    fit_config: str, folder: Path, k: int, previous: str | None, val_data: str | None, fit_args: list[str], group: str
) -> dict:
    from simpo_lightning.callbacks.heldout import HeldOutReport
    from simpo_lightning.cli import cli_main

    fit = folder / "fit"
    loggers = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder), "name": "fit", "version": ""},
        },
        {
            "class_path": "simpo_lightning.loggers.WandbLogger",
            "init_args": {"save_dir": str(folder), "group": group, "name": f"round-{k}"},
        },
    ]
    args = [
        "fit",
        "--config",
        fit_config,
        *fit_args,
        "--data.train_data",
        str(folder / "pairs.jsonl"),
        "--trainer.logger",
        json.dumps(loggers),
    ]
    if val_data is not None:
        args += ["--data.val_data", val_data]
    if previous is not None:
        args += ["--model.policy.init_from", previous]
    last = fit / "checkpoints" / "last.ckpt"
    if last.is_file():
        args += ["--ckpt_path", str(last)]
    cli = cli_main(args)
    _finish_wandb()  # Lightning leaves its W&B run open; the next round's logger would reuse it
    if not last.is_file():
        raise UserError(
            f"round {k}: the fit config saves no last checkpoint; add a ModelCheckpoint with save_last: true"
        )
    report = next((c for c in cli.trainer.callbacks if isinstance(c, HeldOutReport)), None)
    return report.results if report is not None else {}


def _finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _log_rounds(home: Path, group: str, results: list[dict]) -> None:
    """The rounds' own W&B run (offline unless W&B is set up) in the group of the rounds' fits: per round the
    mean sample score, the share of prompts kept, the lengths and the held-out metrics, and a table of the
    first prompts' samples. Written once all rounds are done, from their files."""
    import wandb

    from simpo_lightning.loggers import wandb_configured

    _finish_wandb()
    run = wandb.init(
        project="simpo-lightning",
        group=group,
        name=f"{group}-rounds",
        dir=str(home),
        mode="online" if wandb_configured() else "offline",
    )
    table = wandb.Table(columns=["round", "prompt", "response", "reference", "chosen", "score"])
    for result in results:
        folder = home / f"round-{result['round']}"
        chosen = {json.dumps(r["prompt"]): r for r in read_jsonl(folder / "pairs.jsonl")}
        for row in read_jsonl(folder / "generations.jsonl")[:8]:
            pair = chosen.get(json.dumps(row["prompt"]))
            for response in row["responses"]:
                picked = pair is not None and response_text(pair["chosen"]) == response
                score = pair["chosen_score"] if picked else None
                table.add_data(
                    result["round"], json.dumps(row["prompt"])[-200:], response, row["reference"], picked, score
                )
        run.log(
            {
                "round": result["round"],
                "sample_reward": result["mean_score"],
                "kept_share": result["kept_share"],
                "response_tokens": result["mean_tokens"],
                "chosen_tokens": result["mean_chosen_tokens"],
                "rejected_tokens": result["mean_rejected_tokens"],
                **{f"heldout/{when}/{k}": v for when, m in result["heldout"].items() for k, v in m.items()},
            }
        )
    run.log({"samples": table})
    run.finish()


def response_text(response: str | list[dict]) -> str:
    """A pair's response as text: itself, or its last message's content."""
    return response if isinstance(response, str) else response[-1]["content"]


def _change(result: dict, key: str) -> str:
    before, after = result["heldout"].get("before", {}), result["heldout"].get("after", {})
    return f"{before[key]:.3f} → {after[key]:.3f}" if key in before and key in after else "-"


def _table(results: list[dict]) -> str:
    lines = [
        "",
        "| round | pairs kept | mean sample score | response tokens | reward accuracy before → after | "
        "exact match before → after | judge's reward before → after | judge's accuracy before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['round']} | {r['pairs']} of {r['prompts']} | {r['mean_score']:.3f} | {r['mean_tokens']:.1f} | "
            + " | ".join(_change(r, key) for key in ("rewards/accuracies", "exact_match", "reward", "accuracy"))
            + " |"
        )
    return "\n".join(lines)
