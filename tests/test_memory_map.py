"""Memory per GPU of a device map, on the CPU: a model dispatched by accelerate over fake GPUs
(memory.dispatch_fake: GPU k is the fake device cpu:k+1) and tracked per device (memory.track_devices)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from layerprobe import analysis
from layerprobe.anatomy import find_anatomy
from layerprobe.memory import StorageTracker, device_label, dispatch_fake, fake_gpu, fake_mode, track_devices

from tiny_models import tiny_config

pytest.importorskip("accelerate")

B, H = 3, 16
F32 = 4


def two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(H, H), nn.Linear(H, H))


def test_fake_gpu_labels():
    assert [device_label(fake_gpu(k)) for k in range(3)] == ["GPU 0", "GPU 1", "GPU 2"]
    assert device_label("cpu") == "host"


def test_forward_bytes_per_device_equal_a_hand_count():
    """Linear 0 on GPU 0, linear 1 on GPU 1, input and output on the host. By hand (accelerate's hooks):
    GPU 0 holds the input's copy and linear 0's output; GPU 1 the copy of that and linear 1's output;
    the host the output copied back (io_same_device). Each [B, H] float32."""
    with fake_mode():
        model = dispatch_fake(two_linears(), {"0": 0, "1": 1})
        x = torch.zeros(B, H)
        with torch.no_grad():
            pred = track_devices(lambda: model(x), model, [x])
    one = B * H * F32
    assert pred.tracked == {"GPU 0": 2 * one, "GPU 1": 2 * one, "host": one}
    assert pred.weights == {"GPU 0": (H * H + H) * F32, "GPU 1": (H * H + H) * F32}
    assert pred.cuda("GPU 0") > pred.weights["GPU 0"] + 2 * one


def test_gradients_land_on_their_layers_devices():
    """After a backward, what is still alive on each GPU is its own layer's gradients (weight + bias) and
    nothing else: the backward's copy between the GPUs and its temporaries are freed, and each gradient
    is counted on the GPU of its weight."""
    with fake_mode():
        model = dispatch_fake(two_linears(), {"0": 0, "1": 1})
        x = torch.zeros(B, H)
        tracker = StorageTracker(fake_scalars=True)
        tracker.register_module(model)
        tracker.register([x])
        with tracker:
            model(x).sum().backward()
        live = dict(tracker.live)
        devices = {str(p.grad.device) for p in model.parameters()}
    assert devices == {fake_gpu(0), fake_gpu(1)}
    grads = (H * H + H) * F32
    assert live[fake_gpu(0)] == grads and live[fake_gpu(1)] == grads
    assert live.get("cpu", 0) == 0


@pytest.mark.slow  # ~25 s under FakeTensorMode on a loaded 2-core machine
def test_device_map_of_a_tiny_llama_runs_analyze_and_counts_weights_per_gpu():
    """analyze's own pass (with gradients, checkpointed; --no-grad --tokens all) on a Llama whose layers sit on two
    fake GPUs: every op would refuse operands on two devices, so this is the check that the hooks compare
    a layer's input and output on one device (the input arrives from the previous GPU). The weights per
    GPU are the plan's modules' bytes (parameters and buffers)."""
    from transformers import LlamaForCausalLM

    plan = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
            "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    with fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = LlamaForCausalLM(tiny_config("llama")).eval()
        by_module = {name: sum(t.numel() * t.element_size() for t in [*net.get_submodule(name).parameters(),
                                                                       *net.get_submodule(name).buffers()])
                     for name in plan}
        model = dispatch_fake(net, plan)
        blocks = torch.zeros(4, 12, dtype=torch.long)
        opening = type("O", (), {"model": model, "anatomy": find_anatomy(model), "blocks": blocks})()
        for grad, tokens in ((True, "last"), (False, "all")):
            pred = track_devices(lambda: analysis._measure(opening, batch_size=2, tokens=tokens, grad=grad,
                                                           progress=False, checkpoint_layers=True),
                                 model, [blocks])
            assert pred.tracked["GPU 0"] > 0 and pred.tracked["GPU 1"] > 0
    want = {"GPU 0": by_module["model.embed_tokens"] + by_module["model.layers.0"],
            "GPU 1": sum(by_module[m] for m in plan) - by_module["model.embed_tokens"] - by_module["model.layers.0"]}
    assert pred.weights == want


def test_maps_that_offload_are_refused():
    with fake_mode():
        with pytest.raises(ValueError, match="GPUs only"):
            dispatch_fake(two_linears(), {"0": 0, "1": "cpu"})
