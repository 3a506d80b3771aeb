"""Hooks on every layer that stream per-layer statistics out of the model's own forward pass.

The residual stream is read at the layers (input of layer l, output of the last layer), not from
`output_hidden_states`, whose last entry comes after the final norm. Nothing is kept across
batches but running sums, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import torch

from .anatomy import Anatomy, layer_input, residual_tensor, summarize_measured_scheme
from .errors import LayerprobeError
from .metrics import RunningMoments, angular_distance_matrix, block_influence, cosine_and_norms, unit_vectors

TOKENS = ("last", "all")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same memory seen the same way (a detached or re-wrapped view of one tensor counts)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class LayerCapture:
    """Context manager: while active, each forward through the model updates the statistics.

    Call `end_batch()` after each forward so the batch's angular-distance matrix is folded in.
    """

    def __init__(self, anatomy: Anatomy, tokens: str = "last", detect_placement: bool = True):
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}")
        self.anatomy = anatomy
        self.tokens = tokens
        self.num_layers = anatomy.num_layers
        L = self.num_layers
        self._inputs: dict[int, torch.Tensor] = {}
        self._units: list[torch.Tensor | None] = [None] * (L + 1)
        self._handles: list = []
        self._placement_handles: list = []
        self.angular_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        self.angular_count = 0
        self.cos_sum = [0.0] * L  # per layer: sum over tokens of cos(input, output), float64 on device
        self.cos_count = [0] * L
        self.output_moments = [RunningMoments() for _ in range(L)]
        self.update_moments = [RunningMoments() for _ in range(L)]
        self.detect_placement = detect_placement
        self.placement: list[str] | None = None
        self._norm_feeds_input = [False] * L  # a norm child reads the layer's input: Pre-LN
        self._norm_outputs: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._is_post = [False] * L

    # -- hooks -----------------------------------------------------------------------------
    def _store_unit(self, depth: int, h: torch.Tensor) -> None:
        vecs = h[:, -1, :] if self.tokens == "last" else h.reshape(-1, h.shape[-1])
        # float64 on the CPU: arccos is steep near cos = 1, where neighbouring layers sit.
        # Kept on the layer's device until the batch ends: no host sync inside the forward.
        self._units[depth] = vecs.detach().to(torch.float64)

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            h = layer_input(args, kwargs)
            self._inputs[index] = h
            with torch.no_grad():
                self._store_unit(index, h)

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            y = residual_tensor(output)
            x = self._inputs.pop(index)
            with torch.no_grad():
                x, y = x.detach(), y.detach()
                if y.dtype != torch.float32:  # bf16/fp16 models: statistics in float32
                    x, y = x.float(), y.float()
                # The output's sum of squares comes from the norms Block Influence already needs.
                cos, _, y_norm = cosine_and_norms(x, y)
                self.cos_sum[index] = self.cos_sum[index] + cos.sum(dtype=torch.float64)
                self.cos_count[index] += cos.numel()
                self.output_moments[index].add_sums(
                    y.numel(), y.sum(dtype=torch.float64), y_norm.double().square().sum()
                )
                # The update is small next to the stream in deep layers: form it, rather than
                # expanding |y - x|^2, which would cancel catastrophically.
                self.update_moments[index].update(y - x)
                if index == self.num_layers - 1:
                    self._store_unit(self.num_layers, y)
                if self._placement_handles:
                    self._is_post[index] = any(_same_tensor(o, y) for o in self._norm_outputs[index])
                    self._norm_outputs[index] = []

        return hook

    def _norm_hook(self, index: int):
        # Placement is read from tensor identity, not values: a Pre-LN norm is handed the very
        # tensor the layer received, and a Post-LN layer returns the very tensor its norm made.
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor):
                return
            try:
                inp = layer_input(args, kwargs)
            except LayerprobeError:  # a norm called some other way tells nothing about placement
                inp = None
            x = self._inputs.get(index)
            if inp is not None and x is not None and _same_tensor(inp, x):
                self._norm_feeds_input[index] = True
            self._norm_outputs[index].append(output)

        return hook

    def __enter__(self):
        for i, layer in enumerate(self.anatomy.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post_hook(i), with_kwargs=True))
            if self.detect_placement and self.placement is None:
                for name, (kind, module) in self.anatomy.sublayers(i).items():
                    if kind == "norm":
                        self._placement_handles.append(
                            module.register_forward_hook(self._norm_hook(i), with_kwargs=True)
                        )
        return self

    def __exit__(self, *exc):
        for h in self._handles + self._placement_handles:
            h.remove()
        self._handles, self._placement_handles = [], []
        self._inputs.clear()
        return False

    # -- per batch -------------------------------------------------------------------------
    def end_batch(self) -> None:
        if any(u is None for u in self._units):
            raise RuntimeError("a layer was not reached in this forward pass")
        units = torch.stack([u.cpu() for u in self._units])  # [L+1, N, H]
        self.angular_sum += angular_distance_matrix(unit_vectors(units))
        self.angular_count += units.shape[1]
        self._units = [None] * (self.num_layers + 1)
        if self._placement_handles:
            # Placement is a property of the architecture: one batch tells it; stop paying for it.
            self.placement = [
                "post" if post else ("pre" if pre else "?")
                for post, pre in zip(self._is_post, self._norm_feeds_input)
            ]
            for h in self._placement_handles:
                h.remove()
            self._placement_handles = []

    # -- results ---------------------------------------------------------------------------
    def angular_mean(self) -> torch.Tensor:
        return self.angular_sum / max(self.angular_count, 1)

    def block_influence(self) -> list[float]:
        return [block_influence(s, c) for s, c in zip(self.cos_sum, self.cos_count)]

    def measured_scheme(self) -> tuple[str, int | None]:
        return summarize_measured_scheme(self.placement or [])
