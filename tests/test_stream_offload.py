"""`--tokens all` without a backward keeps the layers' streams in host memory on a GPU and forms the angular
map and the logit lens from them in token chunks (capture.py: `_store_unit`, `end_batch`, STREAM_HOST,
STREAM_CHUNK_BYTES). On the CPU the host path is forced (STREAM_HOST = "cpu") with a chunk budget of a few
tokens, so the chunks cut across samples; it must give what the streams kept whole give, and what plain
loops over the model's own hidden states give, per sample. Under FakeTensorMode a model on the fake device
"meta" stands for one on a GPU: its streams go to the host on their own, and the device holds one chunk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import layerprobe
from layerprobe import capture as capture_module
from layerprobe.anatomy import find_anatomy
from layerprobe.capture import LayerCapture
from layerprobe.loading import load_model
from layerprobe.memory import StorageTracker, fake_mode

SAMPLES, SEQ, BATCH = 5, 24, 2  # batches of 2, 2, 1
TOKEN_CHUNKS = LayerCapture._token_chunks


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt"])
def tiny(request, tiny_dir, tmp_path_factory):
    arch = request.param
    loaded = load_model(str(tiny_dir(arch)), device="cpu", dtype="float32")
    # A larger final-norm gain: lens distributions that differ (KL ~0.1-1 nats), so the lens sums test something.
    with torch.no_grad():
        find_anatomy(loaded.model).final_norm.weight.mul_(30.0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(5))
    npy = tmp_path_factory.mktemp(f"{arch}-ids") / "ids.npy"
    np.save(npy, ids.numpy())
    return arch, loaded, ids, str(npy)


def run(loaded, npy, monkeypatch, *, host=None, chunk_tokens=None):
    """analyze --tokens all --no-grad; with `host`, the streams wait there, `chunk_tokens` at a time in end_batch.
    Returns the result and the (start, stop) chunks each batch's end_batch took."""
    chunks = []

    def spy(self, n):
        out = TOKEN_CHUNKS(self, n)
        chunks.append(out)
        return out

    monkeypatch.setattr(LayerCapture, "_token_chunks", spy)
    monkeypatch.setattr(capture_module, "STREAM_HOST", host)
    if chunk_tokens is not None:
        anatomy = find_anatomy(loaded.model)
        row = (anatomy.num_layers + 1) * loaded.model.config.hidden_size * 4  # float32, every depth
        monkeypatch.setattr(capture_module, "STREAM_CHUNK_BYTES", chunk_tokens * row)
    result = layerprobe.analyze(loaded, data=npy, batch_size=BATCH, tokens="all", grad=False, progress=False)
    return result, chunks


def test_host_streams_in_chunks_equal_the_streams_kept_whole(tiny, monkeypatch):
    arch, loaded, ids, npy = tiny
    whole, whole_chunks = run(loaded, npy, monkeypatch)
    chunked, chunks = run(loaded, npy, monkeypatch, host="cpu", chunk_tokens=7)
    # Kept on their device, one chunk per batch; on the host, chunks of 7 tokens cutting across the samples of 24.
    assert whole_chunks == [[(0, 48)], [(0, 48)], [(0, 24)]]
    assert chunks[0] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35), (35, 42), (42, 48)]
    assert [c[-1][1] for c in chunks] == [48, 48, 24]
    cols = [c for c in whole.layers.columns if c != "layer"]
    assert {"angular_distance", "lens_kl", "lens_top1", "block_influence"} <= set(cols)
    for col in cols:
        if whole.layers[col].dtype.kind == "f":
            np.testing.assert_allclose(chunked.layers[col], whole.layers[col], rtol=1e-6, atol=1e-12,
                                       err_msg=f"{arch} {col}")
        else:  # the norm placement and such
            assert chunked.layers[col].tolist() == whole.layers[col].tolist(), (arch, col)
    np.testing.assert_allclose(chunked.angular["angular_distance"], whole.angular["angular_distance"],
                               rtol=1e-6, atol=1e-12)
    assert set(chunked.per_sample) == set(whole.per_sample) >= {"angular", "lens_kl", "lens_top1"}
    for name, value in whole.per_sample.items():
        np.testing.assert_allclose(chunked.per_sample[name], value, rtol=1e-6, atol=1e-12, err_msg=f"{arch} {name}")
    for col in ("angular_distance", "lens_kl"):  # the intervals, formed from the per-sample sums
        np.testing.assert_allclose(chunked.layers[f"{col}_lo"], whole.layers[f"{col}_lo"], rtol=1e-6, atol=1e-12)


def plain_streams(loaded, ids):
    """x^0..x^L per sample (float64 [B, T, H] each) and the model's own logits: hidden states of the model's
    forward and a pre-hook on the final norm (x^L, before it)."""
    anatomy = find_anatomy(loaded.model)
    seen = {}
    handle = anatomy.final_norm.register_forward_pre_hook(lambda m, args: seen.update(last=args[0]))
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    handle.remove()
    L = anatomy.num_layers
    return [out.hidden_states[i].double() for i in range(L)] + [seen["last"].double()], out.logits.double()


def plain_readout(loaded, h):
    """Final norm and head from their weights, float64, one vector."""
    anatomy = find_anatomy(loaded.model)
    norm, head = anatomy.final_norm, anatomy.head
    if isinstance(norm, torch.nn.LayerNorm):
        mu = float(h.mean())
        z = (h - mu) / math.sqrt(float(((h - mu) ** 2).mean()) + norm.eps) * norm.weight.double() + norm.bias.double()
    else:  # RMSNorm
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        z = h / math.sqrt(float((h * h).mean()) + eps) * norm.weight.double()
    logits = head.weight.double() @ z
    return logits if getattr(head, "bias", None) is None else logits + head.bias.double()


