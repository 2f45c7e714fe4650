"""``simpo-lightning estimate``: a ``fit`` config's GPU memory per device, FLOPs and time, from the real training
step run on fake tensors (``estimate.fake``) at the config's worst-case batch, on any CPU in seconds."""

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from simpo_lightning.errors import UserError, user_error_in
from simpo_lightning.estimate.fake import Measured, fake_mode, fake_process_group, measure, quantized_stand_in

ARCHITECTURES = Path(__file__).resolve().parents[2] / "configs" / "architectures"
KNOWN = {  # hub ids (lower case, a part of) -> architecture file, for when the hub is unreachable
    "llama-3-70b": "llama-3-70b",
    "llama-3.1-70b": "llama-3-70b",
    "llama-3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
    "llama3-8b": "llama-3-8b",
    "llama-3.2-1b": "llama-3.2-1b",
    "mistral-7b": "mistral-7b",
}
GPUS = {  # dense bfloat16 peak TFLOP/s and memory (GiB) of the GPUs named by --gpu
    "A100": (312.0, 80),
    "H100": (989.0, 80),
    "H200": (989.0, 141),
}
CONTEXT_GIB, NCCL_GIB, FRAGMENTATION = 0.75, 0.5, 0.10
ALLOWANCE = (
    f"allowance: CUDA context and kernel workspaces {CONTEXT_GIB} GiB, NCCL buffers {NCCL_GIB} GiB with several "
    f"devices, allocator rounding and fragmentation {FRAGMENTATION:.0%} of the peak (not simulated)"
)
GIB = 2**30


@dataclasses.dataclass
class Estimate:
    """What ``estimate`` predicts for one device (bytes, FLOPs) and what it ran."""

    measured: Measured
    allowance: int
    devices: int
    pairs_per_step: int
    positions: int
    notes: list[str]
    build_seconds: float

    @property
    def predicted(self) -> int:
        """The peak of live tensors plus the allowance: what the device must hold."""
        return self.measured.total + self.allowance


def estimate(
    config: str,
    devices: int | None = None,
    device_memory_gb: float | None = None,
    gpu: str = "H100",
    mfu: float = 0.4,
    pairs: int = 60000,
    architecture: str | None = None,
    prompt_tokens: int = 1,
    brief: bool = False,
) -> None:
    """Predict a fit config's peak GPU memory per device, FLOPs and time: its real step on fake tensors.

    Args:
        config: a ``fit`` YAML file (what ``fit --config`` takes).
        devices: processes to shard over (FSDP2); default the config's ``trainer.devices × num_nodes``.
        device_memory_gb: GiB a device has; default the number in the config's file name (``lora-24gb``),
            else the ``gpu``'s; 0: compare with none.
        gpu: A100, H100 or H200: its bfloat16 peak for the time.
        mfu: the model FLOPs utilisation assumed for the time.
        pairs: pairs in an epoch, for the epoch's time.
        architecture: the model's ``config.json`` (a file, or a name under ``configs/architectures``) where the
            config's model cannot be read here (hub ids need the hub; known ones map to the shipped files).
        prompt_tokens: the worst-case pair's prompt; its responses fill ``max_length`` after it.
        brief: one line: the predicted peak per device (what ``fit --estimate true`` prints).
    """
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: one of {', '.join(GPUS)}")
    sections = read_config(config)
    result = predict(sections, devices, architecture, prompt_tokens, flops=not brief)
    memory = device_memory_gb if device_memory_gb is not None else promised_gib(config) or GPUS[gpu][1]
    if brief:
        predicted, live, allowance = (x / GIB for x in (result.predicted, result.measured.total, result.allowance))
        verdict = "fits" if result.predicted <= memory * GIB else "DOES NOT FIT"
        print(
            f"estimate: predicted peak {predicted:.1f} GiB per device ({live:.1f} of live tensors + {allowance:.1f} "
            + (f"allowance) of {memory:g}: {verdict}" if memory else "allowance); no GPU here to compare with")
        )
        return
    print(report(result, Path(config).name, memory, gpu, mfu, pairs))


