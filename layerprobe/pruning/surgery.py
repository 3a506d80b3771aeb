"""Removing layers from a model for real: a smaller ModuleList, re-indexed layers, a consistent config.

`pruned(model, remove)` does it in place for the duration of a `with` block (no copy of the
weights) and puts everything back afterwards; `pruned_copy` returns a pruned deep copy.
The config changes: the layer count (`num_hidden_layers`, `n_layer`, `num_layers`, a decoder's
`decoder_layers` ... whichever the config has), every per-layer list (`layer_types`, hybrids'
`layers_block_type`, `no_rope_layers` and any list with one entry per layer), every list of layer
indices (INDEX_LISTS: `mlp_only_layers`, `moe_layers`, ...), GPT-Neo's compressed
`attention_types`, and a Mix-LN prefix length (`post_ln_layers`). Configs that derive a layer's kind
from its index by a rule (Jamba's `attn_layer_period`) cannot say it for a shorter stack:
`save.check_structure` refuses those before anything is written.
Each kept layer's `layer_idx` (and that of its attention module) becomes its new position,
which is also its KV-cache slot.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

from ..anatomy import LAYER_COUNT_KEYS, find_anatomy
from ..errors import LayerprobeError

# Config lists whose entries are layer indices, not per-layer values: kept indices are renumbered,
# removed ones dropped (Qwen-MoE's mlp_only_layers, Llama-4's moe_layers, hybrids' attention indices).
INDEX_LISTS = ("mlp_only_layers", "moe_layers", "index_layers", "full_attn_idxs", "attn_layer_indices",
               "local_layer_ids", "ple_layer_ids", "rope_scaling_layers", "cross_attention_layers")
# Patterns repeated over the depth (Recurrent-Gemma's block_types cycles): written out for the kept layers.
CYCLIC_PATTERNS = ("block_types",)
# Layer counts besides LAYER_COUNT_KEYS (a decoder-only model of an encoder-decoder family: BART, Whisper).
EXTRA_COUNT_KEYS = ("decoder_layers", "num_blocks")  # xLSTM counts blocks
# Lists that may happen to have one entry per layer but are not per-layer settings.
NOT_PER_LAYER = ("architectures",)


def check_removal(remove: Iterable[int], num_layers: int, what: str = "--remove") -> tuple[int, ...]:
    """Sorted unique layer indices to remove; one clear error for anything a model cannot lose."""
    items = list(remove)
    if not items:
        raise LayerprobeError(f"{what} names no layer; give 0-based layer indices like 20,21,22")
    bad = sorted({int(i) for i in items if not 0 <= int(i) < num_layers})
    if bad:
        raise LayerprobeError(
            f"{what}: layer {', '.join(map(str, bad))} is out of range; this model has layers 0-{num_layers - 1}"
        )
    out = tuple(sorted({int(i) for i in items}))
    if len(out) >= num_layers:
        raise LayerprobeError(f"{what} removes every one of the {num_layers} layers; keep at least one")
    return out


def format_removed(removed: Iterable[int]) -> str:
    """(7,) -> '7', (7, 8, 9) -> '7-9', (3, 7, 8, 9) -> '3,7-9', () -> 'none'."""
    items = sorted(set(int(i) for i in removed))
    if not items:
        return "none"
    parts, start, prev = [], items[0], items[0]
    for i in items[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def parse_removed(text: str) -> tuple[int, ...]:
    """Inverse of `format_removed`."""
    if text in ("none", ""):
        return ()
    out: list[int] = []
    for part in str(text).split(","):
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return tuple(out)


def _layers_config(config):
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return config
    text = getattr(config, "text_config", None)
    if text is not None:
        return _layers_config(text)
    raise LayerprobeError("the model config has no layer count (num_hidden_layers, n_layer, num_layers)")


def config_changes(config, keep: list[int], num_layers: int) -> dict[str, object]:
    """New values for every config key that depends on which layers exist."""
    cfg = _layers_config(config)
    stored = cfg.to_dict()
    changes: dict[str, object] = {}
    for key in LAYER_COUNT_KEYS:
        if isinstance(stored.get(key), int):
            changes[key] = len(keep)
    for key in EXTRA_COUNT_KEYS:
        if stored.get(key) == num_layers:
            changes[key] = len(keep)
    if not changes:  # the count lives under an alias (attribute_map)
        for key in LAYER_COUNT_KEYS:
            if isinstance(getattr(cfg, key, None), int):
                changes[key] = len(keep)
                break
    new_index = {old: new for new, old in enumerate(keep)}
    for key, value in stored.items():
        if key in NOT_PER_LAYER or key in changes:
            continue
        if key in INDEX_LISTS and isinstance(value, (list, tuple)):
            changes[key] = [new_index[i] for i in value if i in new_index]
        elif isinstance(value, (list, tuple)) and len(value) == num_layers and num_layers > 1:
            changes[key] = [value[i] for i in keep]
        elif key in CYCLIC_PATTERNS and isinstance(value, (list, tuple)) and 0 < len(value) < num_layers:
            changes[key] = [value[i % len(value)] for i in keep]
        elif isinstance(value, dict) and "layer" in key and _layer_keyed(value, num_layers):
            # Gemma-4's per_layer_config: overrides keyed by layer index (JSON makes the keys strings)
            changes[key] = {new_index[int(k)]: v for k, v in value.items() if int(k) in new_index}
    if getattr(cfg, "model_type", "") == "gpt_neo" and isinstance(stored.get("attention_types"), list):
        expanded = list(getattr(cfg, "attention_layers", []))
        if len(expanded) == num_layers:
            kept = [expanded[i] for i in keep]
            changes["attention_types"] = [[[t], 1] for t in kept]
            changes["attention_layers"] = kept
    k = stored.get("post_ln_layers")
    if isinstance(k, int):  # Mix-LN: the Post-LN blocks are a prefix; removing some shortens it
        changes["post_ln_layers"] = sum(1 for i in keep if i < k)
    return changes


def _layer_keyed(value: dict, num_layers: int) -> bool:
    keys = [k for k in value if isinstance(k, int) or (isinstance(k, str) and k.isdigit())]
    return bool(value) and len(keys) == len(value) and all(0 <= int(k) < num_layers for k in keys)


def _apply(model: nn.Module, remove: tuple[int, ...], layers_path: str | None):
    """Prune in place; returns a function that undoes it."""
    anatomy = find_anatomy(model, layers_path)
    L = anatomy.num_layers
    remove = check_removal(remove, L)
    keep = [i for i in range(L) if i not in set(remove)]
    parent, attr = anatomy.layers_parent
    old_list = getattr(parent, attr)
    cfg = _layers_config(model.config)
    changes = config_changes(model.config, keep, L)
    old_values = {k: copy.deepcopy(getattr(cfg, k)) for k in changes if hasattr(cfg, k)}
    reindexed: list[tuple[nn.Module, int]] = []
    for new, old in enumerate(keep):
        for module in old_list[old].modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and not isinstance(idx, bool):
                reindexed.append((module, idx))
                module.layer_idx = new
    setattr(parent, attr, nn.ModuleList([old_list[i] for i in keep]))
    for k, v in changes.items():
        setattr(cfg, k, v)

    def undo():
        setattr(parent, attr, old_list)
        for module, idx in reindexed:
            module.layer_idx = idx
        for k in changes:
            if k in old_values:
                setattr(cfg, k, old_values[k])

    return undo, changes


@contextmanager
def pruned(model: nn.Module, remove: Iterable[int], layers_path: str | None = None) -> Iterator[nn.Module]:
    """Inside the block `model` lacks the layers in `remove` (0-based); afterwards it is whole again."""
    undo, _ = _apply(model, tuple(remove), layers_path)
    try:
        yield model
    finally:
        undo()


def pruned_copy(model: nn.Module, remove: Iterable[int], layers_path: str | None = None) -> nn.Module:
    """A deep copy of `model` without the layers in `remove` (0-based), ready for `generate`."""
    clone = copy.deepcopy(model)
    _apply(clone, tuple(remove), layers_path)
    return clone


def removal_config_changes(model: nn.Module, remove: Iterable[int], layers_path: str | None = None) -> dict:
    anatomy = find_anatomy(model, layers_path)
    L = anatomy.num_layers
    remove = check_removal(remove, L)
    keep = [i for i in range(L) if i not in set(remove)]
    return config_changes(model.config, keep, L)
