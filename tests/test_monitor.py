"""layerprobe.monitor: per-layer statistics inside someone else's training loop.

Each number is checked against an independent computation: the probe against `analyze` on the same
model and batch, the gradient norms and weight updates against plain loops over `p.grad` and copies of
the weights. The monitor must not change training: losses and weights with and without it are identical.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from layerprobe.errors import LayerprobeError
from layerprobe.monitor import LayerMonitor
from tiny_models import VOCAB, random_ids


def _model(tiny_dir, arch="llama", **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir(arch, **overrides)), dtype=torch.float32)
    model.train()
    return model


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, rel=1e-6):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    assert np.allclose(a, b, rtol=rel, atol=1e-9, equal_nan=True), (a, b)


# ---- the probe equals analyze ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tokens", ["last", "all"])
def test_probe_statistics_equal_analyze(tiny_dir, tmp_path, arch, tokens):
    from layerprobe import analyze

    model = _model(tiny_dir, arch)
    probe = random_ids(3, 12, seed=5)
    np.save(tmp_path / "probe.npy", probe.numpy())
    monitor = LayerMonitor(model, out=tmp_path / "run", probe=probe, probe_every=1, tokens=tokens)
    model(input_ids=probe, labels=probe).loss.backward()
    monitor.after_backward()
    row = monitor.after_step()
    monitor.close()
    assert model.training  # the probe put the model back in training mode

    model.eval()  # analyze measures a model as handed over; the probe's forward is in eval mode (no dropout)
    result = analyze(model, data=str(tmp_path / "probe.npy"), samples=None, batch_size=3, tokens=tokens,
                     grad=False, progress=False)
    layers = result.layers
    names = {"angular_distance": "layer_angular_distance", "block_influence": "layer_block_influence",
             "output_variance": "layer_output_var", "lens_kl": "layer_lens_kl", "lens_top1": "layer_lens_top1",
             "relative_update": "layer_relative_update", "update_cosine": "layer_update_cosine",
             "max_activation": "layer_max_activation", "mean_abs_activation": "layer_mean_abs_activation",
             "update_variance": "layer_update_variance"}
    for column, key in names.items():
        _close(row[key], layers[column].to_numpy())
    _close(row["probe_loss"], result.summary["loss"])
    # The l x n map: every (layer, n) entry of angular.csv.
    matrix = row["angular_matrix"]
    for layer, n, distance in result.angular[["layer", "n", "angular_distance"]].itertuples(index=False):
        _close(matrix[layer][layer + n], distance)
    assert _rows(tmp_path / "run") == [json.loads(json.dumps(row))]


def test_probe_over_several_batches_equals_analyze_over_them(tiny_dir, tmp_path):
    """`probe_statistics` over several batches (a tensor split by batch_size, or a list of tensors) equals
    analyze over the same samples in the same batches; a metrics selection gives only its columns."""
    from layerprobe import analyze
    from layerprobe.anatomy import find_anatomy
    from layerprobe.monitor.probe import probe_statistics

    model = _model(tiny_dir)
    model.eval()
    ids = random_ids(5, 12, seed=6)
    np.save(tmp_path / "ids.npy", ids.numpy())
    result = analyze(model, data=str(tmp_path / "ids.npy"), samples=None, batch_size=2, grad=False, progress=False)
    anatomy = find_anatomy(model)
    for batches in (ids, [ids[:2], ids[2:4], ids[4:]]):
        stats = probe_statistics(anatomy, batches, batch_size=2 if isinstance(batches, torch.Tensor) else None)
        for column, values in stats["columns"].items():
            _close(values, result.layers[column].to_numpy())
        _close(stats["loss"], result.summary["loss"])
    only = probe_statistics(anatomy, ids, batch_size=2, metrics={"variance"})
    assert set(only["columns"]) == {"output_variance", "update_variance"} and "angular" not in only
    _close(only["columns"]["output_variance"], result.layers["output_variance"].to_numpy())


# ---- gradient norms and weight updates equal plain loops ---------------------------------------------

def _plain_norm(params) -> float:
    sq = [float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None]
    return math.sqrt(sum(sq)) if sq else float("nan")


def _kind(name: str) -> str:
    child = name.split(".")[0]
    return {"self_attn": "attention", "mlp": "mlp", "input_layernorm": "norm",
            "post_attention_layernorm": "norm"}[child]


@pytest.mark.parametrize("accum", [1, 3])
def test_gradient_norms_and_updates_equal_plain_loops(tiny_dir, tmp_path, accum):
    model = _model(tiny_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = LayerMonitor(model, out=tmp_path / "run", every=2)
    max_norm = 0.5
    for step in range(4):
        for m in range(accum):
            ids = random_ids(2, 10, seed=100 + step * accum + m)
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        layers = model.model.layers
        expected = {"grad_norm": _plain_norm(model.parameters()),
                    "layer_grad_norm": [_plain_norm(layer.parameters()) for layer in layers]}
        for kind in ("attention", "mlp", "norm"):
            expected[f"layer_grad_norm_{kind}"] = [
                _plain_norm([p for n, p in layer.named_parameters() if _kind(n) == kind]) for layer in layers]
        before = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
        monitor.after_backward(max_norm=max_norm)
        total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        opt.step()
        row = monitor.after_step()
        opt.zero_grad()
        if (step + 1) % 2:
            assert row is None  # every=2: odd steps record nothing
            continue
        for key, value in expected.items():
            _close(row[key], value)  # squares in float32 there, float64 here
        _close(row["grad_norm"], total, rel=1e-6)  # torch's own total before clipping
        _close(row["clip_coef"], min(1.0, max_norm / (total + 1e-6)))
        assert row["clip_coef"] < 1.0  # this loss clips at 0.5: the factor is the one applied
        updates = []
        for old, layer in zip(before, layers):
            change = sum(float((p.detach().double() - o.double()).pow(2).sum()) for o, p in zip(old, layer.parameters()))
            size = sum(float(o.double().pow(2).sum()) for o in old)
            updates.append(math.sqrt(change / size))
        _close(row["layer_weight_update"], updates, rel=1e-6)
    monitor.close()
    assert [r["step"] for r in _rows(tmp_path / "run")] == [2, 4]


# ---- the monitor does not change training -------------------------------------------------------------

def _train(tiny_dir, folder, monitored: bool, steps: int = 20):
    model = _model(tiny_dir, attention_dropout=0.2)  # dropout draws random numbers: the probe must not shift them
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = LayerMonitor(model, out=folder, every=1, probe=random_ids(2, 12, seed=9), probe_every=3) \
        if monitored else None
    losses = []
    for step in range(steps):
        ids = random_ids(4, 12, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if monitor:
            monitor.after_backward(max_norm=1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if monitor:
            monitor.after_step(loss=loss)
        opt.zero_grad()
        losses.append(loss.item())
    if monitor:
        monitor.close()
    return losses, [p.detach().clone() for p in model.parameters()]


def test_the_monitor_does_not_change_training(tiny_dir, tmp_path):
    plain_losses, plain_weights = _train(tiny_dir, None, monitored=False)
    losses, weights = _train(tiny_dir, tmp_path / "run", monitored=True)
    assert losses == plain_losses  # bit-identical, 20 steps
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["step"] for r in rows if "probe_loss" in r] == [3, 6, 9, 12, 15, 18]
    assert [r["loss"] for r in rows] == losses


# ---- compare reads the log ----------------------------------------------------------------------------

def test_compare_reads_a_monitored_run(tiny_dir, tmp_path):
    from layerprobe.comparison import training_dynamics
    from layerprobe.model_results import load_results

    _train(tiny_dir, tmp_path / "run", monitored=True, steps=6)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # a row cut short by a kill: the complete ones stay readable
    res = load_results(tmp_path / "run")
    assert res.num_layers == 3 and res.norm_scheme == "pre"
    tl = res.training_layers
    assert sorted(set(tl["step"])) == list(range(1, 7))
    probe = tl[tl["step"] == 3].sort_values("layer")
    row = [r for r in _rows_complete(tmp_path / "run") if r["step"] == 3][0]
    _close(probe["output_variance"], row["layer_output_var"])
    _close(probe["block_influence"], row["layer_block_influence"])
    _close(probe["grad_norm"], row["layer_grad_norm"])
    dyn = training_dynamics(res)
    assert set(dyn["step"]) == set(range(1, 7)) and dyn["variance_growth"].notna().sum() == 2


def _rows_complete(folder):
    out = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ---- bad input: one clear message each ----------------------------------------------------------------

def test_bad_input_is_refused_with_one_clear_message(tiny_dir, tmp_path):
    model = _model(tiny_dir)

    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    with pytest.raises(LayerprobeError, match=r"could not find this model's list of layers: searched model\.layers, .*transformer\.h.* "
                       r"then every nn.ModuleList at all \(found: none\); pass layers_path="):
        LayerMonitor(NoLayers())
    with pytest.raises(LayerprobeError, match=r"layers_path='model.nope' does not name a list of layers in this model \(its module lists: model.layers\)"):
        LayerMonitor(model, layers_path="model.nope")
    with pytest.raises(LayerprobeError, match=rf"outside this model's vocabulary of {VOCAB}"):
        LayerMonitor(model, probe=torch.tensor([[5, VOCAB]]))
    with pytest.raises(LayerprobeError, match=r"outside this model's vocabulary"):
        LayerMonitor(model, probe=torch.tensor([[-1, 5]]))
    with pytest.raises(LayerprobeError, match=r"\[batch, tokens\] tensor .* got shape \[8\]"):
        LayerMonitor(model, probe=torch.arange(8))
    with pytest.raises(LayerprobeError, match="integer token ids, not float32"):
        LayerMonitor(model, probe=torch.ones(2, 4))
    with pytest.raises(LayerprobeError, match="beyond this model's context of 128"):
        LayerMonitor(model, probe=torch.ones(1, 200, dtype=torch.long))
    with pytest.raises(LayerprobeError, match="probe_every was given without a probe"):
        LayerMonitor(model, probe_every=5)
    with pytest.raises(LayerprobeError, match="every must be an integer >= 1"):
        LayerMonitor(model, every=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LayerprobeError, match="cannot write to output folder .*it is a file; choose another out="):
        LayerMonitor(model, out=tmp_path / "file")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(LayerprobeError, match="tensorboard=True needs the tensorboard package"):
            LayerMonitor(model, out=tmp_path / "tb", tensorboard=True)
        assert not (tmp_path / "tb").exists()  # refused before the folder was made
    else:
        with pytest.raises(LayerprobeError, match="tensorboard=True writes under the run folder: give out="):
            LayerMonitor(model, tensorboard=True)

    monitor = LayerMonitor(model)
    with pytest.raises(LayerprobeError, match=r"after_step\(\) was called for step 1 before after_backward\(\)"):
        monitor.after_step()
    monitor.after_backward()
    with pytest.raises(LayerprobeError, match=r"after_backward\(\) was called twice for step 1"):
        monitor.after_backward()
    monitor.after_step()
    assert monitor.step == 1


# ---- Hugging Face Trainer ------------------------------------------------------------------------------

def _hf_train(tiny_dir, out, callback):
    from transformers import Trainer, TrainingArguments

    model = _model(tiny_dir)
    data = [{"input_ids": ids, "labels": ids} for ids in random_ids(40, 12, seed=3)]
    args = TrainingArguments(output_dir=str(out), max_steps=10, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=0.5, logging_steps=5,
                             report_to="none", use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else None)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    return logs, [p.detach().clone() for p in model.parameters()], args


def test_trainer_callback_writes_the_expected_rows_and_changes_nothing(tiny_dir, tmp_path):
    from layerprobe.model_results import load_results
    from layerprobe.monitor import LayerMonitorCallback

    plain_logs, plain_weights, _ = _hf_train(tiny_dir, tmp_path / "plain", None)
    callback = LayerMonitorCallback(every=1, probe=random_ids(2, 12, seed=4), probe_every=5)
    logs, weights, args = _hf_train(tiny_dir, tmp_path / "run", callback)
    assert args.max_grad_norm == 0.5  # handed back after training
    assert logs == plain_logs  # the Trainer's own losses and (unclipped) grad norms, unchanged
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))
    rows = _rows(tmp_path / "run")
    measured = [r for r in rows if "layer_grad_norm" in r]
    assert [r["step"] for r in measured] == list(range(1, 11))
    assert [r["step"] for r in rows if "probe_loss" in r] == [5, 10]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10]
    by_step = {r["step"]: r for r in measured}
    assert all("layer_grad_norm" in r or set(r) == {"step", "loss"} for r in rows)
    for log in logs:  # the Trainer's grad_norm is the unclipped total of its last step
        _close(by_step[log["step"]]["grad_norm"], log["grad_norm"])
        _close(by_step[log["step"]]["lr"], log["learning_rate"])
        assert by_step[log["step"]]["clip_coef"] == pytest.approx(min(1.0, 0.5 / (log["grad_norm"] + 1e-6)))
    assert all(len(r["layer_grad_norm_attention"]) == 3 and len(r["layer_weight_update"]) == 3 for r in measured)
    assert set(load_results(tmp_path / "run").training_layers["step"]) == set(range(1, 11))


def _lightning_train(tiny_dir, out, callback):
    lightning = pytest.importorskip("lightning", reason="lightning is an optional extra, not installed here")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model(tiny_dir)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    module = Module()
    data = torch.utils.data.DataLoader(random_ids(40, 12, seed=3), batch_size=2)
    trainer = lightning.Trainer(max_steps=10, accumulate_grad_batches=2, gradient_clip_val=0.5, accelerator="cpu",
                                devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=str(out),
                                callbacks=[callback] if callback else None)
    torch.manual_seed(0)
    trainer.fit(module, data)
    return [p.detach().clone() for p in module.parameters()]


def test_lightning_callback_writes_the_expected_rows_and_changes_nothing(tiny_dir, tmp_path):
    plain = _lightning_train(tiny_dir, tmp_path / "plain", None)
    from layerprobe.monitor.lightning import LayerMonitorLightning

    callback = LayerMonitorLightning(tmp_path / "run", probe=random_ids(2, 12, seed=4), probe_every=5)
    weights = _lightning_train(tiny_dir, tmp_path / "x", callback)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain))
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["step"] for r in rows if "probe_loss" in r] == [5, 10]
    assert all(len(r["layer_grad_norm"]) == 3 and "loss" in r and r["clip_coef"] <= 1.0 for r in rows)


def test_the_probe_restores_each_modules_mode_and_leaves_grads_alone(tiny_dir):
    model = _model(tiny_dir)
    model.model.layers[1].eval()  # a user's frozen block stays in eval mode
    ids = random_ids(2, 8, seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    monitor = LayerMonitor(model, probe=ids, probe_every=1)
    monitor.after_backward()
    # A layer that draws random numbers even in eval mode (noisy routing, say): the probe must not shift them.
    model.model.layers[0].register_forward_pre_hook(lambda module, args: [torch.rand(5)] and None)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    monitor.after_step()
    assert torch.equal(torch.rand(3), expected_draw)  # the random state is where it was
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training


def test_scalars_for_tensorboard_and_wandb():
    from layerprobe.monitor.writers import scalars

    row = {"step": 3, "grad_norm": 1.5, "clip_coef": float("nan"), "layer_grad_norm": [0.1, float("inf"), 0.3] * 4,
           "angular_matrix": [[0.0]]}
    out = scalars(row)
    assert out == {"grad_norm": 1.5, **{f"layer_grad_norm/{i:02d}": v for i, v in enumerate([0.1, None, 0.3] * 4)
                                        if v is not None}}


@pytest.mark.parametrize("how", ["autocast", "bf16 weights"])
def test_bf16_training(tiny_dir, tmp_path, how):
    model = _model(tiny_dir)
    if how == "bf16 weights":
        model = model.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = LayerMonitor(model, out=tmp_path / "run", probe=random_ids(2, 8, seed=2), probe_every=1)
    for step in range(2):
        ids = random_ids(2, 8, seed=step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        expected = [_plain_norm(layer.parameters()) for layer in model.model.layers]
        before = [[p.detach().double().clone() for p in layer.parameters()] for layer in model.model.layers]
        monitor.after_backward()
        opt.step()
        row = monitor.after_step(loss=loss)
        opt.zero_grad()
        _close(row["layer_grad_norm"], expected, rel=1e-5)
        updates = [math.sqrt(sum(float((p.detach().double() - o).pow(2).sum()) for o, p in zip(old, layer.parameters()))
                             / sum(float(o.pow(2).sum()) for o in old))
                   for old, layer in zip(before, model.model.layers)]
        _close(row["layer_weight_update"], updates, rel=1e-2)  # bf16 differences, float32 norms
        assert all(math.isfinite(v) for v in row["layer_output_var"] + row["layer_lens_kl"])
