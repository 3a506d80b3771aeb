"""Peak memory of layerprobe's own calls, measured without allocating: the model is built at full
size under `FakeTensorMode` (every op runs its shape logic, nothing is allocated) and a dispatch
mode follows every storage an aten op makes until it dies.

`StorageTracker` adds a new storage's bytes the first time an op returns it and subtracts them
when the storage is freed (`weakref.finalize`); storages that existed before (weights, buffers,
inputs) are registered first, so views of them count nothing. Its running maximum per device is
the peak over what existed before. Kernel-internal buffers are not seen, so a CUDA peak is larger:
`cuda_estimate` adds the allowance measured against real allocations (docs/design.md).

The same prediction serves `analyze` on a GPU before any weight loads (`analysis.check_fits_before_loading`,
on a model built here from the config alone, `fake_model`): a batch that will not fit says so, with the batch
size that would. A deep model is tracked on its first 2P and 3P layers (P: the period of its layer kinds,
`depth_samples`) and the peak extrapolated linearly in the depth. `HostReadCounter` counts the other cost that
hides from a CPU run: the host syncs a GPU run would make (the sweep's tests and bench_prune.py).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1 << 30
# Allowance from tracked bytes to a CUDA peak: allocator rounding and kernel workspaces (x1.1 of
# what the run adds over the weights); the CUDA context itself is outside torch's free memory.
CUDA_FACTOR = 1.1
CUDA_CONTEXT_BYTES = int(0.7 * GIB)


# Ops that return a Python value read from the data, and what a faked run answers.
_SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
_VALUE_READS = {torch.ops.aten.allclose.default: True, torch.ops.aten.equal.default: True,
                torch.ops.aten.is_nonzero.default: True}


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages aten ops create, per device.

    `fake_scalars`: answer every read of a tensor's value (`.item()`, `float(t)`: `scalar`; `allclose`:
    True) instead of failing, so code that syncs on a value runs under FakeTensorMode (the values are
    meaningless, the shapes and therefore the bytes are not).
    """

    def __init__(self, fake_scalars: bool = False, scalar: float = 0):
        super().__init__()
        self.fake_scalars, self.scalar = fake_scalars, scalar
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._seen: set[int] = set()
        self.scalar_reads = 0

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that exist already (weights, buffers, inputs): never counted."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._seen.add(t.untyped_storage()._cdata)

    def register_module(self, module: torch.nn.Module) -> None:
        self.register(list(module.parameters()) + list(module.buffers()))

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            return
        key = storage._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        device, size = str(t.device), storage.nbytes()
        self.live[device] += size
        self.peak[device] = max(self.peak[device], self.live[device])
        weakref.finalize(storage, self._free, key, device, size)

    def _free(self, key: int, device: str, size: int) -> None:
        self._seen.discard(key)
        self.live[device] -= size

    def reset_peak(self) -> None:
        for device, live in self.live.items():
            self.peak[device] = live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and (func in _SCALAR_READS or func in _VALUE_READS):
            self.scalar_reads += 1
            return self.scalar if func in _SCALAR_READS else _VALUE_READS[func]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def weight_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of the parameters and buffers per device, each storage once (tied weights count once)."""
    seen, out = set(), defaultdict(int)
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            out[str(t.device)] += storage.nbytes()
    return dict(out)


def cuda_estimate(weights: int, tracked_peak: int) -> int:
    """A CUDA device's peak from a tracked run: the weights, what the run added x CUDA_FACTOR, the context."""
    return weights + int(CUDA_FACTOR * tracked_peak) + CUDA_CONTEXT_BYTES


@contextlib.contextmanager
def fake_mode(like: torch.nn.Module | None = None):
    """FakeTensorMode in which a model can be built at full size and run (nothing allocated);
    `like`: a model built under an earlier fake mode, whose mode is entered again."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = getattr(next(like.parameters()), "fake_mode", None) if like is not None else None
    with (mode or FakeTensorMode()) as active:
        yield active


def fake_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A full-size, unallocated copy of a transformers model, built from its config under the
    current fake mode, in the model's dtype. (Call inside `fake_mode()`.)"""
    dtype = next(model.parameters()).dtype
    with _default_dtype(dtype):
        copy = type(model)(model.config)
    if any(p.dtype != dtype for p in copy.parameters() if p.dtype.is_floating_point):
        copy = copy.to(dtype)
    return copy.eval()


