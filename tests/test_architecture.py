"""The floor plan, checked: every import points down the layers of docs/architecture.md (lazy imports inside
functions too), no two modules import each other through any chain, files stay small and folders few; and what
was written before the package had folders (configs, class paths, checkpoints) still runs or loads."""

import ast
from pathlib import Path

import pytest
import torch
import yaml

from simpo_lightning.cli import cli_main

from helpers import ROOT, demo_data, tiny_model_args, trainer

PACKAGE = ROOT / "simpo_lightning"
# Lowest first. A module may import its own area and the areas of lower layers, never a higher one or another
# area of its own layer. The package's __init__ (the public API) and _compat (old paths) may import anything.
LAYERS = [
    ("errors", "cache", "loggers"),
    ("losses", "data", "models"),
    ("scoring",),
    ("generation",),
    ("evaluation", "methods"),
    ("callbacks", "estimate"),
    ("cli",),
    ("rounds",),
]
RANK = {area: rank for rank, areas in enumerate(LAYERS) for area in areas}
FACADES = {"simpo_lightning", "simpo_lightning._compat"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simpo_lightning"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("simpo_lightning")}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def area(name: str) -> str:
    return name.split(".")[1]


def test_every_import_points_down_the_layers():
    assert set(RANK) == {area(name) for name in MODULES if name not in FACADES}  # every area has a layer
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name not in FACADES
        for target in targets
        if target not in FACADES and area(target) != area(name) and RANK[area(target)] >= RANK[area(name)]
    ]
    assert not upward, upward
    facades = [f"{name} -> {t}" for name, targets in GRAPH.items() if name not in FACADES for t in targets & FACADES]
    assert facades == ["simpo_lightning.cli -> simpo_lightning._compat"], facades  # only cli reads old configs


def test_no_import_loop():
    """No module reaches itself through the imports of others (a loop even through lazy imports means two
    modules that cannot be understood apart). Package __init__ files only re-export and are left out."""
    inits = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    graph = {name: targets - inits for name, targets in GRAPH.items() if name not in inits}

    def reaches(start: str) -> set[str]:
        seen, stack = set(), list(graph[start])
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack += graph.get(name, ())
        return seen

    loops = sorted(name for name in graph if name in reaches(name))
    assert not loops, loops


def test_files_are_small_and_folders_few():
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert max(lines.values()) <= 400, sorted(lines.items(), key=lambda kv: -kv[1])[:3]
    folders = {path.parent for path in MODULES.values()}
    counts = {f.name: len([p for p in f.glob("*.py") if p.name != "__init__.py"]) for f in folders}
    assert counts.pop("simpo_lightning") <= 8 and max(counts.values()) <= 12, counts


# --------------------------------------------------------------------------- what came before the folders

OLD_CONFIGS = sorted((ROOT / "tests/fixtures/configs-before-restructure").glob("*.yaml"))


def class_paths(value) -> list[str]:
    if isinstance(value, dict):
        return (
            [value["class_path"]] if "class_path" in value else [] + [p for v in value.values() for p in class_paths(v)]
        )
    return [p for v in value for p in class_paths(v)] if isinstance(value, list) else []


