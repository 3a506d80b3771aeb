"""Σ x² of each of many tensors: what every L2 norm over parameters is built from (gradient norms per
group, weight-update sizes).

Two precisions, chosen by what the number is for:

- `squared_sums` (float64, the default): gradient norms, which set the clip factor. Each float32/bf16
  entry's square is exact in float64 and the sum is accumulated in float64, so a norm over tens of
  millions of entries is good to ~1e-15 relative. A float32 accumulation is not: torch's float32
  `_foreach_norm` on the CPU is off by up to 1e-3 relative on a 16M-entry embedding gradient (8e-4
  measured on the 71m preset), enough to move a clip factor.
- `squared_sums(float64=False)` and `change_and_size_sums`: weight-update sizes ‖Δθ‖/‖θ‖, a diagnostic
  nothing is computed from. Float32 sums of pieces of at most `CHUNK` entries, the pieces' sums added in
  float64: ~3e-7 relative at most (measured on a 16M-entry tensor: 1.5e-8 with the BLAS dot products
  `change_and_size_sums` takes on the CPU, 2e-7 with the float32 norms used for small tensors and on
  other devices).

Cost on the CPU (one core, memory-bound, BENCHMARKS.md): `_foreach_norm(dtype=float64)` converts each
whole tensor to a float64 temporary first (a model-sized allocation, 0.24 s for 71M entries). Here a
large tensor is converted `CHUNK` entries at a time into one reused float64 buffer, where the dot product
of the piece with itself reads it from cache: the same float64 accumulation, 4-5x faster. Tensors of at
most `CHUNK` entries go through one fused `_foreach_norm` call (a Python loop over them costs more).
`change_and_size_sums` reads each piece of θ_before and θ_after once: the difference goes into a reused
buffer and both sums come from cache, instead of a model-sized difference and two more passes.
Other devices keep fused `_foreach_*` calls (a loop of small kernels would cost more there).
"""

from __future__ import annotations

import torch

CHUNK = 1 << 16  # entries per piece on the CPU: 256 KiB float32, 512 KiB float64, within a core's L2


def _pieces(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of ≤ CHUNK consecutive entries of `t` (its flattened, detached data), in order."""
    return t.detach().reshape(-1).split(CHUNK)


def squared_sums(tensors: list[torch.Tensor], *, float64: bool = True) -> torch.Tensor:
    """[len(tensors)] float64 on the tensors' device (all on one device): Σ x² of each; no host sync.

    `float64=False`: float32 norms of ≤ CHUNK-entry pieces (one fused call over every piece of every
    tensor), their squares added in float64 (~3e-7 relative), for weight-update sizes off the CPU; gradient
    norms (they set the clip factor) keep float64.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if not float64:
        pieces, owner = [], []
        for i, t in enumerate(tensors):
            parts = _pieces(t)
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
    # of the piece with itself (BLAS, float64).
    buffer = None
    for i, t in enumerate(tensors):
        if t.numel() <= CHUNK:
            continue
        buffer = torch.empty(CHUNK, dtype=torch.float64) if buffer is None else buffer
        dots = []
        for piece in _pieces(t):
            b = buffer[:piece.numel()]
            b.copy_(piece)
            dots.append(torch.dot(b, b))
        out[i] = torch.stack(dots).sum()
    return out


def change_and_size_sums(before: list[torch.Tensor], after: list[torch.Tensor], *,
                         in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ (before − after)², Σ before²) of each pair of same-shaped tensors, two [n] float64 tensors on
    their device, at `squared_sums(float64=False)`'s precision.

    CPU (float32): one pass over each piece of both tensors (the difference into a reused CHUNK buffer,
    both sums read from cache); `before` is left as it was. Elsewhere: fused calls over every tensor;
    `in_place` lets them overwrite `before` with the difference rather than allocate it.
    """
    if not before:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    if before[0].device.type == "cpu" and all(t.dtype == torch.float32 for t in before + after):
        change = torch.zeros(len(before), dtype=torch.float64)
        size = torch.zeros(len(before), dtype=torch.float64)
        # Tensors of at most CHUNK entries: fused float32 calls over all of them (small temporaries).
        small = [i for i, b in enumerate(before) if b.numel() <= CHUNK]
        if small:
            held = [before[i].detach() for i in small]
            size[small] = torch.stack(torch._foreach_norm(held, 2)).double().square()
            diff = torch._foreach_sub(held, [after[i].detach() for i in small])
            change[small] = torch.stack(torch._foreach_norm(diff, 2)).double().square()
        # Larger ones piece by piece, reading each piece of both tensors once.
        buffer = None
        for i, (b, a) in enumerate(zip(before, after)):
            if b.numel() <= CHUNK:
                continue
            buffer = torch.empty(CHUNK, dtype=torch.float32) if buffer is None else buffer
            dots = []  # per piece: ‖Δ‖², ‖θ‖²
            for pb, pa in zip(_pieces(b), _pieces(a)):
                d = buffer[:pb.numel()]
                torch.sub(pb, pa, out=d)
                dots.append(torch.dot(d, d))
                dots.append(torch.dot(pb, pb))
            change[i], size[i] = torch.stack(dots).double().view(-1, 2).sum(0)
        return change, size
    size = squared_sums(before, float64=False)
    diff = before if in_place else [t.clone() for t in before]
    torch._foreach_sub_(diff, [a.detach() for a in after])
    return squared_sums(diff, float64=False), size
