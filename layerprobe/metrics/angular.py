"""Angular distance between layer inputs (Gromov et al., "The Unreasonable Ineffectiveness of the
Deeper Layers", arXiv 2403.17887, eq. 7).

d(x^l, x^(l+n)) = arccos(cos(x^l, x^(l+n))) / π, averaged over samples (the last token of each, as
in the paper, or every token with `tokens="all"`). Dividing by π normalises it to [0, 1]: 0 for the
same direction, 1/2 for orthogonal, 1 for opposite. x^0..x^(L-1) are the layer inputs, x^L the last
layer's output before the final norm.
"""

from __future__ import annotations

import math

import pandas as pd
import torch


def unit_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (an all-zero row stays zero instead of becoming NaN)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def angular_distance_matrix(units: torch.Tensor) -> torch.Tensor:
    """Sum over vectors of the pairwise angular distance.

    `units`: [L+1, N, H] unit vectors (the same N tokens at every depth). Returns [L+1, L+1]
    float64: entry (i, j) is the sum over the N tokens of arccos(<u_i, u_j>) / pi.
    The cosines are formed in float64: arccos is steep near 1, where neighbouring layers sit.
    """
    return angular_distance_per_vector(units).sum(0)


def angular_distance_per_vector(units: torch.Tensor) -> torch.Tensor:
    """[N, L+1, L+1]: `angular_distance_matrix` of each of the N vectors, before the sum over them."""
    u = units.double()
    cos = torch.einsum("inh,jnh->nij", u, u).clamp_(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


# Float64 elements per chunk of `angular_distance_sums` (layers x tokens x hidden): 256 MiB.
GRAM_CHUNK_ELEMENTS = 1 << 25


def angular_distance_sums(streams: list[torch.Tensor], chunk_elements: int | None = None,
                          groups: int | None = None, first: int = 0, group_size: int | None = None) -> torch.Tensor:
    """`angular_distance_matrix` of the L+1 streams [N, H] (any dtype, any devices), formed in chunks
    of tokens on the first stream's device: float64 copies of one chunk at a time, never of all N.

    `groups` = G: the N tokens are G samples of N/G consecutive tokens each; the sums come back per
    sample, [G, L+1, L+1] (what the intervals resample: metrics/intervals.py). Where the streams are
    tokens [first, first + N) of a longer batch (capture.py takes them from the host in pieces), the
    samples are `group_size` tokens each and the rows of samples outside the piece are zero."""
    device, n, width = streams[0].device, streams[0].shape[0], streams[0].shape[-1]
    step = max(1, (chunk_elements or GRAM_CHUNK_ELEMENTS) // (len(streams) * width))
    size = (groups or 1, len(streams), len(streams))
    total = torch.zeros(size, dtype=torch.float64, device=device)
    per_group = group_size or (n // groups if groups else n)
    for start in range(0, n, step):
        u = torch.stack([s[start:start + step].to(device=device, dtype=torch.float64) for s in streams])
        per_vector = angular_distance_per_vector(unit_vectors(u))
        if groups:
            ids = torch.arange(first + start, first + start + per_vector.shape[0], device=device) // per_group
            total.index_add_(0, ids, per_vector)
        else:
            total[0] += per_vector.sum(0)
    return total if groups else total[0]


def angular_long_table(mean_matrix: torch.Tensor) -> pd.DataFrame:
    """The (L+1)x(L+1) mean matrix as rows (layer l, block size n, distance) for l + n <= L."""
    size = mean_matrix.shape[0]
    rows = [
        (l, n, float(mean_matrix[l, l + n]))
        for l in range(size - 1)
        for n in range(1, size - l)
    ]
    return pd.DataFrame(rows, columns=["layer", "n", "angular_distance"])
