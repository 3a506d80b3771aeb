"""Σ x² of each of many tensors, accumulated in float64: what every L2 norm over parameters is built from
(gradient norms per group, weight-update sizes).

Precision: each float32/bf16 entry's square is exact in float64 and the sum is accumulated in float64, so a
norm over tens of millions of entries is good to ~1e-15 relative. A float32 accumulation is not: torch's
float32 `_foreach_norm` on the CPU is off by up to 1e-3 relative on a 16M-entry embedding gradient (8e-4
measured on the 71m preset), enough to move a clip factor, so it is not used.

Cost: on the CPU, `_foreach_norm(dtype=float64)` converts each whole tensor to a float64 temporary first (a
model-sized allocation, 0.24 s for 71M entries on one core). Here the CPU path converts a chunk of
`CHUNK` entries at a time into one reused float64 buffer and takes its dot product: the same float64
accumulation, 0.045 s (bench/bench_monitor.py). Other devices keep the fused `_foreach_norm` in float64.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 16  # entries converted to float64 at a time on the CPU: 512 KiB, fits in cache


def squared_sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[len(tensors)] float64 on the tensors' device (all on one device): Σ x² of each; no host sync."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()
    buffer = torch.empty(min(CHUNK, max(t.numel() for t in tensors)), dtype=torch.float64)
    sums = []
    for t in tensors:
        parts = []
        for piece in t.detach().reshape(-1).split(CHUNK):
            b = buffer[:piece.numel()]
            b.copy_(piece)
            parts.append(torch.dot(b, b))
        sums.append(torch.stack(parts).sum() if len(parts) > 1 else
                    parts[0] if parts else torch.zeros((), dtype=torch.float64))
    return torch.stack(sums)