def read_config(path: str) -> dict[str, Any]:
    """A fit config's ``trainer``, ``model`` and ``data`` sections."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    sections = yaml.safe_load(file.read_text()) or {}
    if not isinstance(sections, dict) or not isinstance(sections.get("model", {}), dict):
        raise UserError(f"--config {path}: not a fit config (no model: section)")
    return {key: sections.get(key) or {} for key in ("trainer", "model", "data")}


def promised_gib(path: str) -> float | None:
    """The memory a config's file name promises (``lora-24gb``: 24), else None."""
    import re

    found = re.search(r"(\d+)gb", Path(path).stem)
    return float(found.group(1)) if found else None


def architecture_file(name_or_path: str | None, given: str | None) -> dict:
    """The model's config as a dict: ``given`` (file or shipped name), else the source's own where it can be read,
    else the shipped file of a known hub id."""
    if given is not None:
        file = Path(given) if Path(given).suffix == ".json" else ARCHITECTURES / f"{given}.json"
        if not file.is_file():
            names = ", ".join(sorted(p.stem for p in ARCHITECTURES.glob("*.json")))
            raise UserError(f"--architecture {given}: no such file; the shipped ones are {names}")
        return json.loads(file.read_text())
    from transformers import AutoConfig

    from simpo_lightning.models.loading import PolicyConfig, looks_local, model_folder

    lowered = (name_or_path or "").lower()
    known = next((stem for part, stem in KNOWN.items() if part in lowered), None)
    if known is not None and not looks_local(name_or_path):  # a known hub id: no network wait
        return json.loads((ARCHITECTURES / f"{known}.json").read_text())
    with contextlib.suppress(OSError, UserError, ValueError):
        return AutoConfig.from_pretrained(model_folder(PolicyConfig(name_or_path), weights=False)).to_dict()
    raise UserError(
        f"model.policy.name_or_path {name_or_path}: its config cannot be read here; pass --architecture "
        "(a config.json, or a name under configs/architectures)"
    )


def instantiate(section: dict, default: str, base: type) -> Any:
    """The object a config section names by ``class_path`` (``default`` where it gives only arguments)."""
    from jsonargparse import ArgumentParser

    if "class_path" not in section:
        section = {"class_path": default, "init_args": section}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "x", required=True)
    try:
        return parser.instantiate_classes(parser.parse_object({"x": section})).x
    except Exception as error:  # jsonargparse reports every kind of mismatch so, wrapping the class's own errors
        cause = user_error_in(error)
        if isinstance(cause, UserError):
            raise cause from error
        raise UserError(f"the config's {default.rsplit('.', 1)[-1]} section: {str(error).splitlines()[0]}") from error


@dataclasses.dataclass
class Setup:
    """A config's module (not yet built), its worst-case batch and how it trains."""

    module: Any
    batch: Any
    world: int
    precision: str
    clip: float | None
    accumulate: bool
    quantization: dict | None
    notes: list[str]

    def autocast(self):
        """The Trainer's autocast for its precision (bf16-mixed), on the CPU."""
        mixed = self.precision == "bf16-mixed"
        return torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()


