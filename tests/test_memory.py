"""Memory: the storage tracker (layerprobe/memory.py) against plain counts and real allocations, the
prediction on a fake model against the same run on the real one, the fit check, and analyze's
memory-saving paths (checkpointing, chunked head + CE, chunked Gram and lens) against plain loops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import layerprobe
from layerprobe import analysis
from layerprobe.errors import LayerprobeError
from layerprobe.loading import load_model
from layerprobe.memory import StorageTracker, weight_bytes

from tiny_models import make_tiny, random_ids

ROOT = Path(__file__).resolve().parents[1]


def test_tracker_counts_new_storages_once_and_frees_them():
    w = torch.zeros(1000)  # exists before: never counted
    tracker = StorageTracker()
    tracker.register([w])
    with tracker:
        a = torch.ones(250)  # 1000 bytes
        v = a[10:20].view(2, 5)  # a view of a: nothing new
        b = w + 1  # 4000 bytes
        c = torch.ones(10, dtype=torch.float64)  # 80 bytes
        del b  # freed: live 1080, peak stays 5080
        d = torch.ones(100)  # 400 bytes
    assert tracker.peak["cpu"] == 1000 + 4000 + 80
    assert tracker.live["cpu"] == 1000 + 80 + 400
    del a, v, c, d
    assert tracker.live["cpu"] == 0
    assert weight_bytes(torch.nn.Linear(4, 3)) == {"cpu": (12 + 3) * 4}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    loaded = load_model(str(make_tiny("llama", root / "llama")), device="cpu", dtype="float32")
    npy = root / "ids.npy"
    np.save(npy, random_ids(6, 24, seed=3).numpy())
    return loaded, npy


def test_prediction_on_a_fake_copy_equals_tracking_the_real_run(llama):
    """predict_memory builds the model again from its config under FakeTensorMode; the bytes it tracks
    must be those of the same calls on the real weights."""
    loaded, _ = llama
    real = loaded.model
    blocks = random_ids(4, 24, seed=5)
    opening = type("O", (), {"model": real, "anatomy": layerprobe.anatomy.find_anatomy(real), "blocks": blocks})()
    for grad in (True, False):
        tracker = StorageTracker()
        tracker.register_module(real)
        tracker.register([blocks])
        with tracker:
            analysis._measure(opening, batch_size=2, tokens="all", grad=grad, progress=False, checkpoint_layers=True)
        real.zero_grad(set_to_none=True)
        predicted = analysis.predict_memory(real, batch_size=2, seq_len=24, tokens="all", grad=grad)
        assert predicted.weights == sum(weight_bytes(real).values())
        assert predicted.tracked == pytest.approx(max(tracker.peak.values()), rel=0.02), grad


@pytest.mark.slow
@pytest.mark.parametrize("which", ["grad", "nograd"])
def test_tracker_against_real_allocations(which):
    """Tracked peak vs the peak resident set of a real fp32 run (~65 MB model, bench/bench_memory.py),
    with malloc returning freed tensors to the system: within 15%."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--validate-one", which,
                          "--validate-size", "small"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["measured_mib"] > 50
    assert abs(r["tracked_mib"] / r["measured_mib"] - 1) <= 0.15, r


