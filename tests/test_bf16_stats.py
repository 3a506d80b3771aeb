"""The per-layer statistics of a bf16/fp16 stream read without float32 copies (metrics/token_terms.py).

Every term is checked against a float64 plain loop over the same (bf16) values; the compiled kernel
(`fused_layer_terms`, here on Inductor's CPU backend) against the eager float32 path the hooks always
took; a float32 stream never compiles; a compiler that fails falls back with one warning; and analyze
on a bf16 model gives the same columns with the fused kernel as without.

Bound: each per-token value is a float32 sum of H terms (then at most a square root and a division).
Whatever the order of the additions, a float32 sum of H terms is within (H - 1)·u of the exact one,
relative to the sum of the terms' magnitudes (u = 2^-24); `TOL = 2·H·u` covers that and the few single
roundings after it. Both paths are within TOL of the float64 value, so within 2·TOL of each other.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import layerprobe
from layerprobe.loading import load_model
from layerprobe.metrics import token_terms
from layerprobe.metrics.token_terms import fused_layer_terms, fusable, layer_terms

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0 ** -24
H = 32  # the tiny models' width: the end-to-end run reuses the direct test's compilation
ALL = dict(influence=True, variance=True, updates=True, activations=True)


def _stream(dtype, rows=(2, 7), seed=0):
    """x, y, a, m [*rows, H] in `dtype` with what the statistics must survive: rows of very different
    scale, an update far smaller than the stream (y - x cancels), an all-zero input row, a massive
    activation, and y = x + a + m to rounding (the decomposition check)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(rows)
    scale = 10.0 ** torch.linspace(-2, 2, n, dtype=torch.float64)[:, None]
    x = torch.randn(n, H, generator=g, dtype=torch.float64) * scale
    x[1] = 0.0  # a zero embedding row: no update ratio there
    a = 0.3 * torch.randn(n, H, generator=g, dtype=torch.float64) * scale
    m = 0.3 * torch.randn(n, H, generator=g, dtype=torch.float64) * scale
    a[3], m[3] = a[3] * 1e-3, m[3] * 1e-3  # an update ~1e-3 of the stream
    x, a, m = x.to(dtype), a.to(dtype), m.to(dtype)
    y = (x.double() + a.double() + m.double())
    y[4, 5] = 3000.0  # a massive activation
    y = y.to(dtype)
    return tuple(t.reshape(*rows, H) for t in (x, y, a, m))


def _float64_loop(x, y, a, m, parallel):
    """Every term, one token at a time, in Python floats (float64) from the exact values of the inputs."""
    rows = x.shape[:-1]
    X, Y, A, M = (t.double().reshape(-1, H).tolist() for t in (x, y, a, m))
    out = {k: [] for k in ("cos", "x_norm", "y_norm", "y_sum", "d_sum", "d_norm", "ratio", "cos_update", "seen",
                           "a_norm", "m_norm", "rest_norm", "att_ratio", "att_cos", "mlp_ratio", "mlp_cos",
                           "abs_sum", "y_abs_mass", "d_abs_mass", "peak")}

    def norm(v):
        return math.sqrt(sum(t * t for t in v))

    def dot(u, v):
        return sum(s * t for s, t in zip(u, v))

    def upd(stream, update):  # update_terms: (|update|/|stream|, cos(update, stream)), 0 where the stream is 0
        ns, nu = norm(stream), norm(update)
        return (nu / ns, dot(update, stream) / (nu * ns) if nu else 0.0) if ns else (0.0, 0.0)

    for xs, ys, as_, ms in zip(X, Y, A, M):
        d = [q - p for p, q in zip(xs, ys)]
        nx, ny = norm(xs), norm(ys)
        out["cos"].append(dot(xs, ys) / (nx * ny) if nx and ny else 0.0)
        out["x_norm"].append(nx)
        out["y_norm"].append(ny)
        out["y_sum"].append(sum(ys))
        out["y_abs_mass"].append(sum(abs(t) for t in ys))
        out["d_sum"].append(sum(d))
        out["d_abs_mass"].append(sum(abs(t) for t in d))
        out["d_norm"].append(norm(d))
        r, c = upd(xs, d)
        out["ratio"].append(r)
        out["cos_update"].append(c)
        out["seen"].append(nx > 0)
        out["a_norm"].append(norm(as_))
        out["m_norm"].append(norm(ms))
        out["rest_norm"].append(norm([p - q - s for p, q, s in zip(d, as_, ms)]))
        r, c = upd(xs, as_)
        out["att_ratio"].append(r)
        out["att_cos"].append(c)
        r, c = upd(xs if parallel else [p + q for p, q in zip(xs, as_)], ms)
        out["mlp_ratio"].append(r)
        out["mlp_cos"].append(c)
        out["abs_sum"].append(sum(abs(t) for t in ys))
        out["peak"].append(max(abs(t) for t in ys))
    res = {k: np.array(v, dtype=float).reshape(rows) for k, v in out.items()}
    res["abs_sum"], res["peak"] = res["abs_sum"].sum(), res["peak"].max()
    return res


