"""`analyze`: one hooked pass (+ one backward) over the data, every per-layer metric at once."""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.checkpoint import checkpoint

from .anatomy import Anatomy, find_anatomy
from .capture import LayerCapture, all_tokens_device_bytes
from .errors import LayerprobeError
from .defaults import METRICS, check_measure_options, check_metrics, takes_gradients
from .distributed import DistEnv, all_reduce_gradients, check_processes, current, sample_shares, split_manifest
from .loading import LoadedModel, read_config, resolve_device, resolve_dtype
from .memory import (CUDA_FACTOR, GIB, Prediction, depth_samples, device_free_bytes, extrapolate, fake_copy,
                     fake_mode, fake_model, first_layers, largest_batch, track, weight_bytes)
from .metrics.depth import quarter
from .metrics.gradients import GRAM_HOST_BYTES, BatchGradientGram
from .metrics.intervals import LEVEL, METHOD, RESAMPLES, layer_intervals
from .metrics import (angular_long_table, chunked_loss_sum, lock_in_layer, grad_norms_by_group, next_token_labels,
                      next_token_loss_sum, perplexity, predicted_tokens)
from .opening import Opening, eval_mode, open_model
from .progress import make_progress, status
from .results import AnalysisResult

GRAD_COLUMNS = ("grad_norm", "grad_norm_attention", "grad_norm_mlp", "grad_norm_norm")
# Columns without an interval: a per-sample gradient would take one backward per sample; the extremes
# are a max, not a ratio of per-sample sums; the sublayer rows are not kept per sample.
NO_INTERVAL = GRAD_COLUMNS + ("max_activation", "mean_abs_activation", "sublayers.csv")
SUBLAYER_COLUMNS = ["layer", "module", "kind", "params", "grad_norm", "relative_update", "update_cosine"]


def _layer_grad_norms(anatomy: Anatomy, index: int, grad: bool = True) -> tuple[list[dict], dict]:
    """Layer `index`'s gradient norm per top-level child (rows) and per kind and in total (one row).

    Without `grad` the rows are still there (module, kind, params) with NaN gradient norms.
    """
    groups = anatomy.parameter_groups(index)
    kinds = {name: kind for name, (kind, _) in anatomy.sublayers(index).items()}
    if not grad:
        rows = [{"layer": index, "module": child, "kind": kinds.get(child, "other"),
                 "params": sum(p.numel() for _, p in params), "grad_norm": float("nan")}
                for child, params in groups.items()]
        return rows, {col: float("nan") for col in GRAD_COLUMNS}
    norms = grad_norms_by_group({k: [p for _, p in v] for k, v in groups.items()})
    by_kind: dict[str, list] = {}
    rows = []
    for child, params in groups.items():
        kind = kinds.get(child, "other")
        by_kind.setdefault(kind, []).extend(p for _, p in params)
        rows.append({"layer": index, "module": child, "kind": kind,
                     "params": sum(p.numel() for _, p in params), "grad_norm": norms[child]})
    kind_norms = grad_norms_by_group(by_kind)
    total = grad_norms_by_group({"all": [p for ps in by_kind.values() for p in ps]})["all"]
    row = {"grad_norm": total}
    for kind in ("attention", "mlp", "norm"):
        row[f"grad_norm_{kind}"] = kind_norms.get(kind, float("nan"))
    return rows, row


