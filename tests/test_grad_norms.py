"""Gradient norms (`metrics.grad_norms_by_group`, the monitor's that train-reference logs) against a plain loop over the
parameters in float64, and the host copies they make: one per device, not one per parameter."""

from __future__ import annotations

import math

import pytest
import torch

from layerprobe.metrics import grad_norms_by_group
from layerprobe.reference.presets import reference_config
from layerprobe.monitor import LayerMonitor
from layerprobe.training.model import init_model


def plain_norm(params) -> float:
    total, seen = 0.0, False
    for p in params:
        if p.grad is not None:
            total += float((p.grad.double() ** 2).sum())
            seen = True
    return math.sqrt(total) if seen else float("nan")


class HostCopies:
    """Counts .cpu() and .item() (a device tensor's value read on the host)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("cpu", "item"):
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norms_equal_a_plain_loop(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in ((7, 5), (5,), (3, 3, 3), (11,), (2,))]
    for p in params[:-1]:  # the last has no gradient
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
    groups = {"all": params, "first": params[:2], "overlap": params[1:4], "none": params[-1:], "empty": []}
    copies = HostCopies(monkeypatch)
    norms = grad_norms_by_group(groups)
    assert copies.count == 1  # one device (the CPU): one host copy for every group
    for name, ps in groups.items():
        expect = plain_norm(ps)
        if math.isnan(expect):
            assert math.isnan(norms[name]), name
        else:
            assert norms[name] == pytest.approx(expect, rel=1e-12), name


def test_training_gradient_norms_equal_a_plain_loop(monkeypatch):
    model = init_model(reference_config("micro", "pre", vocab_size=64), seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    monitor = LayerMonitor(model)
    copies = HostCopies(monkeypatch)
    monitor.after_backward(record=True)
    assert copies.count == 1  # every parameter's squared norm in one host copy
    total = monitor.grad_norm()
    layers = monitor.after_step()["layer_grad_norm"]
    assert total == pytest.approx(plain_norm(model.parameters()), rel=1e-12)
    assert len(layers) == len(model.model.layers)
    for got, layer in zip(layers, model.model.layers):
        assert got == pytest.approx(plain_norm(layer.parameters()), rel=1e-12)
    assert math.fsum(x * x for x in layers) < total ** 2  # embeddings and head are in the total only


def test_large_gradients_are_summed_in_float64_chunk_by_chunk():
    """A gradient several CPU chunks long (`squares.CHUNK`), with entries spread over 6 orders of magnitude:
    the float64 chunked sum equals a float64 sum over every entry; a float32 accumulation would not."""
    from layerprobe.metrics.squares import CHUNK

    g = torch.Generator().manual_seed(2)
    n = 3 * CHUNK + 17
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)
    exact = math.sqrt(math.fsum(x * x for x in p.grad.double().tolist()))
    assert grad_norms_by_group({"p": [p]})["p"] == pytest.approx(exact, rel=1e-13)


def test_weight_update_sums_in_float32_pieces_are_within_1e_6():
    """`squared_sums(float64=False)` (weight-update sizes off the CPU): float32 norms of ≤ CHUNK-entry pieces,
    squares added in float64, against a float64 sum over every entry of a tensor as large as a 71m-preset embedding."""
    from layerprobe.metrics.squares import squared_sums

    t = torch.randn(32000 * 512, generator=torch.Generator().manual_seed(3))
    exact = float((t.double() ** 2).sum())
    got = squared_sums([t, t[:100]], float64=False).tolist()
    assert got[0] == pytest.approx(exact, rel=1e-6) and got[0] != exact
    assert got[1] == pytest.approx(float((t[:100].double() ** 2).sum()), rel=1e-6)


def test_change_and_size_sums_in_one_pass_equal_float64_loops():
    """`change_and_size_sums` (the monitor's ‖Δθ‖² and ‖θ‖²): one pass over pieces of both tensors, against
    float64 loops over every entry; tensors several CHUNKs long (a partial last piece), one of a single piece,
    an empty one; `before` is left unchanged."""
    from layerprobe.metrics.squares import CHUNK, change_and_size_sums

    g = torch.Generator().manual_seed(4)
    before = [torch.randn(3 * CHUNK + 17, generator=g) * torch.logspace(-2, 1, 3 * CHUNK + 17),
              torch.randn(40, 25, generator=g), torch.zeros(0)]
    after = [b + 1e-3 * torch.randn(b.shape, generator=g) for b in before]
    kept = [b.clone() for b in before]
    change, size = change_and_size_sums(before, after)
    for i, (b, a) in enumerate(zip(kept, after)):
        pairs = zip(b.double().flatten().tolist(), a.double().flatten().tolist())
        exact_change = math.fsum((x - y) ** 2 for x, y in pairs)
        exact_size = math.fsum(x * x for x in b.double().flatten().tolist())
        assert float(change[i]) == pytest.approx(exact_change, rel=1e-6, abs=0)
        assert float(size[i]) == pytest.approx(exact_size, rel=1e-6, abs=0)
    assert all(torch.equal(b, k) for b, k in zip(before, kept))