@contextlib.contextmanager
def setup(
    sections: dict[str, Any],
    devices: int | None = None,
    architecture: str | None = None,
    prompt_tokens: int = 1,
    length: int | None = None,
):
    """The config ``sections``' module with random weights of its architecture (``architecture_file``) and the
    worst-case batch: ``batch_size`` pairs of a ``prompt_tokens`` prompt and two responses to ``max_length`` (or to
    ``length``)."""
    import lightning as L

    from simpo_lightning.data.collate import PreferenceCollator
    from simpo_lightning.methods.base import SupervisedModule
    from simpo_lightning.models.loading import PolicyConfig, model_folder

    trainer, model_section, data = sections["trainer"], dict(sections["model"]), sections["data"]
    init = dict(model_section.get("init_args", model_section))
    policy = dict(init.get("policy") or {})
    quantization = policy.get("quantization")
    arch = architecture_file(policy.get("name_or_path"), architecture)
    arch.update(policy.get("config_overrides") or {})
    given = str(trainer.get("devices", 1))
    world = devices or (int(given) if given.isdigit() else 1) * int(trainer.get("num_nodes", 1) or 1)
    notes = []
    if world > 1:
        notes.append(
            f"sharded over {world} fake ranks as ModelParallelStrategy does (FSDP2, a unit per decoder layer), which "
            "computes the model's full logits; FSDPStrategy shards alike and could keep the chunked head (less)"
        )
    if "activation_checkpointing_policy" in str(trainer.get("strategy")):
        policy["gradient_checkpointing"] = True
    with tempfile.TemporaryDirectory() as folder:
        for file in Path(model_folder(PolicyConfig(), weights=False)).iterdir():  # SmolLM2's tokenizer
            if file.name != "config.json" and file.is_file():
                shutil.copy(file, folder)
        (Path(folder) / "config.json").write_text(json.dumps(arch))
        policy.update(name_or_path=folder, gguf_file=None, random_init=quantization is None, init_from=None)
        init["policy"] = policy
        section = {**model_section, "init_args": init} if "class_path" in model_section else init
        module = instantiate(section, "simpo_lightning.methods.SimPOModule", L.LightningModule)
        if not isinstance(module, SupervisedModule):
            raise UserError(
                f"estimate runs the supervised modules' step (preference methods, SFT, reward models); "
                f"{type(module).__name__} samples, which fake tensors cannot"
            )
        if not data.get("shared_prompt", True):
            raise UserError("estimate runs the shared-prompt layout (data.shared_prompt true) only")
        length = length or int((data.get("truncation") or {}).get("max_length", 1024))
        response = [7] * (length - prompt_tokens)
        examples = [{"prompt": [5] * prompt_tokens, "chosen": response, "rejected": response}]
        examples *= int(data.get("batch_size", 4))
        method = getattr(module, "method", None)
        if (init.get("reference") or {}).get("precompute") and method is not None and method.reference:
            examples = [{**e, "ref_chosen_logps": -1.0, "ref_rejected_logps": -1.0} for e in examples]
            notes.append("reference log-probs precomputed: no reference model during training")
        yield Setup(
            module,
            PreferenceCollator(module.tokenizer.pad_token_id, shared_prompt=True)(examples),
            world,
            str(trainer.get("precision", "32-true")),
            trainer.get("gradient_clip_val"),
            int(trainer.get("accumulate_grad_batches", 1) or 1) > 1,
            quantization,
            notes,
        )


def predict(
    sections: dict[str, Any],
    devices: int | None = None,
    architecture: str | None = None,
    prompt_tokens: int = 1,
    flops: bool = True,
    length: int | None = None,
) -> Estimate:
    """The step of the config ``sections`` on fake tensors, on rank 0 of ``devices`` FSDP2 ranks (``flops``: also
    count its FLOPs, a second pass; ``length``: pairs of this many tokens a response with its prompt instead of
    ``max_length``)."""
    started = time.perf_counter()
    with setup(sections, devices, architecture, prompt_tokens, length) as s:
        module, world = s.module, s.world
        with fake_process_group(world) if world > 1 else contextlib.nullcontext(None) as mesh, fake_mode():
            with quantized_build(s.quantization, s.notes):
                module._device_mesh = mesh  # None: one device
                fresh_reference_copy(module)
                module.configure_model()
            if s.batch.ref_chosen_logps is not None:
                module.reference.free()  # as after precomputing
            if s.precision in ("bf16-true", "16-true"):
                module.to(torch.bfloat16 if s.precision.startswith("bf16") else torch.float16)
            module.train()
            optimizer = module.optimizer([p for p in module.parameters() if p.requires_grad])
            extra = [m for m in [getattr(getattr(module, "reference", None), "frozen", None)] if m is not None]

            def step():
                with s.autocast():
                    return module.step(s.batch)[0]

            root = module.model if mesh is not None else None
            measured = measure(module, step, optimizer, extra, s.clip, s.accumulate, root, flops)
    allowance = int(CONTEXT_GIB * GIB + (NCCL_GIB * GIB if world > 1 else 0) + FRAGMENTATION * measured.total)
    positions = int(s.batch.packed.input_ids.numel())
    return Estimate(measured, allowance, world, len(s.batch), positions, s.notes, time.perf_counter() - started)


