"""``estimate``: the real step on fake tensors against the same step run by Lightning on real tensors, its FLOPs
against the analytic count, bitsandbytes' storage against bitsandbytes itself, the shipped GPU configs against the
memory their names promise, and the command's output."""

import copy

import pytest
import torch

from simpo_lightning.cli import main
from simpo_lightning.estimate import predict, read_config
from simpo_lightning.estimate.calibrate import analytic_flops, real_step
from simpo_lightning.estimate.command import GIB, promised_gib, setup
from simpo_lightning.estimate.fake import storage_bytes

from helpers import ROOT

TINY = read_config(str(ROOT / "configs/testing/tiny.yaml"))
GPU_CONFIGS = sorted(
    p for folder in ("llama-3-8b-instruct", "mistral-7b-instruct") for p in (ROOT / "configs" / folder).glob("*.yaml")
)


def tiny(loss="simpo", lora=True, checkpointing=False, precision="32-true", length=96, batch=2) -> dict:
    config = copy.deepcopy(TINY)
    config["trainer"].update(precision=precision, devices=1, accumulate_grad_batches=1)
    config["model"]["policy"]["gradient_checkpointing"] = checkpointing
    config["model"]["loss"] = {"name": loss}
    config["model"]["lora"] = config["model"]["lora"] if lora else None
    config["data"].update(truncation={"max_length": length}, batch_size=batch)
    return config


@pytest.mark.parametrize(
    "case",
    [
        dict(loss="simpo", lora=True, checkpointing=True),
        dict(loss="dpo", lora=False),  # a frozen reference copy
        dict(loss="simpo", lora=False, checkpointing=True, precision="bf16-mixed"),
    ],
    ids=["lora-simpo-checkpointing", "full-dpo", "full-simpo-bf16-mixed"],
)
def test_the_estimate_is_within_10_percent_of_a_real_lightning_steps_live_tensors(case):
    estimate = predict(tiny(**case), flops=False)
    torch.manual_seed(0)
    with setup(tiny(**case)) as s:
        measured = real_step(s)
    assert measured["total"] > 0
    assert abs(estimate.measured.total / measured["total"] - 1) < 0.10, (estimate.measured.peak, measured)


@pytest.mark.parametrize("lora, checkpointing", [(False, False), (True, True)], ids=["full", "lora-checkpointing"])
def test_the_estimates_flops_are_within_5_percent_of_the_analytic_count(lora, checkpointing):
    config = tiny(lora=lora, checkpointing=checkpointing)
    estimate = predict(config)
    with setup(config) as s:
        s.module.configure_model()
        packed, model = s.batch.packed, s.module.model
        attended = (
            sum((end - start) ** 2 for row in packed.spans for start, end in row) * model.config.num_hidden_layers
        )
        analytic = analytic_flops(model, packed.input_ids.numel(), len(packed.targets), attended, checkpointing, False)
    assert abs(estimate.measured.flops / analytic - 1) < 0.05


def llama_3_8b_lora_counted_by_hand(estimate) -> None:
    """configs/llama-3-8b-instruct/lora-24gb.yaml's weights in bfloat16, its rank-16 adapters and their AdamW state
    in float32, counted by hand from Llama-3-8B's widths."""
    hidden, inner, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    weights = (
        2 * vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner + 2 * hidden) + hidden
    )
    r = 16  # every linear layer of a decoder layer: r·(inputs + outputs) adapter weights
    shapes = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inner),
        (hidden, inner),
        (inner, hidden),
    ]
    adapters = layers * sum(r * (a + b) for a, b in shapes)
    assert estimate.measured.peak["parameters"] == 2 * weights + 4 * adapters
    steps = 4 * 2 * len(shapes) * layers  # AdamW's step count, a float32 scalar for each of A and B
    assert estimate.measured.peak["optimizer state"] == 2 * 4 * adapters + steps  # and its two moments


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_storage_equals_bitsandbytes_own(bits):
    """bitsandbytes quantizes a weight on this CPU; its stored tensors' bytes are what the estimate counts (the
    constant code tables aside: 16 and 256 float32 values a layer)."""
    bnb = pytest.importorskip("bitsandbytes")
    rows, cols = 384, 512
    weight = torch.randn(rows, cols)
    if bits == 4:
        packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        packed = packed._quantize("cpu")
        state = packed.quant_state
        stored = [packed, state.absmax, state.state2.absmax]
    else:
        packed = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize("cpu")
        stored = [packed.CB, packed.SCB]
    assert storage_bytes(rows * cols, rows, bits, double_quant=True) == sum(
        t.numel() * t.element_size() for t in stored
    )


def test_a_qlora_estimate_counts_4_bit_storage_and_float32_for_the_rest():
    config = tiny()
    config["model"]["policy"]["quantization"] = {"bits": 4, "double_quant": True, "compute_dtype": "float32"}
    estimate = predict(config, flops=False)
    plain = predict(tiny(), flops=False)
    with setup(tiny()) as s:
        s.module.configure_model()
        model = s.module.model
        head = model.get_output_embeddings()
        linear = [
            m.weight
            for m in model.modules()
            if type(m) is torch.nn.Linear and m is not head and not m.weight.requires_grad
        ]
        quantized = sum(storage_bytes(w.numel(), w.shape[0], 4, True) for w in linear)
        rest = sum(p.numel() * 4 for p in model.parameters()) - sum(w.numel() * 4 for w in linear)
    assert estimate.measured.peak["parameters"] == quantized + rest
    assert estimate.measured.peak["parameters"] < plain.measured.peak["parameters"]
    assert any("4-bit" in note for note in estimate.notes)


@pytest.mark.slow
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_gpu_config_fits_the_memory_its_name_promises(path):
    """(Llama-3-8B's LoRA config also holds the bytes of its weights, adapters and optimizer state counted by hand.)"""
    promised = promised_gib(str(path)) or 80  # fsdp-*: 80 GB A100s or H100s
    estimate = predict(read_config(str(path)), flops=False)
    assert estimate.measured.total > 4 * GIB  # a 7-8B step, not an empty one
    if path == ROOT / "configs/llama-3-8b-instruct/lora-24gb.yaml":
        llama_3_8b_lora_counted_by_hand(estimate)
    assert estimate.predicted <= promised * GIB, f"{path.name}: {estimate.predicted / GIB:.1f} GiB of {promised}"


def test_estimate_prints_the_breakdown_and_refuses_what_it_cannot_run(capsys):
    main(["estimate", "--config", str(ROOT / "configs/testing/tiny.yaml"), "--gpu", "A100", "--pairs", "1000"])
    out = capsys.readouterr().out
    for said in ("parameters", "activations", "live tensors", "allowance", "predicted", "FLOPs", "on A100"):
        assert said in out, said
    with pytest.raises(SystemExit) as exit:
        main(["estimate", "--config", str(ROOT / "configs/online/grpo-demo.yaml")])
    assert exit.value.code == 2 and "samples, which fake tensors cannot" in capsys.readouterr().err
