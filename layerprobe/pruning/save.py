"""`save_pruned`: write a smaller model that `from_pretrained` loads, and prove it.

The proof: the saved folder is reloaded (before it is moved into place) and its logits on a
probe batch must equal what the sweep measures for the same removal (the original model's
layer inputs, with the removed layers skipped). Models whose layers compute with their own
index (LayerNorm Scaling's 1/√(ℓ+1), GPT-2's scale_attn_by_inverse_layer_idx, DeepNorm's α from
the depth) change when re-indexed; that fails the proof and nothing is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch

from ..anatomy import find_anatomy
from ..errors import LayerprobeError
from ..io import check_output_dir, temp_sibling
from ..loading import context_length, load_model, no_hf_progress_bars
from ..opening import open_model
from .prefix import PrefixRunner
from .surgery import _layers_config, check_removal, format_removed, pruned, removal_config_changes

MARKER = "layerprobe_pruned.json"


def _probe_ids(config, seed: int = 0) -> torch.Tensor:
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise LayerprobeError("the model config has no vocab_size; cannot make a probe batch")
    seq = min(16, context_length(config) or 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, seq), generator=g)


def removal_logits(model, remove: tuple[int, ...], input_ids: torch.Tensor, layers_path: str | None = None):
    """Logits of `model` without the layers in `remove`, as the sweep measures them (all positions)."""
    runner = PrefixRunner(model, find_anatomy(model, layers_path))
    cap = runner.capture(input_ids)
    start = min(remove)
    with torch.inference_mode():
        y = runner.run(cap.inputs[start], start, set(remove), cap.calls)
        return runner.logits(runner.final_hidden(y))


def saved_config_changes(folder) -> list[str]:
    """The config keys a pruned folder's marker says were rewritten for the kept layers."""
    try:
        return list(json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("config_changes", {}))
    except (OSError, ValueError):
        return []


def check_target(out: Path) -> None:
    """Refuse a target that is a file or a folder holding anything but an earlier pruned model."""
    if out.exists() and not out.is_dir():
        raise LayerprobeError(f"--save-pruned {out} is a file; give a folder")
    check_output_dir(out, "--save-pruned")  # a parent that is a file, or one that cannot be written
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LayerprobeError(f"--save-pruned folder {out} exists and holds other files; choose a new or empty folder")


def save_pruned(
    model,
    remove: Iterable[int],
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    layers_path: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    check: bool = True,
) -> Path:
    """Write `model` without the layers in `remove` (0-based) to `out_dir`, loadable by `from_pretrained`.

    `model` is a spec (as for `analyze`), a LoadedModel, or a transformers model. The folder
    appears whole or not at all: it is written under a temporary name, reloaded and checked
    against the in-memory removal, then renamed. Returns the folder.
    """
    opening = open_model(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         layers_path=layers_path, progress=False)
    net, anatomy = opening.model, opening.anatomy
    tokenizer = tokenizer if tokenizer is not None else opening.loaded.tokenizer
    source = opening.loaded.spec
    L = anatomy.num_layers
    remove = check_removal(remove, L)
    out = Path(out_dir).expanduser()
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    probe = _probe_ids(net.config).to(anatomy.input_device)
    changes = removal_config_changes(net, remove, layers_path)
    check_structure(net, anatomy, remove, changes)
    try:
        with torch.inference_mode():
            expected = removal_logits(net, remove, probe, layers_path) if check else None
        _write_weights(net, tokenizer, remove, layers_path, tmp)
        info = {
            "source": source,
            "removed": list(remove),
            "removed_text": format_removed(remove),
            "kept": [i for i in range(L) if i not in set(remove)],
            "original_num_layers": L,
            "num_layers": L - len(remove),
            "layers_path": anatomy.layers_path,
            "config_changes": changes,
        }
        if check:
            info["check"] = _prove(tmp, expected, probe, net)
        (tmp / MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _layer_shapes(layer) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in layer.named_parameters()}


