"""Streaming population variance (Chan et al.'s pairwise merge), so memory does not grow with samples."""

from __future__ import annotations

import torch


class RunningMoments:
    """Count, mean and M2 of every element seen, merged batch by batch in float64."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.count = 0
        self.mean = torch.zeros((), dtype=torch.float64, device=device)
        self.m2 = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        xf = x.float()
        batch_mean = xf.mean(dtype=torch.float64)
        # M2 around the batch's own mean keeps the float32 sum well conditioned.
        batch_m2 = (xf - batch_mean.float()).pow(2).sum(dtype=torch.float64)
        if self.mean.device != batch_mean.device:
            batch_mean, batch_m2 = batch_mean.to(self.mean.device), batch_m2.to(self.mean.device)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> float:
        """Population variance (divide by the count, not count - 1)."""
        return float(self.m2 / self.count) if self.count else float("nan")