@pytest.mark.slow
def test_fit_check_names_a_batch_that_fits(llama, monkeypatch):
    loaded, npy = llama
    extra = {b: analysis.CUDA_FACTOR * analysis.predict_memory(loaded.model, batch_size=b, seq_len=24).tracked
             for b in (1, 2, 3)}
    assert extra[1] < extra[2] < extra[3]
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: int((extra[2] + extra[3]) / 2))
    with pytest.raises(LayerprobeError) as e:
        layerprobe.analyze(loaded, data=str(npy), batch_size=6, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "--batch-size 2" in msg and "batch-size 6 x 24 tokens" in msg, msg
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: int(extra[1] / 2))
    with pytest.raises(LayerprobeError, match="even --batch-size 1 does not fit: use --no-grad"):
        layerprobe.analyze(loaded, data=str(npy), batch_size=6, progress=False)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: 1 << 40)
    assert layerprobe.analyze(loaded, data=str(npy), batch_size=6, progress=False).layers["grad_norm"].notna().all()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_chunked_and_checkpointed_analyze_equals_plain_loops(arch, tmp_path, monkeypatch):
    """Every column with the head + CE, the Gram matrix and the lens cut into small chunks and each
    layer checkpointed, against plain loops over the whole model (no hooks, full logits)."""
    import layerprobe.capture as capture
    import layerprobe.metrics.angular as angular
    import layerprobe.metrics.loss as loss
    from test_analyze_metrics import reference_grads, reference_metrics
    from test_lens_metrics import reference

    loaded = load_model(str(make_tiny(arch, tmp_path / arch)), device="cpu", dtype="float32")
    with torch.no_grad():  # lens distributions that differ (as in test_lens_metrics)
        layerprobe.anatomy.find_anatomy(loaded.model).final_norm.weight.mul_(30.0)
    ids = random_ids(6, 24, seed=4)
    npy = tmp_path / "ids.npy"
    np.save(npy, ids.numpy())
    monkeypatch.setattr(loss, "CE_CHUNK_ELEMENTS", 256 * 7)  # 7 rows per head chunk (vocabulary 256)
    monkeypatch.setattr(angular, "GRAM_CHUNK_ELEMENTS", 4 * 32 * 5)  # 5 tokens per Gram chunk
    monkeypatch.setattr(capture, "LENS_CHUNK_ELEMENTS", 256 * 3 * 3)  # 3 tokens per lens chunk
    measure = analysis._measure  # on a GPU by default; on the CPU only when asked
    monkeypatch.setattr(analysis, "_measure", lambda *a, **k: measure(*a, **k, checkpoint_layers=True))
    calls = []
    real_checkpoint = analysis.checkpoint
    monkeypatch.setattr(analysis, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    result = layerprobe.analyze(loaded, data=str(npy), batch_size=4, tokens="all", progress=False)
    assert len(calls) == 2 * 3  # every layer of both batches ran checkpointed
    assert all(p.requires_grad for p in loaded.model.parameters())  # flags restored

    tol = dict(rtol=1e-6, atol=1e-7)
    want = reference(loaded, ids, "all")
    assert max(want["lens_kl"]) > 1e-3  # the lens distributions differ: the comparison tests something
    for col, values in want.items():
        np.testing.assert_allclose(result.layers[col], values, err_msg=f"{arch} {col}", **tol)
    ang, bi, out_var, upd_var = reference_metrics(loaded, ids, tokens="all")
    got = result.angular.set_index(["layer", "n"])["angular_distance"]
    for (l, n), value in got.items():
        assert value == pytest.approx(ang[l, l + n], rel=1e-6, abs=1e-7), (arch, l, n)
    np.testing.assert_allclose(result.layers["block_influence"], bi, **tol)
    np.testing.assert_allclose(result.layers["output_variance"], out_var, rtol=1e-6)
    np.testing.assert_allclose(result.layers["update_variance"], upd_var, rtol=1e-6)
    plain_loss, grad_layer, grad_child = reference_grads(loaded, ids)
    assert result.summary["loss"] == pytest.approx(plain_loss, rel=1e-6)
    np.testing.assert_allclose(result.layers["grad_norm"], grad_layer, rtol=1e-6)
    for l, children in enumerate(grad_child):
        rows = result.sublayers[result.sublayers["layer"] == l].set_index("module")["grad_norm"]
        for child, norm in children.items():
            assert rows[child] == pytest.approx(norm, rel=1e-6), (arch, l, child)


def test_chunked_loss_sum_against_a_plain_loop():
    from layerprobe.metrics import chunked_loss_sum
    from layerprobe.metrics.loss import IGNORE

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[:, -1] = IGNORE
    total = chunked_loss_sum(head, hidden, targets, vocab=11, chunk_elements=11 * 4)  # 4 rows per chunk
    want = 0.0
    for b in range(3):
        for t in range(4):
            z = head(hidden[b, t]).detach().double()
            want += float(torch.logsumexp(z, 0) - z[targets[b, t]])
    assert float(total.detach()) == pytest.approx(want, rel=1e-6)
    total.backward()  # through the checkpointed chunks: the gradient of the plain sum
    grad = hidden.grad.clone()
    hidden.grad = None
    plain = sum(torch.nn.functional.cross_entropy(head(hidden[b, :4]), targets[b, :4], reduction="sum") for b in range(3))
    plain.backward()
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-6, atol=1e-7)


def test_default_micro_batch_holds_at_most_the_token_budget():
    from layerprobe.training.settings import MICRO_BATCH_TOKENS, default_micro_batch

    assert MICRO_BATCH_TOKENS == 32768
    assert default_micro_batch(512, 256) == 128  # the 71m/130m recipes: 4 accumulation steps
    assert default_micro_batch(64, 256) == 64  # fits whole
    assert default_micro_batch(6, 10000) == 3  # the largest divisor within the budget
    assert default_micro_batch(7, 10000) == 1
    assert default_micro_batch(4, 100000) == 1  # one sequence over the budget still runs
