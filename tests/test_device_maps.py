"""Device maps (accelerate): a model split across devices or offloaded to cpu/disk measures exactly what the
same model measures on one device; what cannot be measured (gradients of offloaded layers) and bad placement
options are refused in one line before any weight is read.

On this CPU-only machine the split is cpu + disk: accelerate keeps disk-offloaded weights as `meta` tensors
between calls and reads them in on every forward, the case that broke the readout (logit lens, prune-sweep's
tail) and the gradients.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

import layerprobe.loading as loading
from cli_helpers import assert_one_line_error, run_cli
from layerprobe.analysis import analyze
from layerprobe.defaults import parse_max_memory
from layerprobe.errors import LayerprobeError
from layerprobe.loading import load_model, offloaded_modules
from layerprobe.pruning import prune_sweep, save_pruned

TOL = 1e-5

# Layers 2-3, the final norm and the head on disk (what --device-map auto does to a 70B on one H200).
TAIL_ON_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk",
                "lm_head": "disk"}
# The embedding and the first layer on disk: the input ids' device comes from the hook, not a meta weight.
HEAD_ON_DISK = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
                "lm_head": "cpu"}
# Only the final norm and the head offloaded: every layer's gradient still lands.
ONLY_HEAD_ON_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu",
                     "model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def model4(tiny_dir):
    return tiny_dir("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(3, 256, size=(6, 12)))
    return str(path)


def _numbers(frame: pd.DataFrame) -> np.ndarray:
    return frame.select_dtypes("number").to_numpy(dtype=float)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    x, y = _numbers(a), _numbers(b)
    assert x.shape == y.shape
    both_nan = np.isnan(x) & np.isnan(y)
    assert not (np.isnan(x) ^ np.isnan(y)).any()
    assert np.abs(np.where(both_nan, 0.0, x - y)).max() <= TOL


def _assert_same_analysis(a, b) -> None:
    for name in ("layers", "angular", "sublayers"):
        _assert_same(getattr(a, name), getattr(b, name))
    assert abs(a.summary["loss"] - b.summary["loss"]) <= TOL


def test_the_maps_really_offload(model4):
    """The test maps leave weights on `meta` with accelerate hooks, so the tests below exercise offloading."""
    lm = load_model(str(model4), device="cpu", device_map=TAIL_ON_DISK, load_tokenizer=False)
    devices = {n: p.device.type for n, p in lm.model.named_parameters()}
    assert devices["lm_head.weight"] == "meta" and devices["model.layers.3.mlp.up_proj.weight"] == "meta"
    assert devices["model.layers.0.mlp.up_proj.weight"] == "cpu"
    assert offloaded_modules(lm.model.hf_device_map) == ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]
    assert lm.device == torch.device("cpu")
    # With a GPU in the map, "cpu" entries are offloaded too (accelerate's rule), "disk" always.
    assert offloaded_modules({"a": 0, "b": "cpu", "c": "disk"}) == ["b", "c"]
    assert offloaded_modules({"a": "cpu", "b": "cpu"}) == []


@pytest.mark.parametrize("device_map", [TAIL_ON_DISK, HEAD_ON_DISK], ids=["tail-on-disk", "head-on-disk"])
@pytest.mark.parametrize("tokens", ["last", "all"])
def test_analyze_no_grad_offloaded_equals_one_device(model4, ids_file, device_map, tokens):
    kw = dict(data=ids_file, batch_size=4, device="cpu", grad=False, tokens=tokens, progress=False)
    whole = analyze(str(model4), **kw)
    split = analyze(str(model4), device_map=device_map, **kw)
    _assert_same_analysis(whole, split)
    assert np.isfinite(split.layers["lens_kl"]).all()  # the lens ran through the offloaded head
    assert split.manifest["device_map"] == device_map
    assert split.manifest["offloaded"] == offloaded_modules(device_map) and whole.manifest["offloaded"] is None


def test_analyze_grad_with_offloaded_head_equals_one_device(model4, ids_file):
    kw = dict(data=ids_file, batch_size=4, grad=True, progress=False)
    whole = analyze(str(model4), device="cpu", **kw)
    lm = load_model(str(model4), device="cpu", device_map=ONLY_HEAD_ON_DISK, load_tokenizer=False)
    # An inference pass first leaves accelerate's offloaded placeholders as inference tensors.
    analyze(lm, data=ids_file, grad=False, progress=False)
    split = analyze(lm, **kw)
    _assert_same_analysis(whole, split)
    assert np.isfinite(split.layers["grad_norm"]).all() and (split.layers["grad_norm"] > 0).all()


def test_grad_on_offloaded_layers_refused_before_loading(model4, ids_file, monkeypatch):
    monkeypatch.setattr(loading, "_load_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(LayerprobeError) as e:
        analyze(str(model4), data=ids_file, device="cpu", device_map=TAIL_ON_DISK, progress=False)
    text = str(e.value)
    assert "\n" not in text and "model.layers.2" in text and "--no-grad" in text and "--device cuda" in text


def test_grad_on_offloaded_layers_refused_for_a_loaded_model(model4, ids_file):
    """A model the caller loaded with a map: refused before anything runs, never NaN gradient norms."""
    lm = load_model(str(model4), device="cpu", device_map=TAIL_ON_DISK, load_tokenizer=False)
    with pytest.raises(LayerprobeError, match="--no-grad"):
        analyze(lm, data=ids_file, progress=False)


def test_cli_max_memory_offloads_and_refuses_gradients(model4, ids_file, tmp_path, monkeypatch):
    # 150 kB of "cpu" holds the embedding and layers 0-1 (planned with room for the largest layer); the rest goes to disk.
    plan = dict(device_map="sequential", max_memory={"cpu": 150_000})
    lm = load_model(str(model4), device="cpu", load_tokenizer=False, **plan)
    assert offloaded_modules(lm.model.hf_device_map)[:2] == ["model.layers.2", "model.layers.3"]
    options = ["--device", "cpu", "--device-map", "sequential", "--max-memory", "cpu=150kB", "--data", ids_file,
               "--batch-size", "4", "-q"]
    result, text = run_cli("analyze", model4, *options, "--out", tmp_path / "refused")
    assert_one_line_error(result, text, "--no-grad", "--device cuda")
    assert not (tmp_path / "refused").exists()
    result, text = run_cli("analyze", model4, *options, "--no-grad", "--out", tmp_path / "split")
    assert result.exit_code == 0, text
    result, text = run_cli("analyze", model4, *options[:2], *options[6:], "--no-grad", "--out", tmp_path / "whole")
    assert result.exit_code == 0, text
    for name in ("layers.csv", "angular.csv", "sublayers.csv"):
        _assert_same(pd.read_csv(tmp_path / "whole" / name), pd.read_csv(tmp_path / "split" / name))


def test_prune_sweep_every_mode_offloaded_equals_one_device(model4, ids_file):
    kw = dict(data=ids_file, batch_size=4, device="cpu", mode="all", steps=2, remove=[1, 2], progress=False)
    whole = prune_sweep(str(model4), **kw)
    split = prune_sweep(str(model4), device_map=TAIL_ON_DISK, **kw)
    assert set(whole.table["mode"]) >= {"layer", "block", "greedy", "remove"}
    assert list(whole.table["removed"]) == list(split.table["removed"])
    _assert_same(whole.table, split.table)


def test_save_pruned_of_an_offloaded_model_proves_the_reload_on_disk(model4, tmp_path, monkeypatch):
    calls = []
    real = loading.load_model

    def spy(spec, **kwargs):
        calls.append(kwargs)
        return real(spec, **kwargs)

    import layerprobe.pruning.save as save

    monkeypatch.setattr(save, "load_model", spy)
    lm = load_model(str(model4), device="cpu", device_map=TAIL_ON_DISK, load_tokenizer=False)
    out = save_pruned(lm, [1], tmp_path / "pruned")
    # The proof's reload: weights left on disk, computed on the CPU, not a second copy where the original is;
    # where this accelerate cannot run the model from disk (seen with transformers 5.17 + accelerate 1.10), an
    # ordinary reload into host memory follows, and the record says which proved it.
    disk = dict(dtype="float32", device="cpu", device_map={"": "disk"}, load_tokenizer=False)
    assert calls[0] == disk and calls[1:] in ([], [dict(disk, device_map=None)])
    info = json.loads((out / "layerprobe_pruned.json").read_text())
    assert ("from disk" in info["check"]["reloaded"]) == (len(calls) == 1)
    reloaded = load_model(str(out), device="cpu", load_tokenizer=False).model
    assert reloaded.config.num_hidden_layers == 3
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    whole = load_model(str(model4), device="cpu", load_tokenizer=False).model
    with torch.inference_mode():
        h = whole.model.embed_tokens(ids)  # the removal by hand: layers 0, 2, 3 of the original
        pos = torch.arange(ids.shape[1])[None]
        emb = whole.model.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        for i in (0, 2, 3):
            h = whole.model.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
        expected = whole.lm_head(whole.model.norm(h))
        got = reloaded(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_single_device_loads_straight_onto_it(model4, monkeypatch):
    """--device cuda (no map): from_pretrained places the weights itself, no host copy then .to()."""
    seen = {}

    def fake_load(resolved, config, load_kwargs, spec, source):
        seen.update(load_kwargs)
        raise LayerprobeError("stop")

    monkeypatch.setattr(loading, "resolve_device", lambda device="auto": torch.device("cuda"))
    monkeypatch.setattr(loading, "_load_weights", fake_load)
    with pytest.raises(LayerprobeError, match="stop"):
        load_model(str(model4), dtype="float32", device="cuda", load_tokenizer=False)
    assert seen["device_map"] == {"": torch.device("cuda")}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_is_passed_through(model4, attn):
    lm = load_model(str(model4), device="cpu", attn_implementation=attn, load_tokenizer=False)
    assert lm.model.config._attn_implementation == attn
    assert lm.model.model.layers[0].self_attn.config._attn_implementation == attn


def test_max_memory_parsed_as_accelerate_reads_it():
    assert parse_max_memory("0=70GiB, 1=1.5GB,cpu=200GiB,disk=1000") == {
        0: 70 << 30, 1: 1_500_000_000, "cpu": 200 << 30, "disk": 1000}
    assert parse_max_memory({0: "1MiB"}) == {0: 1 << 20}


# ---- bad input: one line, before any weight is read ------------------------------------------------------

@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
@pytest.mark.parametrize("options,needle", [
    (["--device-map", "auto", "--max-memory", "7=10GiB,cpu=1GiB"], "names GPU 7, but this machine has"),
    (["--device-map", "auto", "--max-memory", "tpu=10GiB"], "names device 'tpu'"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "not a size"),
    (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
    (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
    (["--device-map", "spread"], "unknown --device-map"),
    (["--attn-implementation", "fast"], "unknown --attn-implementation"),
])
def test_bad_placement_options_fail_before_loading(command, options, needle, tiny_dir, tmp_path, monkeypatch):
    if "7=" in options[-1] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    monkeypatch.setattr(loading, "_load_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    result, text = run_cli(command, tiny_dir("llama"), *options, "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, text, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
def test_device_map_without_accelerate(command, tiny_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    monkeypatch.setattr(loading, "_load_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    result, text = run_cli(command, tiny_dir("llama"), "--device-map", "auto", "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, text, "--device-map needs accelerate", "pip install accelerate")


@pytest.mark.parametrize("arch, attn", [("bloom", "sdpa"), ("llama", "flash_attention_2")])
def test_attn_implementation_the_model_does_not_support(arch, attn, tiny_dir, tmp_path, monkeypatch):
    if attn.startswith("flash") and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    monkeypatch.setattr(loading, "_load_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    result, text = run_cli("analyze", tiny_dir(arch), "--device", "cpu", "--attn-implementation", attn,
                           "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, text, f"--attn-implementation {attn} cannot be used")


@pytest.fixture(scope="module")
def bin_model(tmp_path_factory, model4):
    """The same weights as `model4` in a pytorch_model.bin: disk offload must copy them to a folder."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("bin") / "llama-bin"
    shutil.copytree(model4, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_disk_offload_of_a_bin_checkpoint_needs_an_offload_folder(bin_model, ids_file, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(loading, "_load_weights", lambda *a, **k: pytest.fail("weights were loaded"))
        with pytest.raises(LayerprobeError, match="give --offload-folder DIR") as e:
            load_model(str(bin_model), device="cpu", device_map=TAIL_ON_DISK, load_tokenizer=False)
        assert "\n" not in str(e.value)
    kw = dict(data=ids_file, batch_size=4, device="cpu", grad=False, progress=False)
    split = analyze(str(bin_model), device_map=TAIL_ON_DISK, offload_folder=tmp_path / "offload", **kw)
    assert (tmp_path / "offload" / "lm_head.weight.safetensors").is_file()
    _assert_same_analysis(analyze(str(bin_model), **kw), split)
