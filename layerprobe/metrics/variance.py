"""Output variance of a layer: the one definition `analyze` and the trainer's per-layer dynamics use.

Var_l = population variance of every element of the layer's output h^l ∈ R^{N×T×H}, taken over
samples, positions and hidden units together: (1/NTH) Σ h² − ((1/NTH) Σ h)². This is the quantity
whose growth with depth the Curse of Depth paper (Sun et al., arXiv 2502.05795, §3) bounds for
Pre-LN and LayerNorm Scaling. Any other spread is a different quantity and carries a different name:
train-reference also logs the token variance (`token_variance`), each token's variance over its hidden
units, averaged over tokens, which leaves out the spread between tokens' means.

Streamed from float64 running sums, so memory does not grow with samples.
"""

from __future__ import annotations

import torch


class RunningMoments:
    """Count, sum and sum of squares of every element seen, accumulated in float64 on the data's device.

    The sums stay on the device (no host sync per layer); `variance` reads them once at the end.
    float64 accumulation keeps S2/N - (S1/N)^2 exact enough unless |mean| exceeds ~1e5 std,
    which residual streams never do.
    """

    def __init__(self):
        self.count = 0
        self.s1: torch.Tensor | float = 0.0
        self.s2: torch.Tensor | float = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        self.add_sums(x.numel(), xf.sum(dtype=torch.float64),
                      torch.linalg.vector_norm(xf, dtype=torch.float64).square())

    def add_sums(self, n: int, s1: torch.Tensor, s2: torch.Tensor) -> None:
        """Fold in a batch already reduced to its element count, sum and sum of squares."""
        self.count += n
        self.s1 = self.s1 + s1
        self.s2 = self.s2 + s2

    @property
    def mean(self) -> float:
        return float(self.s1) / self.count if self.count else float("nan")

    @property
    def variance(self) -> float:
        """Population variance (divide by the count, not count - 1)."""
        if not self.count:
            return float("nan")
        mean = float(self.s1) / self.count
        return max(float(self.s2) / self.count - mean * mean, 0.0)


def token_variance(row_sum: torch.Tensor, row_norm: torch.Tensor, width: int) -> torch.Tensor:
    """Each token's population variance over its `width` hidden units, float64, from the per-token Σy and ‖y‖
    the capture already forms (metrics/token_terms.py): ‖y‖²/H − (Σy/H)², clamped at 0 against rounding.

    The subtraction cancels only as far as a token's mean is large next to its spread; on residual streams
    it moved train-reference's layer_token_var by ≤ 5e-9 relative from a per-token float32 var (docs/design.md).
    """
    mean = row_sum.double() / width
    return (row_norm.double().square() / width - mean.square()).clamp_min(0.0)
