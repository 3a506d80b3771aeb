"""Every per-token term the capture hooks sum for one layer, in one function, so that one compiled kernel
can read a bf16/fp16 stream once instead of through float32 copies.

`layer_terms(x, y, a, m)` forms, from a layer's input x and output y ([..., H]) and, for the sublayer
rows, its attention and MLP outputs a and m, the per-token terms of Block Influence
(influence.cosine_and_norms), the output and update moments (variance.py's sums), the residual update
(update.update_terms) and the activation extremes (activation.activation_extremes), by calling those
formulas on float32 values. Run eagerly, a bf16/fp16 x and y are upcast first: float32 copies of x, y,
a and m, the update y − x (formed, not expanded: see update.py), the products inside each dot product,
x + a: eleven B·T·H float32 temporaries per layer, seven of them live at once (bench/bench_hook_bytes.py).

`fused_layer_terms` runs the same function compiled by `torch.compile` (Inductor) where the tensors are
bf16/fp16 on a device in `FUSED_DEVICES` (CUDA): the upcast, y − x and the products are fused into the
row reductions, so one kernel reads x, y, a, m once in their dtype, accumulates in float32 and writes only
per-token results. The arithmetic is the same float32 arithmetic on the same (exactly upcast) values; only
the order in which a row's H terms are added differs, so each per-token sum moves by a float32 rounding
(bounded by (H − 1)·2⁻²⁴ of the sum of its terms' magnitudes; measured ~1e-7 relative: docs/design.md).
float32 inputs, other devices, fake tensors (memory.py) and a compilation that fails (warned once) take
the eager function, which for float32 performs exactly the operations the hooks always did.
"""

from __future__ import annotations

import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

from .activation import activation_extremes
from .influence import cosine_and_norms
from .update import update_terms

# Device types whose bf16/fp16 streams go through the compiled kernel. Tests add "cpu" (Inductor's C++
# backend); benchmarks empty it to time the eager path.
FUSED_DEVICES = frozenset({"cuda"})
FUSED_DTYPES = (torch.bfloat16, torch.float16)


def layer_terms(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None, m: torch.Tensor | None = None, *,
                influence: bool = True, variance: bool = True, updates: bool = True, activations: bool = True,
                parallel: bool | None = None, check: bool = True) -> dict:
    """Per-token terms [...] (float32) of a layer's input x and output y, [..., H]; only the groups asked for.

    influence: "cos" (cos(x, y)); variance: "y_sum", "y_norm", "d_sum", "d_norm" (Σ and ‖·‖ of y and of
    d = y − x); updates: "x_norm", "ratio", "cos_update", "seen" (update_terms of d on x); activations:
    "peak" (max |y|, float64 scalar) and "abs_sum" (Σ|y|, float64 scalar). With updates and the sublayer
    outputs a, m (x's shape, or reshapeable to it): "attention" (update_terms of a on x) and, unless
    `parallel` is None (an architecture whose MLP stream is unknown), "mlp" (of m on x if `parallel`, else
    on x + a); with `check` also "a_norm", "m_norm" and "rest_norm" (‖d − a − m‖), which tell whether
    y = x + a + m (capture's decomposition check).
    """
    if y.dtype != torch.float32:  # bf16/fp16 models: statistics in float32 (exact upcast)
        x, y = x.float(), y.float()
    out = {}
    if influence:
        out["cos"], x_norm, y_norm = cosine_and_norms(x, y)
    else:  # the same norms, where only the other statistics need them
        x_norm = torch.linalg.vector_norm(x, dim=-1) if updates else None
        y_norm = torch.linalg.vector_norm(y, dim=-1) if variance else None
    if variance or updates:
        # The update is small next to the stream in deep layers: form it, rather than expanding
        # |y - x|^2, which would cancel catastrophically.
        d = y - x
        d_norm = torch.linalg.vector_norm(d, dim=-1)
    if variance:
        # Per token the sums accumulate in float32 (a float64 one upcasts every element: ~8x slower on the CPU).
        out.update(y_sum=y.sum(-1, dtype=torch.float32), y_norm=y_norm,
                   d_sum=d.sum(-1, dtype=torch.float32), d_norm=d_norm)
    if updates:
        out["x_norm"] = x_norm
        out["ratio"], out["cos_update"], out["seen"] = update_terms(x, d, x_norm, d_norm)
        if a is not None:
            a, m = a.to(x.dtype).reshape(x.shape), m.to(x.dtype).reshape(x.shape)
            if check:
                out.update(a_norm=torch.linalg.vector_norm(a, dim=-1), m_norm=torch.linalg.vector_norm(m, dim=-1),
                           rest_norm=torch.linalg.vector_norm(d - a - m, dim=-1))
            out["attention"] = update_terms(x, a, x_norm)
            if parallel is not None:
                out["mlp"] = update_terms(x if parallel else x + a, m, x_norm if parallel else None)
    if activations:
        out["peak"], out["abs_sum"] = activation_extremes(y)
    return out


_compiled = None
_broken: str | None = None  # why compiling failed, once it has


def fusable(y: torch.Tensor) -> bool:
    """Whether `fused_layer_terms` compiles for this tensor: bf16/fp16, a device in FUSED_DEVICES, real data."""
    return (_broken is None and y.dtype in FUSED_DTYPES and y.device.type in FUSED_DEVICES
            and not is_fake(y))


def fused_layer_terms(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                      m: torch.Tensor | None = None, **options) -> dict:
    """`layer_terms`, as one compiled kernel where `fusable(y)`, else eagerly (same results: see above).

    Compiled, every group and the decomposition terms are formed whatever `options` ask (the caller reads
    what it selected): in a kernel that reads x, y, a, m once they cost next to nothing, and one variant per
    model (with or without a, m; its `parallel`) means one compilation, not one per selection or per batch.
    The rows are flattened to [N, H] with N marked dynamic, so batches of any size and length share it;
    H stays static (one model, one width), which lets Inductor size the row reduction.
    """
    global _compiled, _broken
    if not fusable(y):
        return layer_terms(x, y, a, m, **options)
    import torch._dynamo  # imported here: loading the compiler costs seconds that only this path needs

    width, rows = y.shape[-1], y.shape[:-1]
    flat = [t.reshape(-1, width) if t is not None else None for t in (x, y, a, m)]
    for t in flat:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    try:
        if _compiled is None:
            with warnings.catch_warnings():  # Inductor's imports touch torch.jit.script_method, deprecated by torch
                warnings.filterwarnings("ignore", message=".torch.jit.script_method. is deprecated",
                                        category=DeprecationWarning)
                import torch._inductor.compile_fx  # noqa: F401
            _compiled = torch.compile(layer_terms, fullgraph=True)
        out = _compiled(*flat, parallel=options.get("parallel"))
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # many models in one process: this call eagerly
        return layer_terms(x, y, a, m, **options)
    except Exception as e:  # no compiler, no Triton, an unsupported op: the eager path gives the same numbers
        _broken = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(f"layerprobe: the fused bf16/fp16 statistics kernel could not be compiled ({_broken}); "
                      "using float32 copies (slower, same results)", stacklevel=2)
        return layer_terms(x, y, a, m, **options)
    return {k: _unflatten(v, rows) for k, v in out.items()}


def _unflatten(v, rows):
    if isinstance(v, tuple):
        return tuple(_unflatten(t, rows) for t in v)
    return v.reshape(rows) if v.dim() == 1 else v
