"""``simpo-lightning inspect``: the data of a fit config as the model receives it: rows rendered with their
prompt / chosen / rejected boundaries marked, the tokens at each boundary, special-token warnings, what truncation
reached, and each split's statistics (rows kept and skipped, token lengths, a histogram)."""

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from simpo_lightning.errors import UserError
from simpo_lightning.estimate.command import instantiate, read_config

SIDES = ("prompt", "chosen", "rejected")


def inspect(
    config: str,
    rows: int = 2,
    train_data: str | None = None,
    output_dir: str = "runs/inspect",
    color: bool | None = None,
) -> dict:
    """Show the data of a fit config as the model receives it: rendered rows, boundaries, warnings, statistics.

    Args:
        config: a ``fit`` YAML file whose ``data`` section names the data (and ``model.policy`` the tokenizer).
        rows: rows shown of each split.
        train_data: instead of the config's ``data.train_data``.
        output_dir: where the length histograms go (``lengths.png``).
        color: colors and styles; None: only in a terminal (plain when piped).

    Returns:
        Each split's statistics (as printed).
    """
    import lightning as L
    from rich.console import Console
    from rich.markup import escape

    from simpo_lightning.models.loading import PolicyConfig, load_tokenizer

    sections = read_config(config)
    policy = (sections["model"].get("init_args", sections["model"]) or {}).get("policy") or {}
    fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    tokenizer = load_tokenizer(PolicyConfig(**{k: v for k, v in policy.items() if k in fields and k != "quantization"}))
    data = dict(sections["data"])
    init = dict(data.get("init_args", data))
    if train_data is not None:
        init["train_data"] = train_data
    section = {**data, "init_args": init} if "class_path" in data else init
    module = instantiate(section, "simpo_lightning.data.PreferenceDataModule", L.LightningDataModule)
    if not hasattr(module, "splits"):
        raise UserError(f"inspect reads preference data; {type(module).__name__} is not a PreferenceDataModule")
    module.tokenizer = tokenizer
    module.setup("fit")
    console = Console(highlight=False, no_color=color is False, force_terminal=color, soft_wrap=True)
    truncation = module.hparams.truncation
    budget = getattr(truncation, "max_length", None) or (truncation or {}).get("max_length")
    checks = SpecialTokens(tokenizer)
    stats = {}
    for name, split in module.splits.items():
        if name == "test" and split is module.splits.get("val"):
            continue
        columns = [c for c in SIDES if c in split.column_names]
        if "chosen" not in columns:
            raise UserError(f"inspect shows pairs; the {name} split holds unpaired completions")
        table = split.select_columns(columns).to_dict()
        console.rule(f"{name}: {len(split)} pairs")
        for i in range(min(rows, len(split))):
            ids = {side: table[side][i] for side in columns}
            console.print(f"[bold]row {i}[/] (source row {split[i]['row']})")
            for side in columns:
                style = {"prompt": "cyan", "chosen": "green", "rejected": "red"}[side]
                console.print(f"[{style}]⟦{side}: {len(ids[side])} tokens⟧[/]", escape(tokenizer.decode(ids[side])))
            for side in ("chosen", "rejected"):
                edge = ids["prompt"][-3:], ids[side][:3], ids[side][-2:]
                pieces = [tokenizer.convert_ids_to_tokens(part) for part in edge]
                console.print(
                    f"  prompt→{side}: {escape(str(pieces[0]))} {edge[0]} | {escape(str(pieces[1]))} {edge[1]}; "
                    f"ends {escape(str(pieces[2]))} {edge[2]}"
                    + (
                        " (at max_length: truncation may have cut it)"
                        if len(ids["prompt"]) + len(ids[side]) >= budget
                        else ""
                    )
                )
            for warning in checks(ids):
                console.print(f"  [yellow]warning:[/] {warning}")
        stats[name] = split_stats(table, checks, budget)
        print_stats(console, stats[name], module.skipped if name == "train" else None)
    plot_lengths(stats, Path(output_dir) / "lengths.png")
    console.print(f"wrote {Path(output_dir) / 'lengths.png'}")
    return stats


class SpecialTokens:
    """A row's special-token problems: BOS twice at the start, a response without EOS, padding inside, and a
    templated prompt that does not end with the chat template's generation prompt."""

    def __init__(self, tokenizer):
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.generation: list[int] = []
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": "x"}]
            plain = tokenizer.apply_chat_template(messages, tokenize=False)
            asked = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self.generation = tokenizer(asked[len(plain) :], add_special_tokens=False)["input_ids"]
            self.template_start = tokenizer(plain, add_special_tokens=False)["input_ids"][:1]

    def __call__(self, ids: dict[str, list[int]]) -> list[str]:
        found, prompt = [], ids["prompt"]
        if self.bos is not None and prompt[:2] == [self.bos, self.bos]:
            found.append("BOS twice at the start of the prompt")
        for side in ("chosen", "rejected"):  # (a chat template may close the turn after EOS: "<|im_end|>\n")
            if self.eos is not None and self.eos not in ids[side][-2:]:
                found.append(f"{side} does not end with EOS")
        if self.pad is not None and self.pad != self.eos and any(self.pad in v for v in ids.values()):
            found.append("a pad token inside the row")
        templated = self.generation and prompt[:1] == self.template_start
        if templated and prompt[-len(self.generation) :] != self.generation:
            found.append("the prompt is templated but does not end with the template's generation prompt")
        return found


def split_stats(table: dict[str, list], checks: SpecialTokens, budget: int) -> dict:
    """Token-length quantiles per side, the share at the length budget, the share with the chosen response longer,
    and the warnings counted over every row."""
    lengths = {side: np.array([len(x) for x in table[side]]) for side in SIDES}
    at_budget = np.maximum(lengths["chosen"], lengths["rejected"]) + lengths["prompt"] >= budget
    warnings = Counter()
    for i in range(len(lengths["prompt"])):
        warnings.update(checks({side: table[side][i] for side in SIDES}))
    return {
        "pairs": len(lengths["prompt"]),
        "lengths": {side: np.quantile(v, [0, 0.5, 0.9, 0.99, 1]).round(1).tolist() for side, v in lengths.items()},
        "at_budget": float(at_budget.mean()),
        "chosen_longer": float((lengths["chosen"] > lengths["rejected"]).mean()),
        "warnings": dict(warnings),
        "_raw": lengths,
    }


def print_stats(console, stats: dict, skipped: Counter | None) -> None:
    console.print(
        f"[bold]{stats['pairs']} pairs[/]"
        + (f"; skipped rows by reason: {dict(skipped) or 'none'}" if skipped is not None else "")
    )
    console.print("tokens (min, median, 90%, 99%, max): " + "; ".join(f"{s} {v}" for s, v in stats["lengths"].items()))
    console.print(
        f"at max_length (possibly truncated): {stats['at_budget']:.1%}; chosen longer than rejected: "
        f"{stats['chosen_longer']:.1%}; warnings over all rows: {stats['warnings'] or 'none'}"
    )


def plot_lengths(stats: dict, path: Path) -> None:
    """A histogram of prompt / chosen / rejected token lengths per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 3.5), squeeze=False)
    for axis, (name, split) in zip(axes[0], stats.items()):
        for side, values in split["_raw"].items():
            axis.hist(values, bins=30, alpha=0.5, label=side)
        axis.set(title=f"{name}: {split['pairs']} pairs", xlabel="tokens", ylabel="rows")
        axis.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
