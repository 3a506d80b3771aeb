"""The opening `analyze`, `prune_sweep` and `save_pruned` share.

Load the model (or take one already loaded), find its anatomy, check the context length, load the
token blocks, and write the manifest fields that say how: once, so the three commands agree on
what they accept and record.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .anatomy import Anatomy, execution_device, find_anatomy
from .data import load_token_blocks
from .errors import LayerprobeError
from .loading import LoadedModel, context_length, load_model, offloaded_modules
from .progress import status
from .results import package_versions


@dataclass
class Opening:
    """A model ready to measure: what was loaded, where its parts are, and (after `load_blocks`) the tokens."""

    loaded: LoadedModel
    anatomy: Anatomy
    device_map: str | dict | None = None  # as asked (the manifest records it)
    started: float = 0.0  # perf_counter when the command began; the manifest's wall time counts from it
    data: str | None = None
    text_column: str | None = None
    seed: int | None = None
    seq_len: int | None = None  # as asked; `blocks` may differ (a .npy file brings its own length)
    blocks: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def context(self) -> int | None:
        return context_length(self.model.config)

    @property
    def vocab_size(self) -> int | None:
        """The config's vocabulary, else the head's rows; None when neither says."""
        vocab = getattr(self.model.config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            return vocab
        weight = getattr(self.anatomy.head, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None

    def load_blocks(self, data: str, *, seq_len: int, samples: int | None, seed: int,
                    text_column: str | None, progress: bool) -> torch.Tensor:
        """[samples, seq_len] token ids from `data`, checked against the model's context and vocabulary."""
        ctx = self.context
        if ctx is not None and seq_len > ctx and not str(data).endswith(".npy"):
            raise LayerprobeError(f"--seq-len {seq_len} is beyond this model's context of {ctx} tokens; lower it")
        if self.loaded.tokenizer is None and self.loaded.tokenizer_problem and not str(data).endswith(".npy"):
            raise LayerprobeError(self.loaded.tokenizer_problem)  # text data, and the tokenizer did not load
        with status("preparing data", progress):
            blocks = load_token_blocks(data, self.loaded.tokenizer, seq_len=seq_len, samples=samples, seed=seed,
                                       text_column=text_column, vocab_size=self.vocab_size)
        if ctx is not None and blocks.shape[1] > ctx:
            raise LayerprobeError(f"the data's {blocks.shape[1]} tokens per sample are beyond this model's "
                                  f"context of {ctx}")
        self.data, self.text_column, self.seed, self.seq_len = str(data), text_column, seed, seq_len
        self.blocks = blocks
        return blocks

    def manifest(self, *, batch_size: int, **fields) -> dict:
        """How the result was made: model, data and batching first, then `fields`, then versions and wall time."""
        loaded, blocks = self.loaded, self.blocks
        out = {
            "model": loaded.spec, "model_name": loaded.name, "source": loaded.source, "revision": loaded.revision,
            "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
            "device_map": self.device_map,
            # modules accelerate kept on cpu/disk and copied in on every forward (None: nothing offloaded)
            "offloaded": offloaded_modules(getattr(self.model, "hf_device_map", None)) or None,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "data": self.data, "text_column": self.text_column,
            "seq_len": int(blocks.shape[1]) if blocks is not None else None,
            "samples": int(blocks.shape[0]) if blocks is not None else None,
            "batch_size": batch_size, "seed": self.seed,
        }
        out.update(fields)
        out["versions"] = package_versions()
        out["wall_time_s"] = round(time.perf_counter() - self.started, 3)
        return out


def _wrap(model: nn.Module) -> LoadedModel:
    """A transformers model handed over as is: described from its config and parameters."""
    param = next(model.parameters())
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = (execution_device(embed) if embed is not None else None) or param.device
    return LoadedModel(model=model, tokenizer=None, spec=name, name=name, source="model", revision=None,
                       dtype=param.dtype, device=device)


def _offloaded_layers(model: nn.Module, device_map: dict | None, layers_path: str | None) -> list[str]:
    """The entries of `device_map` that offload (part of) a decoder layer to cpu or disk."""
    offloaded = offloaded_modules(device_map)
    if not offloaded:
        return []
    path = find_anatomy(model, layers_path).layers_path
    return [name for name in offloaded
            if name == "" or path == name or path.startswith(name + ".") or name.startswith(path + ".")]


def refuse_offloaded_gradients(names: list[str]) -> None:
    if names:
        raise LayerprobeError(
            f"gradients cannot be measured on layers offloaded to cpu or disk ({names[0] or 'the whole model'}"
            f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}): accelerate reloads their weights on "
            "every forward, so the gradients never land; use --no-grad, or keep every layer on a GPU "
            "(--device cuda, or a --max-memory that fits them)"
        )


def open_model(model: str | os.PathLike | LoadedModel | nn.Module, *, revision: str | None = None,
               dtype: str = "auto", device: str = "auto", device_map: str | dict | None = None,
               max_memory: str | dict | None = None, attn_implementation: str | None = None,
               offload_folder: str | os.PathLike | None = None, trust_remote_code: bool = False,
               layers_path: str | None = None, grad: bool = False, progress: bool = True) -> Opening:
    """Load `model` (a spec as for `load_model`, a LoadedModel, or a transformers model) and find its layers.

    With `grad` (gradient norms will be measured), a device map that offloads a layer is refused: before
    loading when this loads the model, else before anything runs.
    """
    started = time.perf_counter()
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = _wrap(model)
    else:
        def check_plan(meta, plan):
            refuse_offloaded_gradients(_offloaded_layers(meta, plan, layers_path))

        with status(f"loading {model}", progress):
            loaded = load_model(str(model), revision=revision, dtype=dtype, device=device, device_map=device_map,
                                max_memory=max_memory, attn_implementation=attn_implementation,
                                offload_folder=offload_folder, trust_remote_code=trust_remote_code,
                                check_plan=check_plan if grad and device_map is not None else None)
    if grad:
        refuse_offloaded_gradients(_offloaded_layers(loaded.model, getattr(loaded.model, "hf_device_map", None),
                                                     layers_path))
    given = {k: str(v) for k, v in device_map.items()} if isinstance(device_map, dict) else device_map
    return Opening(loaded=loaded, anatomy=find_anatomy(loaded.model, layers_path), device_map=given,
                   started=started)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside (dropout off: the statistics of the model, not of a random mask), and each module's own
    training flag as it was afterwards: a model handed over mid-training goes back to training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
