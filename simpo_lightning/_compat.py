"""What configs and checkpoints written before the package's folders still name.

The package was one folder of modules (``simpo_lightning.module``, ``.online``, ``.model``, ...); configs name
classes by those dotted paths (``class_path: simpo_lightning.online.OnlineModule``) and checkpoints record them
(``_class_path`` in their hyperparameters, and pickled dataclasses where a module was built in Python). This
module keeps them working: each old module path is an alias that finds its names in the new modules
(``OLD_MODULES``, put in ``sys.modules`` by the package's ``__init__``); the online modules of before (one for
GRPO and RLOO, chosen by ``method.method``, and PPO's, whose config held the update's settings) build today's
modules from their old arguments; a setting a class no longer takes is dropped from an old config file
(``migrated``); checkpoints may unpickle the config classes under their old paths
(``register_checkpoint_classes``). Nothing new should import from here.
"""

import importlib
import sys
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import yaml
from lightning.pytorch.cli import OptimizerCallable

from simpo_lightning.data.encoding import Columns, Truncation
from simpo_lightning.generation.judges import Judge
from simpo_lightning.generation.sampling import SamplingConfig
from simpo_lightning.losses.config import LossConfig
from simpo_lightning.losses.rl import TokenReduction
from simpo_lightning.methods import (
    GRPOConfig,
    GRPOModule,
    PPOConfig,
    PPOModule,
    ReferenceConfig,
    RLOOConfig,
    RLOOModule,
    RolloutModule,
    UpdateConfig,
)
from simpo_lightning.models.formats import QuantizationConfig
from simpo_lightning.models.loading import LoraConfig, PolicyConfig


@dataclass
class OnlineConfig:
    """The online method and its update, as ``simpo_lightning.online.OnlineModule`` took them (today: a method's
    config, ``GRPOConfig`` or ``RLOOConfig``, and ``UpdateConfig``)."""

    method: Literal["grpo", "rloo"] = "grpo"
    beta: float | None = None
    loss_type: TokenReduction = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    kl_bias_correction: bool = True
    normalize_advantages: bool = False
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    updates_per_rollout: int = 1
    micro_batch_size: int = 16
    shared_prompt: bool = True
    max_grad_norm: float | None = 1.0
    log_completions_steps: int = 10


@dataclass
class LegacyPPOConfig(OnlineConfig, PPOConfig):
    """PPO's settings and the update's, as ``simpo_lightning.ppo.PPOModule`` took them."""

    method: Literal["ppo"] = "ppo"
    num_iterations: int = 4


class OnlineModule(RolloutModule):
    """``simpo_lightning.online.OnlineModule``: builds ``GRPOModule`` or ``RLOOModule`` (``method.method``) from the
    arguments it took, with its defaults (a constant learning rate without warm-up). Its signature is ``__new__``'s,
    which configs are read against; the module it returns is another class's, so no ``__init__`` of this one runs."""

    def __new__(
        cls,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        method: OnlineConfig = OnlineConfig(),
        sampling: SamplingConfig = SamplingConfig(n=8, temperature=1.0, max_new_tokens=16),
        judge: Judge | None = None,
        reference: ReferenceConfig = ReferenceConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "constant",
        max_nonfinite_steps: int = 10,
        logits_chunk: int | None = 1024,
    ):
        settings = dict(policy=policy, lora=lora, sampling=sampling, judge=judge, reference=reference)
        settings |= dict(optimizer=optimizer, warmup_ratio=warmup_ratio, lr_schedule=lr_schedule)
        settings |= dict(max_nonfinite_steps=max_nonfinite_steps, logits_chunk=logits_chunk, update=_update(method))
        if method.method == "rloo":
            beta = 0.05 if method.beta is None else method.beta
            return RLOOModule(method=RLOOConfig(beta, method.normalize_advantages), **settings)
        grpo = GRPOConfig(method.beta or 0.0, method.loss_type, method.scale_rewards, method.kl_bias_correction)
        return GRPOModule(method=grpo, **settings)


class LegacyPPOModule(RolloutModule):
    """``simpo_lightning.ppo.PPOModule``: builds today's ``PPOModule`` from the arguments it took, with its defaults
    (a linear learning-rate decay without warm-up); its signature is ``__new__``'s, as ``OnlineModule``'s."""

    def __new__(
        cls,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        method: LegacyPPOConfig = LegacyPPOConfig(),
        sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.7, max_new_tokens=16),
        judge: Judge | None = None,
        reference: ReferenceConfig = ReferenceConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "linear",
        max_nonfinite_steps: int = 10,
        logits_chunk: int | None = 1024,
    ):
        ppo = PPOConfig(**{f.name: getattr(method, f.name) for f in fields(PPOConfig)})
        settings = dict(policy=policy, lora=lora, sampling=sampling, judge=judge, reference=reference)
        settings |= dict(optimizer=optimizer, warmup_ratio=warmup_ratio, lr_schedule=lr_schedule)
        settings |= dict(max_nonfinite_steps=max_nonfinite_steps, logits_chunk=logits_chunk, update=_update(method))
        return PPOModule(method=ppo, **settings)