@torch.no_grad()
def plain_sample_sums(loaded, ids):
    """Per sample: Σ over tokens of arccos(cos(x^i, x^j)) / π, [S, L+1, L+1]; of KL(p_final ‖ p_layer) and of
    top-1 agreement, [S, L]; loops over samples, tokens and layers."""
    xs, logits = plain_streams(loaded, ids)
    L = len(xs) - 1
    ang = np.zeros((SAMPLES, L + 1, L + 1))
    kl = np.zeros((SAMPLES, L))
    top1 = np.zeros((SAMPLES, L))
    for b in range(SAMPLES):
        for t in range(SEQ):
            for i in range(L + 1):
                for j in range(L + 1):
                    u, v = xs[i][b, t], xs[j][b, t]
                    norms = float(u.norm() * v.norm())  # a zero vector (Llama's padding row) has cosine 0
                    c = float(torch.dot(u, v)) / norms if norms else 0.0
                    ang[b, i, j] += math.acos(max(-1.0, min(1.0, c))) / math.pi
            log_final = torch.log_softmax(logits[b, t], 0)
            for layer in range(L):
                log_layer = torch.log_softmax(plain_readout(loaded, xs[layer + 1][b, t]), 0)
                kl[b, layer] += float((log_final.exp() * (log_final - log_layer)).sum())
                top1[b, layer] += int(log_layer.argmax()) == int(log_final.argmax())
    return ang, kl, top1


def test_chunked_per_sample_sums_match_plain_loops(tiny, monkeypatch):
    """What samples.npz holds for the angular map and the lens, per sample, from a loop over tokens."""
    arch, loaded, ids, npy = tiny
    result, chunks = run(loaded, npy, monkeypatch, host="cpu", chunk_tokens=5)
    assert len(chunks[0]) == 10
    ang, kl, top1 = plain_sample_sums(loaded, ids)
    got = result.per_sample
    np.testing.assert_allclose(got["angular"], ang, atol=1e-5 * SEQ)
    np.testing.assert_allclose(got["lens_kl"], kl, rtol=1e-4, atol=1e-5 * SEQ)
    np.testing.assert_allclose(got["lens_top1"], top1)
    np.testing.assert_allclose(got["angular_tokens"], [SEQ] * SAMPLES)
    assert kl[:, :-1].min() > 1e-3  # the lens distributions differ (but the last layer's): the test tests something


def test_where_the_streams_wait(tmp_path, tiny_dir):
    """On the CPU (and Apple's unified memory) the streams stay; on an accelerator they go to the host when
    the batch's streams exceed one chunk; with gradients the layer inputs stay views; one token: stays."""
    loaded = load_model(str(tiny_dir("llama")), device="cpu", dtype="float32")
    anatomy = find_anatomy(loaded.model)
    cap = LayerCapture(anatomy, tokens="all", stream_chunk_bytes=4 * 32 * 4 * 10)  # 10 tokens of 4 depths
    small, big = torch.zeros(10, 32), torch.zeros(11, 32)
    assert cap._stream_home(big) is None
    assert cap._stream_home(small.to("meta")) is None
    assert cap._stream_home(big.to("meta")) == torch.device("cpu")
    assert LayerCapture(anatomy, tokens="last", stream_host="cpu")._stream_home(big) is None
    assert LayerCapture(anatomy, tokens="all", stream_host="cpu")._stream_home(small) == torch.device("cpu")
    h = torch.zeros(2, 5, 32, requires_grad=True) * 1.0
    cap._store_unit(1, h)
    assert cap._units[1]._base is h or cap._units[1].untyped_storage()._cdata == h.untyped_storage()._cdata


def test_a_faked_accelerator_holds_one_chunk_of_the_streams(tiny_dir):
    """Under FakeTensorMode a model on "meta" (a stand-in for a GPU, as nothing else can be faked on a CPU-only
    torch): with --tokens all and no backward the streams are tracked on the host, and the device's peak over
    --tokens last grows by a fraction of what they hold; kept on the device (STREAM_HOST = "meta"), by most of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerprobe import analysis

    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2)
    B, T = 4, 32  # the streams (L+1) x B x T x H outweigh what one layer's forward makes
    streams = (config.num_hidden_layers + 1) * B * T * config.hidden_size * 4

    def peaks(tokens, host=None):
        with fake_mode():
            with torch.device("meta"):
                model = LlamaForCausalLM(config).eval()
            anatomy = find_anatomy(model)
            blocks = torch.zeros(B, T, dtype=torch.long)
            opening = type("Opening", (), {"model": model, "anatomy": anatomy, "blocks": blocks})()
            tracker = StorageTracker(fake_scalars=True)
            tracker.register_module(model)
            tracker.register([blocks])
            saved = (capture_module.STREAM_HOST, capture_module.STREAM_CHUNK_BYTES)
            capture_module.STREAM_HOST, capture_module.STREAM_CHUNK_BYTES = host, streams // 8
            try:
                with tracker:
                    analysis._measure(opening, batch_size=B, tokens=tokens, grad=False, progress=False,
                                      checkpoint_layers=True)
            finally:
                capture_module.STREAM_HOST, capture_module.STREAM_CHUNK_BYTES = saved
            return dict(tracker.peak)

    last, offloaded, kept = peaks("last"), peaks("all"), peaks("all", host="meta")
    assert offloaded["cpu"] >= streams > last.get("cpu", 0)  # every depth's stream of every token, on the host
    # On the device: one chunk (streams / 8) and one layer's copy in flight (streams / 5) at most, against the
    # L of L+1 streams that the last layer's forward sees held when they stay there.
    assert offloaded["meta"] - last["meta"] < streams / 4
    assert kept["meta"] - last["meta"] > streams / 2
