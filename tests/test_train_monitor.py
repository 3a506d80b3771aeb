"""`train-reference` on `LayerMonitor`: its metrics.jsonl against a plain training loop written here.

The expected numbers are not committed values: the plain loop below re-runs the recipe train-reference ran before
it moved onto the monitor (main's loop: accumulate, measure the norm before clipping, clip, AdamW, evaluate every
k steps), with its own gradient norms, clip factor and weight updates (loops over `p.grad` and the weights in
float64), and its own held-out pass (main's evaluate: the same loss sum, and the layers' outputs kept and
reduced in float64), since the trainer's held-out statistics moved onto the monitor's capture too. Committed
values would break on any change to the model's loss arithmetic, which is not what this test is about. The
data, the initial weights and the learning-rate schedule are the trainer's own: they did not move.

Losses, learning rates, token counts and the held-out loss must be bit-identical; the gradient norms and
clip factor equal the float64 loop to 1e-12 (the same float64 squares, summed in another order); weight updates
and the held-out output and token variances to 1e-6 (float32 norms per tensor; the capture's float32
per-token sums).
"""

from __future__ import annotations

import math

import pytest
import torch

from fixtures_reference import read_metrics
from layerprobe.training.data import BlockBatches
from layerprobe.training.distributed import DistEnv
from layerprobe.metrics import next_token_loss_sum, predicted_tokens
from layerprobe.training.model import init_model
from layerprobe.training.schedule import lr_at
from layerprobe.training.settings import TrainSettings, model_config, resolve_plan
from layerprobe.training.trainer import _token_data, train_reference

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"self_attn": "attention", "mlp": "mlp", "attn_norm": "norm", "mlp_norm": "norm"}


def _squares(params) -> float:
    return math.fsum(math.fsum(x * x for x in p.grad.double().flatten().tolist()) for p in params if p.grad is not None)


def _plain_eval(model, blocks: torch.Tensor, micro_batch_size: int) -> dict:
    """main's held-out pass: the loss sum over micro-batches in eval mode; each layer's outputs kept, their
    population variance over every element and their mean per-token variance over hidden units in float64."""
    layers = model.model.layers
    outputs = {i: [] for i in range(len(layers))}

    def keep(index):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            outputs[index].append(h.double().reshape(-1, h.shape[-1]))  # one row per token
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    model.eval()
    loss_sum, n_pred = torch.zeros(1, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for i in range(0, len(blocks), micro_batch_size):
                ids = blocks[i:i + micro_batch_size]
                logits = model(input_ids=ids, use_cache=False).logits
                loss_sum += next_token_loss_sum(logits, ids).double()
                n_pred += predicted_tokens(ids)
    finally:
        for h in handles:
            h.remove()
        model.train()
    rows = [torch.cat(outputs[i]) for i in range(len(layers))]
    return {"eval_loss": (loss_sum / n_pred).item(),
            "layer_output_var": [r.var(unbiased=False).item() for r in rows],
            "layer_token_var": [r.var(dim=-1, unbiased=False).mean().item() for r in rows]}


def _plain_run(settings: TrainSettings, scheme: str) -> list[dict]:
    """main's train-reference step by step, with plain loops for what the monitor now measures."""
    env = DistEnv()
    plan = resolve_plan(settings, env)
    data = _token_data(plan, env, None)
    model = init_model(model_config(plan, scheme, data.embedding_rows, data.tokenizer), settings.seed)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": plan.settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.999), eps=1e-8)
    batches = BlockBatches(data.train, plan.batch_size, plan.data_seed)
    layers = model.model.layers
    clip = plan.settings.grad_clip
    records = []
    for step in range(plan.steps):
        lr = lr_at(step, plan)
        for group in opt.param_groups:
            group["lr"] = lr
        rows = batches.batch(step)
        loss_acc = torch.zeros((), dtype=torch.float64)
        for m in range(plan.accum):
            ids = rows[m * plan.micro_batch_size:(m + 1) * plan.micro_batch_size]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / plan.accum).backward()
            loss_acc += loss.detach().double()
        logged = (step + 1) % plan.eval_every == 0 or step + 1 == plan.steps
        total = math.sqrt(_squares(model.parameters()))
        record = {"step": step + 1, "loss": (loss_acc / plan.accum).item(), "lr": lr, "grad_norm": total,
                  "tokens": (step + 1) * plan.batch_size * plan.seq_len}
        if logged:  # before clipping
            record["layer_grad_norm"] = [math.sqrt(_squares(layer.parameters())) for layer in layers]
            for kind in ("attention", "mlp", "norm"):
                record[f"layer_grad_norm_{kind}"] = [
                    math.sqrt(math.fsum(_squares(child.parameters()) for name, child in layer.named_children()
                                        if KINDS.get(name) == kind)) for layer in layers]
            record["clip_coef"] = min(1.0, clip / (total + 1e-6))
        coef = clip / (total + 1e-6)
        if coef < 1.0:
            for p in model.parameters():
                p.grad.mul_(coef)
        before = [[p.detach().double().clone() for p in layer.parameters()] for layer in layers]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if logged:
            record["layer_weight_update"] = [
                math.sqrt(math.fsum(((p.detach().double() - b) ** 2).sum().item() for p, b in zip(layer.parameters(), bs)))
                / math.sqrt(math.fsum((b ** 2).sum().item() for b in bs)) for layer, bs in zip(layers, before)]
            record.update(_plain_eval(model, data.eval, plan.micro_batch_size))
        records.append(record)
    return records


SETTINGS = dict(preset="micro", device="cpu", progress=False, norm="mix", steps=4, batch_size=4,
                micro_batch_size=2, eval_every=2, eval_samples=8, grad_clip=0.1)
EXACT = ("loss", "lr", "tokens", "eval_loss")
HELD_OUT = ("layer_output_var", "layer_token_var")
FLOAT64 = ("grad_norm", "clip_coef", "layer_grad_norm", "layer_grad_norm_attention", "layer_grad_norm_mlp",
           "layer_grad_norm_norm")


def test_train_reference_metrics_equal_a_plain_training_loop(tmp_path):
    settings = TrainSettings(**SETTINGS, out=str(tmp_path))
    summary = train_reference(settings)
    assert summary.runs[0].status == "completed"
    got = read_metrics(tmp_path / "mix")
    expected = _plain_run(settings, "mix")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 5))
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4]
    for g, e in zip(got, expected):
        for key in EXACT:
            assert (key in g) == (key in e), (g["step"], key)
            if key in e:
                assert g[key] == e[key], (g["step"], key)
        for key in FLOAT64:
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=1e-12, abs=0), (g["step"], key)
        for key in HELD_OUT:
            assert (key in g) == (key in e), (g["step"], key)
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=1e-6, abs=0), (g["step"], key)
        if "layer_weight_update" in e:
            assert g["layer_weight_update"] == pytest.approx(e["layer_weight_update"], rel=1e-6), g["step"]
        assert g["grad_norm"] > 0.1  # every step was clipped: the clip is part of what is compared
