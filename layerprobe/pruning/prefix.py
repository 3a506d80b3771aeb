"""Prefix caching: one full pass stores every layer's input; a removal restarts from there.

Removing layers S (smallest ℓ = min S) leaves the model's computation up to layer ℓ unchanged, so
the input of layer ℓ from the full pass is also the pruned model's input there. From it the
runner calls only the kept layers after ℓ, with the keyword arguments the model itself gave each
layer (position embeddings, masks, position ids), then the final norm and the head.

The "tail" from the last layer's output to the logits (final norm, OPT's `project_out`, the
head, logit soft-capping or scaling) is rebuilt from the model's parts and checked against the
model's own logits on the first capture's last position. Where the rebuilt tail differs, the
model's own forward runs it (`anatomy.own_path_logits`: the layers stand in, returning the
stream) and is checked the same way; a model where neither matches fails loudly instead of
giving wrong numbers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..anatomy import Anatomy, execution_device, one_stream, own_path_logits, residual_tensor, split_layer_call
from ..errors import LayerprobeError


def _no_cache(value):
    """A KV cache object in a stored call would be written to by every re-run: drop it."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers always has it
        return value
    return None if isinstance(value, Cache) else value


@dataclass
class Capture:
    """One batch through the full model: each layer's input and call, the last layer's output."""

    inputs: list[torch.Tensor]  # inputs[i]: input of layer i (the residual stream before it)
    calls: list[tuple[tuple, dict]]  # calls[i]: the other args and kwargs layer i was called with
    output: torch.Tensor  # output of the last layer (before the final norm)
    logits: torch.Tensor | None = field(default=None, repr=False)  # the model's own logits (last position)
    logits_positions: str = "last"  # "last" or "all"


