"""The zoo check of one architecture: analyze, analyze without gradients, a layer sweep and
save-pruned + reload, each against an independent computation written here.

- `check(model_type, tmp) -> dict`: {"build": reason or None, "analyze"/"no_grad"/"sweep"/"save":
  ("right" | "refused" | "wrong" | "crash", detail)}
- `SCHEME`: the norm scheme the references read off a layer by tensor identity

The references use only the model's own forward and its own layer list (`model.<layers_path>`):
- angular distance: forward pre-hooks on every layer (its input) and a hook on the last layer
  (its output), arccos of cosines in float64 with plain loops;
- loss: next-token cross-entropy of the model's own logits, summed in a loop;
- logit lens of the last layer: must equal the model's own final distribution (KL 0);
- a removed layer: a forward hook that returns the layer's input in place of its output;
- save: the reloaded folder's logits against the hooked removal in the original model.
"""

from __future__ import annotations

import math
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layerprobe.errors import LayerprobeError

from zoo_models import VOCAB, build

SAMPLES, SEQ = 2, 12
RTOL = 1e-4
REMOVE = (1,)


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, VOCAB, (SAMPLES, SEQ), generator=g)


def _get(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _stream(args, kwargs):
    return args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]


def _out(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _removal_hooks(layers, removed):
    """Layer i returns its input unchanged: the model computes as if it were not there."""
    def hook(module, args, kwargs, output):
        x = _stream(args, kwargs)
        if isinstance(output, torch.Tensor):
            return x
        return (x,) + tuple(output[1:])
    return [layers[i].register_forward_hook(hook, with_kwargs=True) for i in removed]


def reference(model, layers, ids, removed=()):
    """(loss, logits [B,T,V], stream x^0..x^L [B,T,H] float64, per-layer norm placement) of the model."""
    xs = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: xs.__setitem__(i, _stream(a, k).detach().double()), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, o: xs.__setitem__(len(layers), _out(o).detach().double())))
    handles += _removal_hooks(layers, removed)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits.double()
    # Next-token loss from the model's own logits (its `labels=` loss is the same for decoder LMs;
    # TrOCR's and Whisper's decoders do not shift the labels, so it is formed here).
    loss = 0.0
    for b in range(ids.shape[0]):
        loss += float(F.cross_entropy(logits[b, :-1], ids[b, 1:], reduction="sum"))
    return loss / (ids.shape[0] * (ids.shape[1] - 1)), logits, [xs[i] for i in range(len(layers) + 1)]


def _seen(s, key, module, args, kwargs, output):
    inp = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    s[key].append((inp, output if isinstance(output, torch.Tensor) else output[0]))