def _as_numpy(t: dict) -> dict:
    out = {k: v.double().numpy() for k, v in t.items() if not isinstance(v, tuple)}
    for which, prefix in (("attention", "att"), ("mlp", "mlp")):
        if which in t:
            out[f"{prefix}_ratio"], out[f"{prefix}_cos"], _ = (v.double().numpy() for v in t[which])
    return out


def _scales(ref: dict) -> dict:
    """What each term's rounding is relative to (the sum of its terms' magnitudes, or 1 for a cosine)."""
    xa = ref["x_norm"] + ref["a_norm"] + ref["m_norm"]
    return {"cos": 1.0, "cos_update": 1.0, "att_cos": 1.0, "mlp_cos": 1.0,
            "y_sum": ref["y_abs_mass"], "d_sum": ref["d_abs_mass"], "rest_norm": xa + ref["y_norm"]}


def _assert_within(got: dict, want: dict, tol: float, what: str, exact: dict):
    scales = _scales(exact)
    for key in set(got) & set(want):
        g, w = got[key], want[key]
        if key in ("seen", "peak"):  # a comparison and a maximum: exact
            assert np.array_equal(g, w), (what, key)
            continue
        scale = scales.get(key, np.abs(w))
        err = np.abs(g - w) / np.maximum(scale, 1e-300)
        assert np.all(err <= tol), (what, key, float(err.max()), tol)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eager_terms_equal_a_float64_loop(dtype, parallel):
    x, y, a, m = _stream(dtype)
    got = _as_numpy(layer_terms(x, y, a, m, parallel=parallel, **ALL))
    assert set(got) >= {"cos", "y_sum", "d_norm", "ratio", "rest_norm", "att_ratio", "mlp_cos", "peak", "abs_sum"}
    exact = _float64_loop(x, y, a, m, parallel)
    _assert_within(got, exact, 2 * H * U, "eager", exact)


def test_a_selection_forms_only_its_terms():
    x, y, a, m = _stream(torch.bfloat16)
    assert set(layer_terms(x, y, influence=True, variance=False, updates=False, activations=False)) == {"cos"}
    assert set(layer_terms(x, y, a, m, influence=False, variance=False, updates=True, activations=False,
                           parallel=None, check=False)) == {"x_norm", "ratio", "cos_update", "seen", "attention"}