class PrefixRunner:
    """Runs any subset of a causal LM's layers from any layer's cached input."""

    def __init__(self, model: nn.Module, anatomy: Anatomy):
        self.model = model
        self.anatomy = anatomy
        self.layers = list(anatomy.layers)
        self.num_layers = len(self.layers)
        parent, _ = anatomy.layers_parent
        # OPT (and a few others) project the final hidden state to the embedding width.
        project_out = getattr(parent, "project_out", None)
        self.project_out = project_out if isinstance(project_out, nn.Module) else None
        self.final_norm = anatomy.final_norm
        self.head = anatomy.head
        if self.head is None:
            raise LayerprobeError("this model has no output head (get_output_embeddings() is None); cannot score tokens")
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        self.logit_scale = getattr(cfg, "logit_scale", None) if getattr(cfg, "model_type", "") == "cohere" else None
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides by it
        params = inspect.signature(model.forward).parameters
        # Most v5 models compute only the last position's logits when asked: the full pass then
        # costs no head at all, and that one position still checks the rebuilt tail.
        self._keep_last = "logits_to_keep" in params
        self.layer_calls = 0  # layers run by `run` (not counting the capture passes)
        self.capture_passes = 0
        self._checked = False
        self.own_tail = False  # the model's own forward computes the tail (see check_tail)
        self._output_len: int | None = None  # elements of a layer's output (None: a tensor)

    # -- the full pass ----------------------------------------------------------------------
    def capture(self, input_ids: torch.Tensor, keep_inputs: bool = True) -> Capture:
        """Run the model once with hooks; store each layer's input (a copy) and call arguments."""
        L = self.num_layers
        inputs: list[torch.Tensor | None] = [None] * L
        calls: list[tuple[tuple, dict] | None] = [None] * L
        out: list[torch.Tensor] = []

        def pre_hook(index):
            def hook(module, args, kwargs):
                h, rest, kw = split_layer_call(args, kwargs)
                one_stream(h)
                if keep_inputs or index == 0:
                    inputs[index] = h.detach().clone()
                calls[index] = (tuple(_no_cache(a) for a in rest), {k: _no_cache(v) for k, v in kw.items()})

            return hook

        def post_hook(module, args, output):
            out.append(residual_tensor(output).detach().clone())
            self._output_len = None if isinstance(output, torch.Tensor) else len(output)

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(post_hook))
        kwargs = {"use_cache": False}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        try:
            with torch.inference_mode():
                result = self.model(input_ids=input_ids, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.capture_passes += 1
        if any(c is None for c in calls) or not out:
            raise LayerprobeError("not every layer ran in the model's forward pass; name the layer list with --layers-path")
        logits = getattr(result, "logits", None)
        cap = Capture(inputs=inputs, calls=calls, output=out[-1], logits=logits,
                      logits_positions="last" if (logits is not None and logits.shape[1] == 1
                                                  and input_ids.shape[1] > 1) else "all")
        if not self._checked:
            self.check_tail(cap)
            self._checked = True
        return cap

    def check_tail(self, cap: Capture) -> None:
        """The tail must give the model's own logits, or the numbers would be wrong: the rebuilt one,
        else the model's own forward from the last layer on."""
        if cap.logits is None:
            raise LayerprobeError("the model's forward returned no logits; layerprobe needs a causal-LM head")
        try:
            self._compare_tail(cap)
        except LayerprobeError as rebuilt_error:
            self.own_tail = True
            try:
                self._compare_tail(cap)
            except Exception:  # the model's own path failed too: the rebuilt tail's message says why
                self.own_tail = False
                raise rebuilt_error from None

    def _compare_tail(self, cap: Capture) -> None:
        with torch.inference_mode():
            ours = self.logits(self.final_hidden(cap.output[:, -1:] if cap.logits_positions == "last" else cap.output))
        theirs = cap.logits.to(ours.device)
        if ours.shape != theirs.shape:
            raise LayerprobeError(f"could not rebuild this model's output head (logits {tuple(ours.shape)} vs "
                                  f"{tuple(theirs.shape)}); pruning sweeps do not support it yet")
        ours, theirs = ours.float(), theirs.float()
        scale = theirs.abs().max().clamp_min(1e-6)
        tol = 1e-4 if ours.dtype == torch.float32 and self._dtype() == torch.float32 else 3e-2
        err = float((ours - theirs).abs().max() / scale)
        if err > tol:
            raise LayerprobeError(
                f"this model's path from the last layer to the logits is not final norm + head (relative "
                f"difference {err:.2e}); pruning sweeps do not support {self.anatomy.model_type} yet"
            )

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- partial passes ---------------------------------------------------------------------
    def call_layer(self, index: int, h: torch.Tensor, calls) -> torch.Tensor:
        args, kwargs = calls[index]
        self.layer_calls += 1
        return residual_tensor(self.layers[index](h, *args, **kwargs))

    def run(self, h: torch.Tensor, start: int, skip, calls, record: dict | None = None) -> torch.Tensor:
        """Run layers start..L-1 except those in `skip` on `h`; `record[i]` gets each run layer's input."""
        for i in range(start, self.num_layers):
            if i in skip:
                continue
            if record is not None:
                record[i] = h
            h = self.call_layer(i, h, calls)
        return h

    # -- the tail -----------------------------------------------------------------------------
    def final_hidden(self, y: torch.Tensor) -> torch.Tensor:
        """The last layer's output through the final norm (and OPT's projection); with the model's own
        tail, unchanged (`logits` runs the whole path)."""
        if self.own_tail:
            return y
        if self.final_norm is not None:
            y = self.final_norm(y)
        if self.project_out is not None:
            y = self.project_out(y)
        return y

    def logits(self, hn: torch.Tensor) -> torch.Tensor:
        if self.own_tail:
            return own_path_logits(self.anatomy, hn, self._output_len)
        where = execution_device(self.head)  # not the weight's device: `meta` when the head is offloaded
        logits = self.head(hn.to(where) if where is not None else hn)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling not in (None, 1, 1.0):
            logits = logits / self.logits_scaling
        return logits