def _gradient_tables(anatomy: Anatomy, grad: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Per module (top-level child of each layer) and per layer/kind gradient norms."""
    sub_rows, layer_rows = [], []
    for i in range(anatomy.num_layers):
        rows, row = _layer_grad_norms(anatomy, i, grad)
        sub_rows += rows
        layer_rows.append(row)
    return pd.DataFrame(sub_rows, columns=SUBLAYER_COLUMNS[:5]), layer_rows


def _add_sublayer_updates(sublayers: pd.DataFrame, capture: LayerCapture, dtype: torch.dtype) -> pd.DataFrame:
    """relative_update and update_cosine on the rows of the attention and MLP children whose outputs
    are the layer's updates (NaN on other rows, and on layers where they are not: see capture)."""
    updates = capture.sublayer_updates(dtype)
    rel, cos = [], []
    for layer, module in zip(sublayers["layer"], sublayers["module"]):
        attn, mlp = capture.sublayer_names[int(layer)]
        which = "attention" if module == attn else ("mlp" if module == mlp else None)
        r, c = updates.get((int(layer), which), (float("nan"), float("nan")))
        rel.append(r)
        cos.append(c)
    return sublayers.assign(relative_update=rel, update_cosine=cos)


class _Head:
    """The model split at its head: the base model's last hidden state, then the head and loss a chunk
    of rows at a time (metrics/loss.py chunked_loss_sum), so the [B·T, V] logits never exist at once.
    Used only where, on a few tokens, it gives the model's own logits (else `vocab` is None and the
    pass calls the whole model)."""

    def __init__(self, net, anatomy: Anatomy, ids: torch.Tensor, loss: bool = True):
        self.net, self.anatomy, self.vocab, self.base = net, anatomy, None, None
        base = getattr(net, "base_model", None)
        if not isinstance(base, torch.nn.Module) or base is net:
            return
        self.base = base
        if anatomy.head is None or not loss:  # no loss to take: the base model alone runs the layers
            return
        probe = ids[:1, : min(ids.shape[1], 8)]
        seen = []  # the base model's output inside the model's own forward: one probe pass, not two
        handle = base.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            with torch.inference_mode():
                want = net(input_ids=probe, use_cache=False).logits
                got = anatomy.head_logits(seen[0].last_hidden_state)
        except Exception:  # a base model we cannot call this way: the whole model it is
            return
        finally:
            handle.remove()
        if got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3 * float(want.abs().max())):
            self.vocab = want.shape[-1]

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base(input_ids=ids, use_cache=False).last_hidden_state

    def loss_sum(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return next_token_loss_sum(self.net(input_ids=ids, use_cache=False).logits, ids)
        hidden = self.hidden(ids)
        return chunked_loss_sum(self.anatomy.head_logits, hidden, next_token_labels(ids), self.vocab)


@contextmanager
def _checkpointed(layers):
    """Each layer's forward under non-reentrant activation checkpointing: the backward keeps only the
    layers' inputs and runs one layer again at a time. The layer's own hooks stay outside the
    checkpoint; the hooks on its children return at once during the recompute (capture.py)."""
    saved = []
    for layer in layers:
        own = layer.__dict__.get("forward")  # accelerate's hooks replace forward on the instance
        saved.append(own)
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer, own in zip(layers, saved):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _forward_pass(head: _Head, ids: torch.Tensor, grad: bool, n_pred: int, checkpoint_layers: bool = True,
                  loss: bool = True) -> float:
    """One batch through the model: its summed next-token loss; with `grad`, accumulate d(mean loss).
    Without `loss` (nor `grad`): the layers only, for their hooks (NaN; the whole model where it cannot be split)."""
    if not (loss or grad):
        with torch.inference_mode():
            head.hidden(ids) if head.base is not None else head.net(input_ids=ids, use_cache=False)
        return float("nan")
    if grad:
        with torch.enable_grad(), (_checkpointed(head.anatomy.layers) if checkpoint_layers else nullcontext()):
            loss_sum = head.loss_sum(ids)
            # d(mean loss over all analysed tokens): each batch adds its share.
            (loss_sum / n_pred).backward()
    else:
        with torch.inference_mode():
            loss_sum = head.loss_sum(ids)
    return float(loss_sum.detach())


@contextmanager
def _gradients_on_layers(net, anatomy: Anatomy):
    """requires_grad on the layers' parameters only (what the gradient tables read): no embedding or
    head gradients, no backward through the embedding. The flags are restored afterwards."""
    # Weights accelerate offloads are `meta` here and rebuilt on every forward (no gradient lands on them;
    # after an inference pass they refuse requires_grad): left alone. Offloaded layers are refused earlier.
    params = [p for p in net.parameters() if not p.is_meta]
    before = {p: p.requires_grad for p in params}
    for p in params:
        p.requires_grad_(False)
    for p in anatomy.layers.parameters():
        if not p.is_meta:
            p.requires_grad_(True)
    net.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        for p, flag in before.items():
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def _measure(opening: Opening, *, batch_size: int, tokens: str, grad: bool, progress: bool,
             lens_chunk: int | None = None, checkpoint_layers: bool | None = None,
             n_pred: int | None = None, metrics: frozenset | None = None,
             gram: BatchGradientGram | None = None) -> tuple[LayerCapture, float]:
    """The hooked pass over every batch: the filled capture and the mean next-token loss.

    `gram` (with `grad`): also fills the per-batch gradient Gram matrices (`_gradient_gram`).

    `checkpoint_layers` (with `grad`): per-layer activation checkpointing, by default on accelerators,
    where memory is what runs out; on the CPU it would cost one more forward (~+30%) for nothing.
    `n_pred`: the predicted tokens the mean is over (default: `blocks`'; a data-parallel share is given all's).
    """
    net, anatomy, blocks = opening.model, opening.anatomy, opening.blocks
    if checkpoint_layers is None:
        checkpoint_layers = anatomy.input_device.type != "cpu"
    n_pred = n_pred or predicted_tokens(blocks)
    batches = list(torch.split(blocks, batch_size))
    loss_total, seen = 0.0, 0
    loss = metrics is None or bool({"loss", "gradients"} & metrics)
    head = _Head(net, anatomy, blocks[:1].to(anatomy.input_device), loss)
    capture = LayerCapture(anatomy, tokens=tokens, lens_chunk=lens_chunk, metrics=metrics)
    with eval_mode(net), (_gradients_on_layers(net, anatomy) if grad else nullcontext()), capture, \
            (gram if gram is not None else nullcontext()), make_progress(progress) as bar:
        task = bar.add_task("analyzing", total=len(batches), info="")
        for batch in batches:
            ids = batch.to(anatomy.input_device)
            loss_total += _forward_pass(head, ids, grad, n_pred, checkpoint_layers, loss)
            capture.end_batch()
            if gram is not None:
                gram.end_batch()
            seen += predicted_tokens(ids)
            bar.update(task, advance=1, info=f"loss {loss_total / seen:.3f}")
    return capture, loss_total / n_pred


def _measure_share(opening: Opening, env: DistEnv, *, grad: bool, **kwargs) -> tuple[LayerCapture, float]:
    """`_measure` on this process's share of the samples, then every process's sums (and, with `grad`, the
    gradients) combined, so each process holds what one process measuring all the samples would."""
    blocks = opening.blocks
    start, stop = sample_shares(len(blocks), env.world_size)[env.rank]
    opening.blocks = blocks[start:stop]
    try:
        capture, loss = _measure(opening, grad=grad, n_pred=predicted_tokens(blocks), **kwargs)
    finally:
        opening.blocks = blocks
    [loss] = capture.all_reduce(env, start, len(blocks), extra=[loss])  # each share's loss is a part of the mean
    if grad:
        all_reduce_gradients(env, opening.anatomy.layers.parameters())
    return capture, loss


def _gradient_gram(anatomy: Anatomy, batches: int) -> BatchGradientGram | None:
    """The per-batch gradient Gram of the first and last ⌈L/4⌉ layers (what the gradient ratio reads, and
    what compare's interval on it resamples); None when its host copies would exceed GRAM_HOST_BYTES."""
    L = anatomy.num_layers
    q = quarter(L)
    groups = {str(i): list(anatomy.layers[i].parameters()) for i in dict.fromkeys([*range(q), *range(L - q, L)])}
    if L < 2 or BatchGradientGram.host_bytes(groups, batches) > GRAM_HOST_BYTES:
        return None
    return BatchGradientGram(groups, batches)


def predict_memory(net, *, batch_size: int, seq_len: int, tokens: str = "last", grad: bool = True,
                   layers_path: str | None = None, build: bool = True, metrics: frozenset | None = None,
                   by_depth: bool = True) -> Prediction:
    """Peak memory of `analyze` on `net`'s shapes, allocating nothing: `_measure` itself, on two
    batches (gradients are held from one to the next), run on a full-size copy of `net` under
    FakeTensorMode with a storage tracker (memory.py). `build=False`: `net` is already fake.
    `by_depth`: a deep model is tracked on its first 2P and 3P layers and the peak extrapolated to its
    depth (`memory.depth_samples`; Llama-3-70B with gradients: 6 s instead of 94 s on a slow CPU core, within
    2e-6 of tracking every layer: BENCHMARKS.md)."""
    with fake_mode(None if build else net), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FakeTensor's data_ptr warning (norm placement reads identities)
        model = fake_copy(net) if build else net
        anatomy = find_anatomy(model, layers_path=layers_path)
        weights = sum(weight_bytes(model).values())
        run = dict(batch_size=batch_size, seq_len=seq_len, tokens=tokens, grad=grad, metrics=metrics)
        depths = depth_samples(anatomy.layers) if by_depth else None
        if depths is not None:
            parent, _, name = anatomy.layers_path.rpartition(".")
            try:
                tracked = []
                for k in depths:
                    with first_layers(model.get_submodule(parent), name, k):
                        tracked.append(_tracked_measure(model, anatomy.layers_path, **run))
                return Prediction(weights, extrapolate(depths, tuple(tracked), anatomy.num_layers))
            except Exception:  # a forward that needs every layer (indexes them by the config's count): track all
                pass
        return Prediction(weights, _tracked_measure(model, anatomy.layers_path, **run))


def _tracked_measure(model, layers_path: str, *, batch_size: int, seq_len: int, tokens: str, grad: bool,
                     metrics: frozenset | None) -> int:
    """The tracked peak over the weights of `_measure` on the fake `model` (its layer list as it is now)."""
    anatomy = find_anatomy(model, layers_path=layers_path)
    blocks = torch.zeros((2 if grad else 1) * batch_size, seq_len, dtype=torch.long)
    opening = type("FakeOpening", (), {"model": model, "anatomy": anatomy, "blocks": blocks})()
    return track(lambda: _measure(opening, batch_size=batch_size, tokens=tokens, grad=grad, progress=False,
                                  checkpoint_layers=True, metrics=metrics), model, [blocks]).tracked


def _hidden_size(net) -> int:
    config = getattr(net.config, "text_config", None) or net.config
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd")


def _structure(net) -> tuple:
    """What a prediction depends on in the model: its class, attention implementation, parameter shapes."""
    return (type(net).__name__, getattr(net.config, "_attn_implementation", None),
            tuple((n, tuple(p.shape), p.dtype) for n, p in net.named_parameters()))


# Tracked peaks already predicted in this process: the check after loading reuses the one made before.
_PREDICTED: dict[tuple, int] = {}


def _fit_problem(net, *, free: int, loaded: bool, device, batch_size: int, seq_len: int, tokens: str, grad: bool,
                 metrics: frozenset | None, layers_path: str | None, command: str = "analyze") -> str | None:
    """Why analyze on `net` will not fit `free` bytes of `device`, in one line naming what would (None: it fits,
    or there is no prediction). `loaded`: `net` is the real model, its weights already on the device (not in
    `free`); else `net` is a fake model built from the config before loading, and its weights count.
    `command` "prune-sweep": the weights only (the sweep sizes its own working set by the free memory)."""
    weights = 0 if loaded else sum(weight_bytes(net).values())
    what = (f"analyze {'with gradients' if grad else '--no-grad'} at --batch-size {batch_size} x {seq_len} tokens"
            if command == "analyze" else command)
    if weights > free:
        spread = ("--device-map auto over several GPUs (offloading layers to the CPU needs --no-grad)" if grad else
                  "--device-map auto (it offloads to the CPU what does not fit)")
        return (f"{what}: the weights alone need {weights / GIB:.1f} GiB on {device}, which has {free / GIB:.1f} GiB "
                f"free: use {spread}")
    if command != "analyze":
        return None
    stores_streams = metrics is None or bool({"angular", "lens"} & metrics)
    try:
        anatomy = find_anatomy(net, layers_path)
        L, layers_path, element = anatomy.num_layers, anatomy.layers_path, next(net.parameters()).element_size()
        key = (_structure(net), seq_len, grad, metrics, layers_path)
    except Exception:  # a model we cannot read: no prediction, no refusal
        return None

    def need(b: int) -> float:
        # Predicted at --tokens last: tracking the lens over every token takes minutes at 8B. With
        # gradients --tokens all adds nothing at the peak (its streams are the layer inputs the backward
        # keeps); without, one chunk of its streams (capture.all_tokens_device_bytes).
        extra = (all_tokens_device_bytes(L, b * seq_len, _hidden_size(net), element)
                 if tokens == "all" and not grad and stores_streams else 0)
        if (key, b) not in _PREDICTED:
            _PREDICTED[key, b] = predict_memory(net, batch_size=b, seq_len=seq_len, grad=grad, metrics=metrics,
                                                layers_path=layers_path, build=loaded).tracked
        return weights + CUDA_FACTOR * (_PREDICTED[key, b] + extra)

    try:
        at_batch, fits = largest_batch(need, free, batch_size)
    except Exception:  # a model we cannot rebuild or run under FakeTensorMode: no prediction, no refusal
        return None
    if fits == batch_size:
        return None
    advice = (f"use --batch-size {fits}" if fits else "even --batch-size 1 does not fit: use "
              + ("--no-grad, a shorter --seq-len or --device-map auto over several GPUs" if grad else
                 "a shorter --seq-len or --device-map auto"))
    amount = (f"~{at_batch / GIB:.1f} GiB over the weights" if loaded else
              f"~{at_batch / GIB:.1f} GiB ({weights / GIB:.1f} of weights + {(at_batch - weights) / GIB:.1f} for the run)")
    return f"{what} needs {amount} on {device}, which has {free / GIB:.1f} GiB free: {advice}"


def check_fits(opening: Opening, *, batch_size: int, tokens: str, grad: bool, metrics: frozenset | None = None) -> None:
    """On one CUDA device, with the model loaded: refuse a batch whose predicted peak over the weights
    (predict_memory, x CUDA_FACTOR) exceeds the free memory, naming the largest batch size that fits.
    For a model given as a spec the same check ran before loading (`check_fits_before_loading`); this
    one reuses its prediction, and covers models handed over loaded and single-GPU device maps."""
    net, anatomy = opening.model, opening.anatomy
    devices = {p.device for p in net.parameters()}
    free = device_free_bytes(anatomy.input_device) if len(devices) == 1 else None
    if free is None:
        return
    problem = _fit_problem(net, free=free, loaded=True, device=anatomy.input_device,
                           batch_size=min(batch_size, len(opening.blocks)), seq_len=opening.blocks.shape[1],
                           tokens=tokens, grad=grad, metrics=metrics, layers_path=anatomy.layers_path)
    if problem:
        raise LayerprobeError(problem)


def _npy_shape(data) -> tuple[int, int] | None:
    """(samples, tokens) of a .npy token file, read from its header; None for other data or a bad file."""
    if not str(data).endswith(".npy"):
        return None
    try:
        shape = np.load(str(data), mmap_mode="r", allow_pickle=False).shape
    except Exception:  # the loader says what is wrong with it, later
        return None
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


def check_fits_before_loading(spec, *, data: str = "builtin", seq_len: int = 256, samples: int | None = 32,
                              batch_size: int = 4, tokens: str = "last", grad: bool = True,
                              metrics: frozenset | None = None, revision: str | None = None, dtype: str = "auto",
                              device: str = "auto", device_map=None, attn_implementation: str | None = None,
                              trust_remote_code: bool = False, layers_path: str | None = None,
                              progress: bool = False, command: str = "analyze") -> None:
    """On one CUDA device, before any weight is read: the model built from its config alone (hub id, folder,
    .gguf metadata, layerprobe checkpoint) under FakeTensorMode, its weights and analyze's peak predicted,
    and a run that will not fit the device's free memory refused in one line naming the batch size that would.
    With `device_map` nothing is predicted here (the planner places the weights; `check_fits` runs after
    loading when they all landed on one GPU). Quantized checkpoints are not predicted (their weights are
    smaller than the config's dtype says). `command` "prune-sweep": only whether the weights fit."""
    if device_map is not None:
        return
    dev = resolve_device(device)
    free = device_free_bytes(dev)
    if free is None:
        return
    config = read_config(spec, revision=revision, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        return
    shape = _npy_shape(data)  # a .npy file brings its own length and number of samples
    seq, rows = (shape[1], min(shape[0], samples or shape[0])) if shape is not None else (seq_len, samples)
    batch = min(batch_size, rows) if rows else batch_size
    with status("predicting GPU memory", progress), fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            net = fake_model(config, resolve_dtype(dtype, dev), attn_implementation=attn_implementation,
                             trust_remote_code=trust_remote_code)
        except Exception:  # loading reports what is wrong with the model; no prediction, no refusal
            return
        problem = _fit_problem(net, free=free, loaded=False, device=dev, batch_size=batch, seq_len=seq, tokens=tokens,
                               grad=grad, metrics=metrics, layers_path=layers_path, command=command)
    if problem:
        raise LayerprobeError(problem)


def _with_intervals(table: pd.DataFrame, bounds: dict) -> pd.DataFrame:
    """`table` with COLUMN_lo, COLUMN_hi right after each COLUMN that `bounds` has an interval for."""
    out = {}
    for col in table.columns:
        out[col] = table[col]
        if col in bounds:
            out[f"{col}_lo"], out[f"{col}_hi"] = (pd.Series(b, index=table.index) for b in bounds[col])
    return pd.DataFrame(out)


def interval_manifest(samples: int, seed: int, level: float = LEVEL, resamples: int = RESAMPLES) -> dict:
    """What the manifest says about the _lo/_hi columns."""
    return {"method": METHOD, "level": level, "resamples": resamples, "seed": seed, "over": "samples (sequences)",
            "samples": samples}


def _tables(capture: LayerCapture, anatomy: Anatomy, grad: bool, seed: int = 0,
            metrics: frozenset | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(layers, angular, sublayers) from a filled capture and, with `grad`, the accumulated gradients;
    every ratio-of-sums column with its interval over samples (metrics/intervals.py). `metrics`: the
    columns of the others are absent (None: every metric; gradient norms NaN without `grad`)."""
    L = anatomy.num_layers
    layers = pd.DataFrame({"layer": range(L), **capture.per_layer()})
    sublayers, grad_rows = _gradient_tables(anatomy, grad)
    if metrics is None or "gradients" in metrics:
        layers = pd.concat([layers, pd.DataFrame(grad_rows, columns=list(GRAD_COLUMNS))], axis=1)
    else:
        sublayers = sublayers.drop(columns="grad_norm")
    if grad:
        anatomy.model.zero_grad(set_to_none=True)
    dtype = next(anatomy.model.parameters()).dtype
    if "updates" in capture.metrics:
        sublayers = _add_sublayer_updates(sublayers, capture, dtype)
    layers["norm_placement"] = capture.placement or ["?"] * L
    bounds = layer_intervals(capture.per_sample_sums(), seed=seed)
    if "angular" not in capture.metrics:
        return _with_intervals(layers, bounds), pd.DataFrame(columns=["layer", "n", "angular_distance"]), sublayers
    angular = angular_long_table(capture.angular_mean())
    if "angular_map" in bounds:
        lo, hi = bounds.pop("angular_map")
        angular = _with_intervals(angular, {"angular_distance": (
            angular_long_table(torch.from_numpy(lo))["angular_distance"].to_numpy(),
            angular_long_table(torch.from_numpy(hi))["angular_distance"].to_numpy())})
    return _with_intervals(layers, bounds), angular, sublayers


def _summary(opening: Opening, capture: LayerCapture, loss: float) -> dict[str, Any]:
    anatomy, net = opening.anatomy, opening.model
    measured, measured_k = capture.measured_scheme()
    scheme, source, post_k = anatomy.norm_scheme, anatomy.norm_scheme_source, anatomy.post_ln_layers
    if scheme == "unknown":
        scheme, source, post_k = measured, "measured (which norm reads the layer input / writes its output)", measured_k
    return {
        "model": opening.loaded.name,
        "model_type": anatomy.model_type,
        "num_layers": anatomy.num_layers,
        "hidden_size": getattr(net.config, "hidden_size", None) or getattr(net.config, "n_embd", None),
        "parameters": sum(p.numel() for p in net.parameters()),
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens_scored": predicted_tokens(opening.blocks),
        "norm_scheme": scheme,
        "norm_scheme_source": source,
        "post_ln_layers": post_k,
        # First layer from which the logit lens's top-1 stays >= 0.5 (metrics/lens.py).
        "lens_lock_in_layer": lock_in_layer(capture.lens_top1()),
        "measured_norm_scheme": measured,
        "measured_post_ln_layers": measured_k,
        "layers_path": anatomy.layers_path,
    }


def analyze(
    model: str | LoadedModel,
    *,
    data: str = "builtin",
    seq_len: int = 256,
    samples: int | None = 32,
    batch_size: int = 4,
    seed: int = 0,
    tokens: str = "last",
    grad: bool = True,
    text_column: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    attn_implementation: str | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    progress: bool = True,
    lens_chunk: int | None = None,
    metrics: str | list[str] | None = None,
) -> AnalysisResult:
    """Measure every layer of a causal LM on `data`: angular distance (l x n), Block Influence,
    output variance, logit lens (KL to the final distribution, top-1 agreement), relative update
    and update cosine per layer and per attention/MLP sublayer, massive activations, gradient norms
    per layer and sublayer, loss and perplexity: all from one hooked pass (+ one backward).

    `lens_chunk`: tokens per logit-lens chunk (default: 2^26 logits' worth, ~1 GiB) — memory only.
    Under torchrun with a started process group (`distributed.init_distributed`), each process measures a
    contiguous share of the samples and the sums are combined: every process returns the one-process result.
    `metrics`: which statistics to take, e.g. "angular,influence" or ["angular"] (names: defaults.METRICS);
    None takes every one. The hooks then do only that work, the columns of the others are absent, and
    without "gradients" there is no backward pass.

    `model` is a spec (hub id, folder, .gguf, layerprobe run, or "smollm2") or a LoadedModel.
    Returns the data only; `result.save(folder)` writes the tables and
    `layerprobe.report.render_analysis(result, folder)` draws the figures and index.html.
    """
    check_measure_options(data=data, seq_len=seq_len, samples=samples, batch_size=batch_size, tokens=tokens,
                          dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                          attn_implementation=attn_implementation)  # before the model loads
    env = current()
    check_processes(samples, env.world_size, device_map)
    progress = progress and env.is_main
    selected = check_metrics(metrics, grad)
    grad = takes_gradients(selected, grad)
    if not isinstance(model, (LoadedModel, torch.nn.Module)):
        check_fits_before_loading(model, data=data, seq_len=seq_len, samples=samples, batch_size=batch_size,
                                  tokens=tokens, grad=grad, metrics=selected, revision=revision, dtype=dtype,
                                  device=device, device_map=device_map, attn_implementation=attn_implementation,
                                  trust_remote_code=trust_remote_code, layers_path=layers_path, progress=progress)
    opening = open_model(model, revision=revision, dtype=dtype, device=device, device_map=device_map,
                         max_memory=max_memory, attn_implementation=attn_implementation,
                         offload_folder=offload_folder, grad=grad,
                         trust_remote_code=trust_remote_code, layers_path=layers_path, progress=progress)
    opening.load_blocks(data, seq_len=seq_len, samples=samples, seed=seed, text_column=text_column,
                        progress=progress)
    check_processes(len(opening.blocks), env.world_size)
    check_fits(opening, batch_size=batch_size, tokens=tokens, grad=grad, metrics=selected)
    torch.manual_seed(seed)
    # The per-batch gradient Gram (compare's interval on the gradient ratio) needs every batch's gradients in
    # one process: it is not kept under data parallel.
    gram = (_gradient_gram(opening.anatomy, -(-len(opening.blocks) // batch_size))
            if grad and not env.distributed else None)
    capture, loss = _measure_share(opening, env, batch_size=batch_size, tokens=tokens, grad=grad,
                                   progress=progress, lens_chunk=lens_chunk, metrics=selected, gram=gram)
    layers, angular, sublayers = _tables(capture, opening.anatomy, grad, seed=seed, metrics=selected)
    manifest = opening.manifest(batch_size=batch_size, tokens=tokens, grad=grad,
                                **split_manifest(env, len(opening.blocks)),
                                intervals=dict(interval_manifest(len(opening.blocks), seed),
                                               without=list(NO_INTERVAL)),
                                metrics=[m for m in METRICS if selected is None or m in selected])
    return AnalysisResult(layers=layers, angular=angular, sublayers=sublayers,
                          summary=_summary(opening, capture, loss), manifest=manifest,
                          per_sample=dict(capture.per_sample_sums(), **(gram.result() if gram is not None else {})))