def fake_model(config, dtype: torch.dtype, *, attn_implementation: str | None = None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of `config` at full size in `dtype`, as `from_pretrained` would build it, but with
    no weight read or allocated. (Call inside `fake_mode()`.)"""
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model.eval()


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (None elsewhere: the fit check is for GPUs)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def _layer_kind(layer: torch.nn.Module) -> tuple:
    """What decides a layer's memory: the classes, scalar settings (sliding or full attention, ...) and
    parameter shapes and dtypes of its modules; its own index (layer_idx and the like) left out."""
    settings = tuple((name, type(m).__name__, tuple(sorted(
        (k, v) for k, v in vars(m).items()
        if isinstance(v, (str, int, float, bool)) and not k.startswith("_") and "idx" not in k
        and "index" not in k and k not in ("layer_id", "layer_number"))))
        for name, m in layer.named_modules())
    return settings, tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())


def depth_samples(layers) -> tuple[int, int] | None:
    """The two depths a deep model is tracked at: 2P and 3P layers, P the smallest period of its layer
    kinds (1 for most models, 2 for Gemma-2's sliding/full alternation); None when 3P layers are not
    fewer than all of them (then track the whole model)."""
    kinds = [_layer_kind(layer) for layer in layers]
    n = len(kinds)
    period = next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))
    return (2 * period, 3 * period) if 3 * period < n else None


def extrapolate(depths: tuple[int, int], values: tuple[int, int], depth: int) -> int:
    """The line through (depths[i], values[i]) at `depth`: with checkpointed layers, each layer adds its
    stored input and its gradients to the peak, and the largest transient (one layer's recompute and
    backward) is already in the shallower run."""
    (a, b), (va, vb) = depths, values
    return max(vb, math.ceil(va + (vb - va) * (depth - a) / (b - a)))  # never below the deeper run's own peak


@contextlib.contextmanager
def first_layers(parent: torch.nn.Module, name: str, k: int):
    """`parent.<name>` (the model's layer list) cut to its first `k` layers inside the block, put back after.
    The model's forward loops over the list it holds (`self.layers[:num_hidden_layers]` in transformers)."""
    layers = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList(list(layers)[:k]))
    try:
        yield
    finally:
        setattr(parent, name, layers)


def largest_batch(need: Callable[[int], float], free: float, batch_size: int) -> tuple[float, int | None]:
    """(need at `batch_size`, the largest batch size up to it whose need fits `free`, None if not even 1).
    The need is linear in the batch (checked on the tracker), so the predictions at `batch_size` and 1
    give the line; the second is made only when the first does not fit."""
    at_batch = need(batch_size)
    if at_batch <= free:
        return at_batch, batch_size
    if batch_size == 1:
        return at_batch, None
    at_one = need(1)
    per_sample = (at_batch - at_one) / (batch_size - 1)
    fits = [b for b in range(1, batch_size) if at_one + (b - 1) * per_sample <= free]
    return at_batch, (max(fits) if fits else None)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@dataclass
class Prediction:
    weights: int  # bytes of parameters and buffers
    tracked: int  # tracked peak over the weights (bytes)

    @property
    def cuda(self) -> int:
        return cuda_estimate(self.weights, self.tracked)


def track(run: Callable[[], object], module: torch.nn.Module, inputs: Iterable[torch.Tensor] = ()) -> Prediction:
    """Run `run()` under a StorageTracker (values faked) and return the peak over `module`'s weights."""
    tracker = StorageTracker(fake_scalars=True)
    tracker.register_module(module)
    tracker.register(inputs)
    with tracker:
        run()
    return Prediction(sum(weight_bytes(module).values()), max(tracker.peak.values(), default=0))


class HostReadCounter:
    """Context manager counting host reads of tensor values: aten._local_scalar_dense, and the Python methods that
    read a value (.item, .tolist, .cpu, .numpy, float(), int(), bool(), indexing), which inference_mode (where the
    sweep runs) or a CPU tensor hides from a dispatch mode. Each read is counted once."""

    READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self):
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not counter.inside:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self.inside, self.mode, self.saved = 0, 0, Mode(), {}

    def __enter__(self):
        for name in self.READS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, **k):
                self.count += 1
                self.inside += 1  # the method's own _local_scalar_dense is not counted again
                try:
                    return _original(t, *a, **k)
                finally:
                    self.inside -= 1

            setattr(torch.Tensor, name, wrapped)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        self.saved = {}


