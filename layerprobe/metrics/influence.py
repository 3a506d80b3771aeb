"""Block Influence (Men et al., ShortGPT, arXiv 2403.03853, eq. 1).

BI_l = 1 − E_{tokens t} [ cos(x_t^l, x_t^(l+1)) ], the expectation over every token of every sample,
where x^l is the residual stream entering layer l and x^(l+1) the one leaving it (before the final
norm for the last layer). A layer that barely turns the stream has BI near 0.

`capture.LayerCapture` calls `cosine_and_norms` on each layer's input and output during the forward
and sums the cosines; `block_influence` turns the sums into BI.
"""

from __future__ import annotations

import torch

_EPS = 1e-30  # only guards 0/0 for an all-zero vector; real norms are far larger


def cosine_and_norms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token cosine between matching rows of x and y ([..., H] -> [...]), with both norms.

    The norms come back because the caller also needs |y|² (the output's sum of squares): one pass
    each instead of another pass over the tensor.
    """
    dot = torch.linalg.vecdot(x, y)
    x_norm = torch.linalg.vector_norm(x, dim=-1)
    y_norm = torch.linalg.vector_norm(y, dim=-1)
    return dot / (x_norm * y_norm).clamp_min(_EPS), x_norm, y_norm


def cosine_per_token(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine between matching rows of x and y ([..., H] -> [...]), in float32."""
    return cosine_and_norms(x.float(), y.float())[0]


def block_influence(cos_sum: float | torch.Tensor, count: int) -> float:
    """BI = 1 − (sum of per-token cosines) / (number of tokens); NaN when no token was seen."""
    return 1.0 - float(cos_sum) / count if count else float("nan")