def check_structure(net, anatomy, remove: tuple[int, ...], changes: dict) -> None:
    """Refuse, before writing, a removal after which the config builds other layers than the kept ones,
    or resizes a weight outside them.

    The pruned config is built on the meta device (no memory, no weights); each of its layers must
    have the parameters of the kept layer it stands for. A config that derives layer kinds from
    their index (Jamba's attn_layer_period/expert_layer_period) fails here, where the reload would
    have failed with missing weights.
    """
    # Through a dict, as the reload reads it: a config recomputes derived per-layer values from it
    # (Gemma-4's shared-KV layers count from the end of the stack).
    stored = net.config.to_dict()
    target = stored if _layers_config(net.config) is net.config else stored.get("text_config")
    try:
        if not isinstance(target, dict):
            return  # the reload check decides
        target.update(changes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = type(net.config).from_dict(stored)
        with torch.device("meta"), warnings.catch_warnings(), no_hf_progress_bars():
            warnings.simplefilter("ignore")
            small = type(net)._from_config(cfg)
    except Exception as e:  # the config class's own checks refuse the pruned values
        raise LayerprobeError(f"the pruned config is refused by {type(net.config).__name__}: "
                              f"{_first_line(e)}; nothing was written") from None
    try:
        new_layers = find_anatomy(small, anatomy.layers_path).layers
    except LayerprobeError:
        return  # the reload check decides
    prefix = anatomy.layers_path + "."
    outside = {n: tuple(p.shape) for n, p in net.named_parameters() if not n.startswith(prefix)}
    for name, p in small.named_parameters():
        if not name.startswith(prefix) and name in outside and outside[name] != tuple(p.shape):
            # Gemma-3n/4's per-layer input embeddings: one slice per layer in a weight outside the layers
            raise LayerprobeError(
                f"removing layers resizes {name} ({list(outside[name])} -> {list(p.shape)}), a weight outside the "
                "layers sized by the layer count; --save-pruned cannot write this model"
            )
    keep = [i for i in range(anatomy.num_layers) if i not in set(remove)]
    if len(new_layers) != len(keep):
        raise LayerprobeError(f"the pruned config still builds {len(new_layers)} layers, not {len(keep)}: layerprobe "
                              "does not know which key holds this model's layer count; --save-pruned cannot write it")
    for new, old in enumerate(keep):
        if new >= len(new_layers) or _layer_shapes(new_layers[new]) != _layer_shapes(anatomy.layers[old]):
            keys = ", ".join(k for k in sorted(target) if any(w in k for w in ("period", "offset", "every",
                                                                                           "interval", "step")))
            raise LayerprobeError(
                f"removing layer {format_removed(remove)} changes what layer {old} becomes: this config derives each "
                f"layer's kind from its position{f' ({keys})' if keys else ''}; --save-pruned cannot write it"
            )


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if lines and "validation error" in lines[0].lower() else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}".rstrip(".")[:300]


def _write_weights(net, tokenizer, remove: tuple[int, ...], layers_path: str | None, tmp: Path) -> None:
    """save_pretrained of the model without `remove` (and its tokenizer) into `tmp`."""
    try:
        with pruned(net, remove, layers_path) as small, _dequantized_gguf(small), no_hf_progress_bars(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small.save_pretrained(tmp)
    except LayerprobeError:
        raise
    except Exception as e:  # e.g. a quantization that transformers cannot write, a config check
        raise LayerprobeError(f"the pruned model could not be saved: {_first_line(e)}") from None
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # a GGUF tokenizer that cannot be written is not fatal for the weights
            warnings.warn(f"the tokenizer could not be saved ({e}); the pruned model is saved without it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the checked folder into place; an earlier pruned model there is replaced whole."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def _dequantized_gguf(model):
    """A model read from a GGUF file holds plain dequantized tensors but keeps a GGUF marker that makes
    save_pretrained refuse; drop the marker while saving so it writes ordinary safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        yield
        return
    had_config = "quantization_config" in model.config.__dict__
    config_value = model.config.__dict__.get("quantization_config")
    model.hf_quantizer = None
    if had_config:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            model.config.quantization_config = config_value


def _prove(folder: Path, expected: torch.Tensor, probe: torch.Tensor, net) -> dict:
    """Reload the saved folder and compare its logits on the probe with `expected`.

    The original is still resident, and a pruned 70B is most of a GPU: so the reload keeps every weight on
    disk (read lazily from the safetensors just written, one module at a time, through accelerate) and
    computes on the CPU. Neither the GPU nor host memory holds a second copy; the cost is one CPU pass
    over the probe's 32 tokens. Without accelerate the reload is an ordinary one onto the CPU.
    """
    dtype = next(net.parameters()).dtype
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")
    lazy = importlib.util.find_spec("accelerate") is not None

    def reload_and_run(device_map):
        try:
            reloaded = load_model(str(folder), dtype=dtype_name, device="cpu", device_map=device_map,
                                  load_tokenizer=False).model
        except LayerprobeError as e:
            raise LayerprobeError(f"the pruned model does not reload: {e}") from None
        except Exception as e:  # transformers' own checks of the saved config or weights
            raise LayerprobeError(f"the pruned model does not reload: {_first_line(e)}; nothing was written") from None
        try:
            with torch.inference_mode():
                return reloaded(input_ids=probe.cpu(), use_cache=False).logits
        except Exception as e:
            raise LayerprobeError(f"the reloaded pruned model does not run: {_first_line(e)}; "
                                  "nothing was written") from None

    try:
        got = reload_and_run({"": "disk"} if lazy else None)
    except LayerprobeError:
        if not lazy:
            raise
        # A module accelerate cannot run from disk (Llama-4's, for one): an ordinary reload into host memory,
        # whose error, if it has one too, is the model's own.
        lazy = False
        got = reload_and_run(None)
    got, exp = got.float(), expected.float().cpu()
    scale = float(exp.abs().max().clamp_min(1e-6))
    err = float((got - exp).abs().max()) / scale
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise LayerprobeError(
            f"the saved pruned model does not compute what the removal measures (relative logit difference "
            f"{err:.2e}): its layers depend on their index or depth; nothing was written"
        )
    return {"probe_shape": list(probe.shape), "max_relative_logit_difference": err, "tolerance": tol,
            "reloaded": "on cpu, weights read from disk module by module" if lazy else "on cpu"}