# --- Device maps over GPUs, predicted on a CPU --------------------------------------------------------------
# A CPU-only torch cannot run a backward on fake "cuda" tensors (the autograd engine asks for a CUDA device
# guard and aborts), and fake "meta:k" tensors take SDPA's math path (an O(T²) attention matrix, not the
# flash kernel a GPU runs). Fake "cpu:k" tensors do neither: ops, copies and the backward run as on one
# device, every op still refuses operands on two devices, and SDPA takes the fused (flash) kernel as in the
# one-device prediction. So GPU k of a device map is played by the fake device cpu:k+1; "cpu" stays the host.

def fake_gpu(index: int) -> str:
    """The fake device that stands in for GPU `index` of a device map."""
    return f"cpu:{index + 1}"


def device_label(device: str) -> str:
    """'cpu:3' -> 'GPU 2', 'cpu' -> 'host'; anything else keeps its name."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return f"GPU {int(index) - 1}" if index else "host"
    return str(device)


def dispatch_fake(model: torch.nn.Module, device_map: dict) -> torch.nn.Module:
    """accelerate's `dispatch_model` (what from_pretrained(device_map=...) ends with) on a fake model, each GPU
    index k of `device_map` on `fake_gpu(k)`: the weights move there and the hooks that copy activations
    between devices are attached as on a real multi-GPU load. Maps that offload to cpu or disk are refused.
    (Call inside the model's fake mode.)"""
    from accelerate import dispatch_model

    if not all(isinstance(where, int) for where in device_map.values()):
        raise ValueError("a fake model can be dispatched over GPUs only (offloading to cpu or disk rebuilds "
                         "weights from a state dict)")
    fake = {name: fake_gpu(where) for name, where in device_map.items()}
    # Weights first, by hand: accelerate re-wraps a moved weight as type(weight)(...), which FakeTensor refuses;
    # a weight already on its device is left as it is.
    moved: dict[int, torch.Tensor] = {}
    for name, where in fake.items():
        for module in model.get_submodule(name).modules():
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is None:
                        continue
                    if id(t) not in moved:  # tied weights stay one tensor
                        data = t.detach().to(where)
                        moved[id(t)] = (torch.nn.Parameter(data, requires_grad=t.requires_grad)
                                        if isinstance(t, torch.nn.Parameter) else data)
                    table[key] = moved[id(t)]
    # The main device (the top-level hook's) as accelerate picks it from the real map's set of GPU indices,
    # not from the set of fake names (whose order varies with string hashing).
    main = list(set(device_map.values()))[0]
    kwargs = {"skip_keys": getattr(model, "_skip_keys_device_placement", None), "main_device": fake_gpu(main)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FakeTensor's data_ptr warning (accelerate's tied-weight bookkeeping)
        return dispatch_model(model, device_map=fake, **kwargs)


@dataclass
class DevicePrediction:
    """Per device (a name from `device_label`): the weights on it and the tracked peak over them (bytes)."""
    weights: dict[str, int]
    tracked: dict[str, int]

    def cuda(self, device: str) -> int:
        return cuda_estimate(self.weights.get(device, 0), self.tracked.get(device, 0))


def track_devices(run: Callable[[], object], module: torch.nn.Module,
                  inputs: Iterable[torch.Tensor] = ()) -> DevicePrediction:
    """`track` per device: each device's own peak of what the run adds over its weights (devices peak at
    different moments), labelled by `device_label`."""
    tracker = StorageTracker(fake_scalars=True)
    tracker.register_module(module)
    tracker.register(inputs)
    with tracker:
        run()
    weights = {device_label(d): b for d, b in weight_bytes(module).items()}
    tracked = {device_label(d): b for d, b in tracker.peak.items()}
    return DevicePrediction(weights, tracked)