def _update(method: OnlineConfig) -> UpdateConfig:
    """The update's settings of an old online config."""
    return UpdateConfig(**{f.name: getattr(method, f.name) for f in fields(UpdateConfig)})


# Each old module path and where its names are now: the new modules in order, or single names first.
OLD_MODULES: dict[str, list[str | dict[str, object]]] = {
    "model": ["models.loading", "models.formats", "models.checkpoints", "models.parallel", "models.tiny"],
    "weights": ["models.formats"],
    "export": ["models.export"],
    "rl": ["losses.rl"],
    "batch": ["data.batch"],
    "demo": ["data.demo"],
    "logprobs": ["scoring.logprobs"],
    "training": ["methods.base"],
    "module": ["methods.preference", "losses.config", "methods.reference"],
    "sft": ["methods.sft"],
    "reward": ["methods.reward", "models.loading"],
    "reference": ["methods.reference"],
    "margin": ["methods.margin"],
    "optim": ["methods.optim"],
    "online": [{"OnlineModule": OnlineModule, "OnlineConfig": OnlineConfig}, "methods.rollout"],
    "ppo": [{"PPOModule": LegacyPPOModule, "PPOConfig": LegacyPPOConfig}, "methods.ppo"],
    "judges": ["generation.judges"],
    "onpolicy": ["generation.commands"],
    "comparison": ["evaluation.comparison"],
    "evaluate": ["evaluation.evaluate"],
    "monitor": ["callbacks.monitor"],
    "diagnostics": ["callbacks.diagnostics"],
}


def _alias(name: str) -> types.ModuleType:
    """A module object for an old path: each attribute from its first place in ``OLD_MODULES[name]``."""
    module = types.ModuleType(f"simpo_lightning.{name}", f"Compatibility alias (simpo_lightning._compat) of {name}.")

    def find(attribute: str):
        for place in OLD_MODULES[name]:
            if isinstance(place, dict):
                if attribute in place:
                    return place[attribute]
            elif hasattr(found := importlib.import_module(f"simpo_lightning.{place}"), attribute):
                return getattr(found, attribute)
        raise AttributeError(f"module simpo_lightning.{name} (an old path) has no attribute {attribute!r}")

    module.__getattr__ = find
    return module


# Settings a class no longer takes, which configs written before still give; dropped when such a config is read.
DROPPED = {"simpo_lightning.data.PromptDataModule": ["val_fraction", "group_by_length"]}


def migrated(args: list[str]) -> list[str]:
    """``args`` with each ``--config FILE`` that gives a setting of ``DROPPED`` replaced by its YAML without it
    (jsonargparse reads a config given as text as it reads a file)."""
    out = list(args)
    for i, arg in enumerate(args[:-1]):
        path = Path(args[i + 1])
        if arg != "--config" or path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        config = yaml.safe_load(path.read_text()) or {}
        section = config.get("data") if isinstance(config.get("data"), dict) else {}
        dropped = [k for k in DROPPED.get(section.get("class_path"), []) if k in section.get("init_args", {})]
        if dropped:
            for key in dropped:
                del section["init_args"][key]
            out[i + 1] = yaml.safe_dump(config, sort_keys=False)
    return out


def install() -> None:
    """Makes the old module paths importable: each an alias module in ``sys.modules`` (Lightning looks a
    checkpoint's recorded class path up there before it trusts it)."""
    for name in OLD_MODULES:
        sys.modules.setdefault(f"simpo_lightning.{name}", _alias(name))


def register_checkpoint_classes() -> None:
    """The config classes a checkpoint's hyperparameters may hold, under today's paths and the old ones, for
    ``torch.load(weights_only=True)``. (Today's modules record plain values; a checkpoint written before by a
    module built in Python pickled the dataclasses.)"""
    today = [PolicyConfig, LoraConfig, QuantizationConfig, LossConfig, ReferenceConfig, SamplingConfig]
    today += [Columns, Truncation, GRPOConfig, RLOOConfig, PPOConfig, UpdateConfig]
    old = {
        PolicyConfig: ["model"],
        LoraConfig: ["model"],
        QuantizationConfig: ["model"],
        LossConfig: ["losses", "module"],
        ReferenceConfig: ["reference", "module"],
        SamplingConfig: ["generation"],
        OnlineConfig: ["online"],
        LegacyPPOConfig: ["ppo"],
        Columns: ["data"],
        Truncation: ["data"],
    }
    legacy_names = {LegacyPPOConfig: "PPOConfig"}
    torch.serialization.add_safe_globals(
        today
        + [
            (cls, f"simpo_lightning.{where}.{legacy_names.get(cls, cls.__name__)}")
            for cls, places in old.items()
            for where in places
        ]
    )