@pytest.mark.parametrize("config", OLD_CONFIGS, ids=lambda p: p.name)
def test_a_config_written_before_the_folders_still_parses(config, capsys):
    """Every key is still accepted and every class path it names resolves (to the class of today, or for the
    online modules to the compatibility class that builds it)."""
    from jsonargparse._typehints import import_object

    command = config.read_text().split()[2]
    args = ["--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as exit:
        if command == "fit":
            cli_main(["fit", *args])
        else:
            from simpo_lightning.cli import main

            main([command, *args])
    assert exit.value.code in (0, None), capsys.readouterr().err[-2000:]
    for path in class_paths(yaml.safe_load(config.read_text())):
        assert callable(import_object(path)), path


@pytest.mark.parametrize("name", ["grpo-demo.yaml", "ppo-demo.yaml"])
def test_an_online_config_written_before_the_folders_still_trains(name, tiny_dir, tmp_path):
    """The one OnlineModule of before (GRPO here, RLOO by method.method) and the PPOModule whose config held the
    update: their configs build today's modules, which train a rollout."""
    old = ROOT / "tests/fixtures/configs-before-restructure" / name
    quiet = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    steps = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--data.cache_dir", "null"]
    sampling = ["--model.sampling.max_new_tokens", "3", "--data.batch_size", "2"]
    cli = cli_main(["fit", "--config", str(old), *tiny_model_args(tiny_dir), *quiet, *steps, *sampling])
    assert type(cli.model).__name__ == {"grpo-demo.yaml": "GRPOModule", "ppo-demo.yaml": "PPOModule"}[name]
    assert cli.trainer.global_step == 1 and cli.model.rollouts == 1


@pytest.mark.parametrize("kind", ["dpo", "grpo", "reward"])
def test_a_checkpoint_written_before_the_folders_still_loads_and_resumes(kind, tiny_dir, tmp_path):
    """tests/fixtures holds LoRA checkpoints of DPO, GRPO and a reward model that the code before the folders wrote
    (on configs/testing/tiny.yaml's random model): each loads by its recorded class path, and resumes one step."""
    from simpo_lightning.data import PromptDataModule
    from simpo_lightning.methods import RewardModule, RolloutModule, SimPOModule
    from simpo_lightning.models.checkpoints import checkpoint_head

    path = ROOT / f"tests/fixtures/{kind}-lora-before-restructure.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint_head(checkpoint) == ("reward" if kind == "reward" else "causal")  # from the old record
    # loaded through a class of today; the GRPO one's records the old path of the one online module
    module = {"dpo": SimPOModule, "grpo": RolloutModule, "reward": RewardModule}[kind].load_from_checkpoint(path)
    expected = {"dpo": "SimPOModule", "grpo": "GRPOModule", "reward": "RewardModule"}[kind]
    assert type(module).__name__ == expected and checkpoint["global_step"] == 2
    if kind == "dpo":
        assert module.loss_config.beta == 0.2 and module.reference.config.dtype == "bfloat16"
    data = (
        PromptDataModule(tokenizer=module.tokenizer, batch_size=2, cache_dir=None)
        if kind == "grpo"
        else demo_data(module, shared_prompt=kind != "reward")
    )
    run = trainer(max_steps=3, limit_val_batches=1, val_check_interval=1)
    run.fit(module, data, ckpt_path=path)
    assert run.global_step == 3 and torch.isfinite(run.callback_metrics["val/rewards/accuracies"])
    if kind == "grpo":
        assert module.rollouts == 3


def test_each_method_config_is_the_quickstart_but_for_what_it_says_it_changes():
    """configs/methods/<loss>.yaml promise the quickstart's model, data and schedule with another loss; SFT and the
    reward model another module and no preference diagnostics (and the reward model separate sequences): nothing
    else differs."""
    quickstart = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    differs = {"sft.yaml": {"model", "trainer.callbacks"}}
    differs["reward.yaml"] = {"model", "data.shared_prompt", "trainer.callbacks"}

    def flat(value, prefix=""):
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    for config in sorted((ROOT / "configs/methods").glob("*.yaml")):
        allowed = differs.get(config.name, {"model.loss"})
        mine, theirs = flat(yaml.safe_load(config.read_text())), flat(quickstart)
        changed = {k for k in mine.keys() | theirs.keys() if mine.get(k, "<none>") != theirs.get(k, "<none>")}
        outside = {k for k in changed if not any(k == a or k.startswith(a + ".") for a in allowed)}
        assert not outside, (config.name, sorted(outside))
        assert config.name in differs or yaml.safe_load(config.read_text())["model"]["loss"]["name"] in config.stem


def test_the_readme_example_imports_from_the_package_only_and_runs(tiny_dir, tmp_path, monkeypatch):
    """README's Python example, on the tiny model for 1 step (the only edits), imports nothing but
    ``simpo_lightning`` and trains."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python") + len("```python")
    example = readme[start : readme.index("```", start)]
    imports = [line for line in example.splitlines() if line.startswith(("from simpo_lightning", "import simpo"))]
    assert imports and all(line.startswith("from simpo_lightning import ") for line in imports), imports
    assert "PolicyConfig()" in example and "max_steps=60" in example
    example = example.replace("PolicyConfig()", f"PolicyConfig(name_or_path={tiny_dir!r})")
    example = example.replace("max_steps=60", "max_steps=1, limit_val_batches=0, logger=False")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["module"].trainer.global_step == 1