def fresh_reference_copy(module) -> None:
    """Has the module's frozen reference copy built as a second model of the same configuration instead of by
    ``copy.deepcopy``, which copies fake tensors through their data pointers (undefined behaviour: it corrupted the
    heap of the process). Same shapes and dtypes, so the same memory."""
    reference = getattr(module, "reference", None)
    if reference is None or reference.lora:
        return
    from simpo_lightning.models.loading import build_policy

    def build(policy_model) -> None:
        frozen = build_policy(module.policy, None).eval().requires_grad_(False)
        if reference.config.dtype is not None:
            frozen.to(getattr(torch, reference.config.dtype))
        reference._frozen = [frozen]

    reference.build = build


@contextlib.contextmanager
def quantized_build(quantization: dict | None, notes: list[str]):
    """While building, bitsandbytes' loading replaced by a stand-in of its storage (``quantized_stand_in``)."""
    if not quantization:
        yield
        return
    from simpo_lightning.models import loading
    from simpo_lightning.models.formats import QuantizationConfig

    q = QuantizationConfig(**quantization)
    real = loading.load_quantized

    def stand_in(path, q_, dtype, attention, config, auto=None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = (auto or AutoModelForCausalLM).from_config(
            config, dtype=getattr(torch, dtype), attn_implementation=attention
        )
        replaced = quantized_stand_in(model, q.bits, q.double_quant, getattr(torch, q.compute_dtype))
        kind = f"{q.bits}-bit" + (f" {q.quant_type}, double quantization" if q.bits == 4 and q.double_quant else "")
        notes.append(
            f"{replaced / 1e9:.2f}B weights counted in bitsandbytes' {kind} storage "
            "(its kernels do not run on fake tensors)"
        )
        return model

    loading.load_quantized = stand_in
    try:
        yield
    finally:
        loading.load_quantized = real


def report(result: Estimate, name: str, memory_gib: float, gpu: str, mfu: float, pairs: int) -> str:
    """The estimate as text: memory by category, where the peak occurs, FLOPs, time."""
    m = result.measured
    lines = [
        f"{name}: per device of {result.devices}, worst-case batch of {result.pairs_per_step} pair(s) at max_length "
        f"({result.positions} positions), simulated in {result.build_seconds:.1f} s",
        "peak memory (GiB):",
    ]
    lines += [f"  {category:<16} {size / GIB:8.2f}" for category, size in m.peak.items() if size]
    lines += [
        f"  {'live tensors':<16} {m.total / GIB:8.2f}   peak at {m.where}",
        f"  {'allowance':<16} {result.allowance / GIB:8.2f}   ({ALLOWANCE})",
        f"  {'predicted':<16} {result.predicted / GIB:8.2f}   of {memory_gib:g}: "
        + ("fits" if result.predicted <= memory_gib * GIB else "DOES NOT FIT"),
    ]
    tflops, peak_tflops = m.flops / 1e12, GPUS[gpu][0]
    step = tflops / (peak_tflops * mfu)
    steps = pairs / (result.pairs_per_step * result.devices)
    lines += [
        f"FLOPs: {tflops:.3g} T a step, {tflops / result.pairs_per_step:.3g} T a pair (forward, backward, "
        "recomputation; attention over whole blocks)",
        f"time at {mfu:.0%} MFU on {gpu} ({peak_tflops:g} TFLOP/s bf16): {step:.2f} s a step; {pairs} pairs at most "
        f"{steps * step / 3600:.1f} h on {result.devices} device(s) = {steps * step * result.devices / 3600:.1f} "
        f"{gpu}-hours (every pair at max_length: an upper bound)",
    ]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