def fuse_on_cpu(monkeypatch, compile=None, fresh: bool = True) -> None:
    """The fused path on for CPU tensors (Inductor's C++ backend), an earlier failure forgotten. `fresh`: no
    kernel compiled yet; `compile`: stands in for torch.compile."""
    monkeypatch.setattr(token_terms, "FUSED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(token_terms, "_broken", None)
    if fresh:
        monkeypatch.setattr(token_terms, "_compiled", None)
    if compile is not None:
        monkeypatch.setattr(torch, "compile", compile)


def test_float32_and_fake_streams_never_compile(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.compile called")

    fuse_on_cpu(monkeypatch, compile=refuse)
    x, y, a, m = (t.float() for t in _stream(torch.bfloat16))
    assert not fusable(y)
    got, want = fused_layer_terms(x, y, a, m, parallel=False, **ALL), layer_terms(x, y, a, m, parallel=False, **ALL)
    assert got.keys() == want.keys()
    for k in want:  # the same function, the same operations: bit for bit
        g, w = (v if isinstance(v, tuple) else (v,) for v in (got[k], want[k]))
        assert all(torch.equal(p, q) for p, q in zip(g, w)), k
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 3, H, dtype=torch.bfloat16)
        assert not fusable(fake)  # memory.py's predictions run the eager path


def test_a_failing_compiler_warns_once_and_gives_the_eager_numbers(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler\nsecond line")

    fuse_on_cpu(monkeypatch, compile=broken)
    x, y, a, m = _stream(torch.bfloat16)
    with pytest.warns(UserWarning, match="could not be compiled .RuntimeError: no C.. compiler.; using float32"):
        got = fused_layer_terms(x, y, a, m, parallel=False, **ALL)
    want = layer_terms(x, y, a, m, parallel=False, **ALL)
    assert all(torch.equal(got[k], want[k]) for k in want if not isinstance(want[k], tuple))
    assert not fusable(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_layer_terms(x, y, a, m, parallel=False, **ALL)  # no second warning, no second try


def _compile_count():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow  # compiles a kernel with Inductor's C++ backend (~20-40 s the first time)
@pytest.mark.parametrize("dtype,parallel", [(torch.bfloat16, False), (torch.float16, True)])
def test_compiled_terms_equal_the_eager_path_and_a_float64_loop(monkeypatch, dtype, parallel):
    fuse_on_cpu(monkeypatch, fresh=False)  # a kernel the tests compiled before serves
    assert token_terms.fusable(_stream(dtype)[1])
    compiled_before = None
    for rows in [(2, 7), (3, 5), (1, 9)]:  # other batch sizes and lengths: no new compilation
        x, y, a, m = _stream(dtype, rows, seed=sum(rows))
        with torch.inference_mode():
            got = _as_numpy(fused_layer_terms(x, y, a, m, parallel=parallel, check=False, **ALL))
        assert token_terms._broken is None, token_terms._broken
        eager = _as_numpy(layer_terms(x, y, a, m, parallel=parallel, check=True, **ALL))
        assert set(got) == set(eager)  # compiled, every term is formed (the caller reads its selection)
        exact = _float64_loop(x, y, a, m, parallel)
        _assert_within(got, exact, 2 * H * U, "compiled vs float64", exact)
        _assert_within(got, eager, 4 * H * U, "compiled vs eager", exact)
        assert got["y_sum"].shape == rows
        if compiled_before is None:
            compiled_before = _compile_count()
        assert _compile_count() == compiled_before, rows


@pytest.mark.slow  # compiles (shared with the test above when the disk cache is warm)
@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_analyze_of_a_bf16_model_with_the_fused_kernel_equals_the_eager_path(monkeypatch, tiny_dir, tmp_path, arch):
    loaded = load_model(str(tiny_dir(arch)), device="cpu", dtype="bfloat16")
    npy = tmp_path / "ids.npy"
    np.save(npy, torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(4)).numpy())

    def run():
        return layerprobe.analyze(loaded, data=str(npy), samples=5, batch_size=2, grad=False, progress=False)

    eager = run()
    fuse_on_cpu(monkeypatch)
    fused = run()
    assert token_terms._compiled is not None and token_terms._broken is None
    tol = 4 * H * U
    for table in ("layers", "sublayers"):
        want, got = getattr(eager, table), getattr(fused, table)
        assert list(want.columns) == list(got.columns)
        for col in want.columns:
            if want[col].dtype.kind == "f":
                w, g = want[col].to_numpy(), got[col].to_numpy()
                assert np.array_equal(np.isnan(w), np.isnan(g)), (table, col)
                assert np.allclose(g, w, rtol=tol, atol=tol, equal_nan=True), (table, col, np.nanmax(np.abs(g - w)))
            else:
                assert list(want[col]) == list(got[col]), (table, col)
    assert fused.sublayers["relative_update"].notna().any()  # the sublayer rows were measured, not dropped