def placement(layers, model, ids):
    """Per layer, from tensor identity: pre (a norm reads the tensor the layer received), post (the
    layer returns a norm's output), sandwich (pre, and a norm reads an attention/MLP output and feeds
    no attention/MLP: its output goes back to the stream), post-sublayer (only the latter)."""
    seen = [dict(inp=None, out=None, norms=[], subs=[]) for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        s = seen[i]
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, s=s: s.__setitem__("inp", _stream(a, k)), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, s=s: s.__setitem__("out", _out(o))))
        for name, child in layer.named_children():
            if not any(True for _ in child.parameters()):
                continue
            low = name.lower() + " " + type(child).__name__.lower()
            key = ("norms" if "norm" in low or name.startswith("ln")
                   else "subs" if any(k in low for k in ("attn", "attention", "mlp", "moe", "feed_forward"))
                   else None)
            if key:
                handles.append(child.register_forward_hook(partial(_seen, s, key), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for s in seen:
        pre = any(i is s["inp"] for i, _ in s["norms"])
        post = any(o is s["out"] for _, o in s["norms"])
        after = any(any(i is so for _, so in s["subs"]) and not any(o is si for si, _ in s["subs"])
                    for i, o in s["norms"])
        out.append("post" if post else "sandwich" if pre and after else "pre" if pre
                   else "post-sublayer" if after else "?")
    return out


def _angular(a, b):
    """Mean over samples of arccos(cos(a_b, b_b)) / π at the last position, plain loop."""
    total = 0.0
    for s in range(a.shape[0]):
        u, v = a[s, -1], b[s, -1]
        c = float(torch.dot(u, v) / (u.norm() * v.norm()))
        total += math.acos(max(-1.0, min(1.0, c))) / math.pi
    return total / a.shape[0]


def _close(a, b, rtol=RTOL, atol=1e-6):
    return abs(a - b) <= atol + rtol * abs(b)


def _check_analyze(model, layers, ids, npy, grad):
    import layerprobe

    res = layerprobe.analyze(model, data=str(npy), seq_len=SEQ, samples=SAMPLES, batch_size=SAMPLES, grad=grad,
                             progress=False)
    loss, logits, xs = reference(model, layers, ids)
    problems, notes = [], []
    if not _close(res.summary["loss"], loss):
        problems.append(f"loss {res.summary['loss']:.6g} vs {loss:.6g} from the model's own logits")
    for i in range(len(layers)):
        want = _angular(xs[i], xs[i + 1])
        got = float(res.layers["angular_distance"][i])
        if not _close(got, want, 1e-3, 1e-5):
            problems.append(f"angular distance of layer {i}: {got:.6g} vs {want:.6g}")
            break
    lens_kl = float(res.layers["lens_kl"].iloc[-1])
    if math.isnan(lens_kl) and res.layers["lens_kl"].isna().all():
        notes.append("no logit lens")  # neither final path gives the model's logits: NaN, not a wrong lens
    elif not (abs(lens_kl) < 1e-4):
        problems.append(f"logit lens of the last layer is not the model's output (KL {lens_kl:.3g})")
    want_scheme = _summary_scheme(placement(layers, model, ids))
    got_scheme = res.summary["measured_norm_scheme"]
    if got_scheme != want_scheme and got_scheme != "unknown":  # unknown: not measured, and said so
        problems.append(f"measured norm scheme {res.summary['measured_norm_scheme']!r}, the layers show {want_scheme!r}")
    if grad:
        gn = res.layers["grad_norm"].to_numpy()
        if not np.isfinite(gn).all():
            problems.append("a gradient norm is not finite")
    return problems, ", ".join(notes) or None


def _summary_scheme(per_layer):
    if not per_layer or "?" in per_layer:
        return "unknown"
    if len(set(per_layer)) == 1:
        return per_layer[0]
    k = 0
    while k < len(per_layer) and per_layer[k] == "post":
        k += 1
    return "mix" if k and all(p == "pre" for p in per_layer[k:]) else "mixed"


def _check_sweep(model, layers, ids, npy):
    import layerprobe

    res = layerprobe.prune_sweep(model, mode="layer", data=str(npy), seq_len=SEQ, samples=SAMPLES,
                                 batch_size=SAMPLES, progress=False)
    problems = []
    full_loss, full_logits, _ = reference(model, layers, ids)
    rows = res.rows("layer")
    if list(rows["first_layer"]) != list(range(len(layers))):
        return [f"layer rows {list(rows['first_layer'])}"]
    for i, row in zip(range(len(layers)), rows.itertuples()):
        loss, logits, _ = reference(model, layers, ids, removed=(i,))
        lf, lp = full_logits[:, :-1], logits[:, :-1]
        kl = float(F.kl_div(F.log_softmax(lp, -1), F.log_softmax(lf, -1), log_target=True, reduction="sum"))
        kl /= lf.shape[0] * lf.shape[1]
        if not _close(row.loss, loss):
            problems.append(f"loss without layer {i}: {row.loss:.6g} vs {loss:.6g}")
        if not _close(row.kl, kl, 1e-3, 1e-6):
            problems.append(f"KL without layer {i}: {row.kl:.6g} vs {kl:.6g}")
    return problems


def _check_save(model, layers, layers_path, ids, out):
    import json

    from transformers import AutoModelForCausalLM

    import layerprobe

    folder = layerprobe.save_pruned(model, REMOVE, out)
    info = json.loads((Path(folder) / "layerprobe_pruned.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    problems = []
    n = len(_get(reloaded, layers_path))
    if n != len(layers) - len(REMOVE):
        problems.append(f"reloaded model has {n} layers")
    _, want, _ = reference(model, layers, ids, removed=REMOVE)
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits.double()
    err = float((got - want).abs().max() / want.abs().max())
    if not err <= 1e-4:
        problems.append(f"reloaded logits differ from the removal by {err:.2e}")
    return problems, info.get("config_changes", {})


def _run(fn):
    try:
        problems = fn()
    except LayerprobeError as e:
        msg = str(e)
        return ("refused", msg) if "\n" not in msg else ("crash", "multi-line error: " + msg)
    except Exception as e:
        return "crash", "".join(traceback.format_exception_only(type(e), e)).strip()[:300]
    extra = None
    if isinstance(problems, tuple):
        problems, extra = problems
    return ("wrong", "; ".join(problems)) if problems else ("right", extra)


def check(model_type: str, tmp: Path) -> dict:
    """The zoo row of one architecture."""
    from layerprobe.anatomy import find_anatomy

    model, why = build(model_type)
    if model is None:
        return {"build": why}
    ids = _ids()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        anatomy = find_anatomy(model)
    except LayerprobeError as e:
        return {"build": None, **{k: ("refused", str(e)) for k in ("analyze", "no_grad", "sweep", "save")}}
    except Exception as e:
        return {"build": f"its own forward fails at these sizes ({type(e).__name__}: {str(e).splitlines()[0][:120]})"}
    layers, path = anatomy.layers, anatomy.layers_path
    tmp.mkdir(parents=True, exist_ok=True)
    npy = tmp / "ids.npy"
    np.save(npy, ids.numpy())
    row = {"build": None, "layers_path": path}
    row["analyze"] = _run(lambda: _check_analyze(model, layers, ids, npy, grad=True))
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    row["no_grad"] = _run(lambda: _check_analyze(model, layers, ids, npy, grad=False))
    row["sweep"] = _run(lambda: _check_sweep(model, layers, ids, npy))
    row["save"] = _run(lambda: _check_save(model, layers, path, ids, tmp / "pruned"))
    return row
