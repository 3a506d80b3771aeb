"""`analyze`: one hooked pass (+ one backward) over the data, every per-layer metric at once."""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from .anatomy import Anatomy, find_anatomy
from .capture import TOKENS, LayerCapture
from .data import load_token_blocks
from .errors import LayerprobeError
from .loading import LoadedModel, context_length, load_model
from .metrics import angular_long_table, grad_norms_by_group
from .progress import make_progress, status
from .results import AnalysisResult, package_versions


def lm_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch, in float32.

    The labels are shifted, not the logits: slicing [B, T, V] logits would copy them.
    """
    vocab = logits.shape[-1]
    ids = input_ids.to(logits.device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")


def _input_device(anatomy: Anatomy, model) -> torch.device:
    if anatomy.embed is not None:
        return anatomy.embed.weight.device
    return next(model.parameters()).device


def _gradient_tables(anatomy: Anatomy) -> tuple[pd.DataFrame, list[dict]]:
    """Per module (top-level child of each layer) and per layer/kind gradient norms."""
    sub_rows, layer_rows = [], []
    for i in range(anatomy.num_layers):
        groups = anatomy.parameter_groups(i)
        kinds = {name: kind for name, (kind, _) in anatomy.sublayers(i).items()}
        norms = grad_norms_by_group({k: [p for _, p in v] for k, v in groups.items()})
        by_kind: dict[str, list] = {}
        for child, params in groups.items():
            kind = kinds.get(child, "other")
            by_kind.setdefault(kind, []).extend(p for _, p in params)
            sub_rows.append({"layer": i, "module": child, "kind": kind,
                             "params": sum(p.numel() for _, p in params), "grad_norm": norms[child]})
        kind_norms = grad_norms_by_group(by_kind)
        total = grad_norms_by_group({"all": [p for ps in by_kind.values() for p in ps]})["all"]
        row = {"grad_norm": total}
        for kind in ("attention", "mlp", "norm"):
            row[f"grad_norm_{kind}"] = kind_norms.get(kind, float("nan"))
        layer_rows.append(row)
    return pd.DataFrame(sub_rows), layer_rows


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
    device_map: str | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Measure every layer of a causal LM on `data`: angular distance (l x n), Block Influence,
    output variance, gradient norms per layer and sublayer, loss and perplexity.

    `model` is a spec (hub id, folder, .gguf, layerprobe run, or "smollm2") or a LoadedModel.
    """
    started = time.perf_counter()
    if tokens not in TOKENS:
        raise LayerprobeError(f"--tokens must be 'last' or 'all' (got {tokens!r})")
    if batch_size < 1:
        raise LayerprobeError(f"--batch-size must be at least 1 (got {batch_size})")
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        with status(f"loading {model}", progress):
            loaded = load_model(str(model), revision=revision, dtype=dtype, device=device, device_map=device_map,
                                trust_remote_code=trust_remote_code)
    net = loaded.model
    anatomy = find_anatomy(net, layers_path)

    ctx = context_length(net.config)
    if ctx is not None and seq_len > ctx and not str(data).endswith(".npy"):
        raise LayerprobeError(f"--seq-len {seq_len} is beyond this model's context of {ctx} tokens; lower it")
    vocab = getattr(net.config, "vocab_size", None)
    with status("preparing data", progress):
        blocks = load_token_blocks(data, loaded.tokenizer, seq_len=seq_len, samples=samples, seed=seed,
                                   text_column=text_column, vocab_size=vocab)
    if ctx is not None and blocks.shape[1] > ctx:
        raise LayerprobeError(f"the data's {blocks.shape[1]} tokens per sample are beyond this model's context of {ctx}")

    torch.manual_seed(seed)
    in_dev = _input_device(anatomy, net)
    n_pred = blocks.shape[0] * (blocks.shape[1] - 1)
    loss_total = 0.0
    params = [p for p in net.parameters()]
    if grad:
        for p in params:
            p.requires_grad_(True)
        net.zero_grad(set_to_none=True)

    batches = list(torch.split(blocks, batch_size))
    seen = 0
    capture = LayerCapture(anatomy, tokens=tokens)
    with capture, make_progress(progress) as bar:
        task = bar.add_task("analyzing", total=len(batches), info="")
        for batch in batches:
            ids = batch.to(in_dev)
            if grad:
                with torch.enable_grad():
                    logits = net(input_ids=ids, use_cache=False).logits
                    loss_sum = lm_loss_sum(logits, ids)
                    # d(mean loss over all analysed tokens): each batch adds its share.
                    (loss_sum / n_pred).backward()
            else:
                with torch.inference_mode():
                    logits = net(input_ids=ids, use_cache=False).logits
                    loss_sum = lm_loss_sum(logits, ids)
            del logits
            capture.end_batch()
            loss_total += float(loss_sum.detach())
            seen += ids.shape[0] * (ids.shape[1] - 1)
            bar.update(task, advance=1, info=f"loss {loss_total / seen:.3f}")

    L = anatomy.num_layers
    angular_mean = capture.angular_mean()
    angular = angular_long_table(angular_mean)
    bi = capture.block_influence()
    layers = pd.DataFrame({
        "layer": range(L),
        "angular_distance": [float(angular_mean[i, i + 1]) for i in range(L)],
        "block_influence": bi,
        "output_variance": [m.variance for m in capture.output_moments],
        "update_variance": [m.variance for m in capture.update_moments],
    })
    if grad:
        sublayers, grad_rows = _gradient_tables(anatomy)
        layers = pd.concat([layers, pd.DataFrame(grad_rows)], axis=1)
        net.zero_grad(set_to_none=True)
    else:
        sublayers = pd.DataFrame(columns=["layer", "module", "kind", "params", "grad_norm"])
        for col in ("grad_norm", "grad_norm_attention", "grad_norm_mlp", "grad_norm_norm"):
            layers[col] = float("nan")
    placement = capture.placement or ["?"] * L
    layers["norm_placement"] = placement

    measured, measured_k = capture.measured_scheme()
    scheme, source, post_k = anatomy.norm_scheme, anatomy.norm_scheme_source, anatomy.post_ln_layers
    if scheme == "unknown":
        scheme, source, post_k = measured, "measured (which norm reads the layer input / writes its output)", measured_k
    loss = loss_total / n_pred
    summary: dict[str, Any] = {
        "model": loaded.name,
        "model_type": anatomy.model_type,
        "num_layers": L,
        "hidden_size": getattr(net.config, "hidden_size", None) or getattr(net.config, "n_embd", None),
        "parameters": sum(p.numel() for p in params),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "tokens_scored": n_pred,
        "norm_scheme": scheme,
        "norm_scheme_source": source,
        "post_ln_layers": post_k,
        "measured_norm_scheme": measured,
        "measured_post_ln_layers": measured_k,
        "layers_path": anatomy.layers_path,
    }
    manifest = {
        "model": loaded.spec,
        "model_name": loaded.name,
        "source": loaded.source,
        "revision": loaded.revision,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "device_map": device_map,
        "data": str(data),
        "text_column": text_column,
        "seq_len": int(blocks.shape[1]),
        "samples": int(blocks.shape[0]),
        "batch_size": batch_size,
        "seed": seed,
        "tokens": tokens,
        "grad": grad,
        "versions": package_versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return AnalysisResult(layers=layers, angular=angular, sublayers=sublayers, summary=summary, manifest=manifest)
