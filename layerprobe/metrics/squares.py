"""Σ x² of each of many tensors, accumulated in float64: what every L2 norm over parameters is built from
(gradient norms per group, weight-update sizes).

Precision: each float32/bf16 entry's square is exact in float64 and the sum is accumulated in float64, so a
norm over tens of millions of entries is good to ~1e-15 relative. A float32 accumulation is not: torch's
float32 `_foreach_norm` on the CPU is off by up to 1e-3 relative on a 16M-entry embedding gradient (8e-4
measured on the 71m preset), enough to move a clip factor, so it is not used.

Cost: on the CPU, `_foreach_norm(dtype=float64)` converts each whole tensor to a float64 temporary first (a
model-sized allocation, 0.24 s for 71M entries on one core). Here the CPU path converts a large
tensor `CHUNK` entries at a time into one reused float64 buffer and takes their dot product there: the
same float64 accumulation, 4-5x faster (BENCHMARKS.md). Tensors of at most `CHUNK` entries still go
through one fused `_foreach_norm` call: their temporaries are small, and a Python loop over them costs more. Other devices keep the fused `_foreach_norm` in float64.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 16  # entries converted to float64 at a time on the CPU: 512 KiB, fits in cache


def squared_sums(tensors: list[torch.Tensor], *, float64: bool = True) -> torch.Tensor:
    """[len(tensors)] float64 on the tensors' device (all on one device): Σ x² of each; no host sync.

    `float64=False`: float32 norms of pieces of at most CHUNK entries (one fused call over every piece of
    every tensor, no conversion), their squares summed in float64: ~1e-6 relative, for weight-update
    ratios, a diagnostic that nothing computes from; gradient norms (they set the clip factor) keep float64.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if not float64:
        pieces, owner = [], []
        for i, t in enumerate(tensors):
            parts = t.detach().reshape(-1).split(CHUNK)
            pieces.extend(parts)
            owner.extend([i] * len(parts))
        squares = torch.stack(torch._foreach_norm(pieces, 2)).double().square()
        return torch.zeros(len(tensors), dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(owner, device=device), squares)
    if device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()
    out = torch.zeros(len(tensors), dtype=torch.float64)
    # Tensors of at most CHUNK entries: one fused call (their float64 temporaries are small).
    small = [i for i, t in enumerate(tensors) if t.numel() <= CHUNK]
    if small:
        out[small] = torch.stack(torch._foreach_norm([tensors[i].detach() for i in small], 2,
                                                     dtype=torch.float64)).square()
    # Larger ones CHUNK entries at a time: converted into one reused float64 buffer, then the dot product
    # of each slice with itself (BLAS, float64).
    buffer = None
    for i, t in enumerate(tensors):
        if t.numel() <= CHUNK:
            continue
        buffer = torch.empty(CHUNK, dtype=torch.float64) if buffer is None else buffer
        dots = []
        for piece in t.detach().reshape(-1).split(CHUNK):
            b = buffer[:piece.numel()]
            b.copy_(piece)
            dots.append(torch.dot(b, b))
        out[i] = torch.stack(dots).sum()
    return out
