"""A training step on fake tensors: shapes and dtypes without storage, so a 70B model's step runs on a laptop CPU in
seconds while PyTorch's trackers record what a device would hold.

``fake_mode()`` is a ``FakeTensorMode`` in which modules can be built, converted and wrapped (peft, FSDP2);
``Tracker`` is ``MemTracker`` made to tolerate frozen weights and to visit only the active modules per operation
(the stock one visits every module ever seen, quadratic in the layers); ``measure`` runs a module's real ``step``
twice with its optimizer and returns the peak of live tensors by category, the module where it occurred, and the
FLOPs of one step (``FlopCounterMode``, in a separate pass). ``quantized_stand_in`` gives frozen linear layers the
storage of bitsandbytes' 4- or 8-bit formats, whose kernels cannot run on fake tensors.
"""

import contextlib
import warnings
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
prim_device = torch.ops.prim.device.default
CATEGORIES = {  # MemTracker's and FSDPMemTracker's categories under the names the report prints
    "Parameter": "parameters",
    "Sharded Param": "parameters",
    "Unsharded Param": "gathered weights",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gathered gradients",
    "Optstate": "optimizer state",
    "OptState": "optimizer state",
    "Activation": "activations",
    "Temp": "temporaries",
    "All Gather": "all-gather buffers",
    "Reduce Scatter": "reduce-scatter buffers",
    "Inputs": "inputs, other",
    "Other": "inputs, other",
}
# CPU attention kernels, which FlopCounterMode does not know (the CUDA ones it counts): 4·B·H·S·S'·D forward.
SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **k_: sdpa_flop_count(
        q, k, v
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **k_: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


def fake_mode():
    """A ``FakeTensorMode`` that accepts real tensors as inputs and lets modules be converted and wrapped (its
    memo of fake tensors, kept through weak references, makes ``Module._apply`` refuse to swap them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, value: None
    return mode


class _ActiveOnly:
    """MemTracker's per-operation peak update restricted to the device's peak, frozen weights
    tolerated (the stock tracker registers a gradient hook on every parameter, which frozen ones refuse), and the
    module stack recorded when the peak rises."""

    where: str = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is prim_device:  # asks a tensor its device (two thirds of a step's calls); allocates nothing,
            # and a fake tensor holds the answer (the fake mode's own dispatch of it costs a tenth of the step)
            return getattr(args[0], "fake_device", None) or func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._grad_seen),
                        p.register_post_accumulate_grad_hook(lambda q: self._grad_seen(q.grad)),
                    )
        return out

    def _grad_seen(self, grad: Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            # Called again in the same step (the reference pass of a LoRA policy with its adapters off), which the
            # stock tracker takes for a second iteration when the module is the root: tracked as a repeat instead.
            snapshot = self.get_tracker_snapshot()
            stats = self.memory_tracking[module]
            stats.local_peak = {device: snap["Total"] for device, snap in snapshot.items()}
            stats.snapshots.setdefault(_ModState.PEAK_FW, []).append(snapshot)
            stats.snapshots.setdefault(_ModState.PRE_FW, []).append(deepcopy(snapshot))
            return
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        # The device's peak only (the stock tracker also keeps every module's own peak, which nothing here reads),
        # with the module stack where it rose.
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap["Total"]:
                self._peak_mem[device], self._peak_mem_snap[device] = snap["Total"], dict(snap)  # a flat copy
                deepest = max(self._mod_tracker.parents, key=lambda s: (s.count("."), s))
                deepest = "the loss, outside the model's modules" if deepest == "Global" else deepest
                phase = "optimizer step" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
                self.where = f"{deepest} ({phase})"


class Tracker(_ActiveOnly, MemTracker):
    """Peak of live tensors by category on one device."""


class ShardedTracker(_ActiveOnly, FSDPMemTracker):
    """The same for a model sharded with FSDP2 (``fully_shard``), its all-gathered weights counted where they live."""


@dataclass
class Measured:
    """One step's peak of live tensors (bytes by category, and their total), where it occurred, and its FLOPs."""

    peak: dict[str, int]
    total: int
    where: str
    flops: int


def by_category(tracker: MemTracker) -> tuple[dict[str, int], int]:
    """A tracker's peak of live tensors: bytes by category (``CATEGORIES``' names), and their total."""
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    peak = dict.fromkeys(dict.fromkeys(CATEGORIES.values()), 0)
    for kind, size in snapshot.items():
        if kind != "Total":
            peak[CATEGORIES[kind.value]] += size
    return peak, snapshot["Total"]


def measure(
    module: nn.Module,
    step: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer,
    extra: list[nn.Module],
    clip: float | None,
    accumulate: bool,
    sharded: nn.Module | None = None,
    flops: bool = True,
) -> Measured:
    """Runs ``step()`` (forward, returning the loss), its backward, clipping and ``optimizer`` under a memory tracker,
    as Lightning runs a step after the first: the optimizer's state exists (made by a step on zero gradients first),
    and the previous step's gradients live through the forward pass, freed just before the backward (Lightning's
    closure), or kept where gradients ``accumulate``. Then, with ``flops``, once more under a FLOP counter. ``extra``
    modules (a frozen reference copy) are held too; ``sharded`` is the FSDP2 root, if any."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    if sharded is not None:
        tracker = ShardedTracker(sharded, optimizer)
        tracker.track_external(module, *extra)
    else:
        tracker = Tracker()
        tracker.track_external(module, optimizer, *extra)
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")  # a false alarm under checkpointing
        loss = step()
        if not accumulate:
            optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        del loss
        optimizer.zero_grad()
    peak, total = by_category(tracker)
    count = 0
    if flops:
        with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
            step().backward()
        optimizer.zero_grad()
        count = counter.get_total_flops()
    return Measured(peak, total, tracker.where, count)


# ---------------------------------------------------------------------- bitsandbytes' storage, without its kernels


def storage_bytes(numel: int, rows: int, bits: int, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for a ``rows × (numel / rows)`` weight: 4-bit packs two weights a byte with one
    float32 scale per block of 64 (double quantization: an 8-bit scale per block and a float32 one per 256
    blocks); 8-bit (LLM.int8) is a byte a weight and a float32 scale per row."""
    if bits == 8:
        return numel + 4 * rows
    blocks = -(-numel // 64)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return -(-numel // 2) + scales


class _Dequantized(torch.autograd.Function):
    """x @ Wᵀ with W de-quantized into a temporary in the forward and again in the backward, as bitsandbytes
    does: only the quantized storage is kept between them. (On fake tensors the values do not matter.)"""

    @staticmethod
    def forward(ctx, x: Tensor, storage: Tensor, shape: tuple[int, int]):
        ctx.shape = shape
        return x @ torch.empty(shape, dtype=x.dtype, device=x.device).T

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device), None, None


class QuantizedLinear(nn.Linear):
    """A linear layer holding bitsandbytes' storage (``storage_bytes``) as a frozen uint8 weight."""

    shape: tuple[int, int]
    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        out = _Dequantized.apply(x.to(self.compute_dtype), self.weight, self.shape)
        return out + self.bias if self.bias is not None else out


def quantized_stand_in(model: nn.Module, bits: int, double_quant: bool, compute_dtype: torch.dtype) -> int:
    """Turns every linear layer but the output head into a ``QuantizedLinear`` of the same shape, as
    bitsandbytes' loading does; returns the weights replaced."""
    head = model.get_output_embeddings()
    count = 0
    for layer in model.modules():
        if type(layer) is nn.Linear and layer is not head:
            rows, cols = layer.weight.shape
            size = storage_bytes(rows * cols, rows, bits, double_quant)
            layer.__class__ = QuantizedLinear
            layer.weight = nn.Parameter(torch.empty(size, dtype=torch.uint8), requires_grad=False)
            layer.shape, layer.compute_dtype = (rows, cols), compute_dtype if bits == 4 else torch.bfloat16
            count += rows * cols
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = bits == 4, bits == 8
    return count


@contextlib.contextmanager
def fake_process_group(world: int):
    """A process group of ``world`` ranks whose collectives do nothing (this process is rank 0), and its mesh."""
    import torch.distributed as dist
    import torch.distributed.tensor._sharding_prop as sharding_prop
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    detect = sharding_prop.detect_fake_mode
    sharding_prop.detect_fake_mode = lambda *args, **kwargs: None  # DTensor's propagation outside the fake mode
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()
        sharding_prop.detect_fake_mode = detect
