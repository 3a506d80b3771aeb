"""Block Influence (ShortGPT, arXiv 2403.03853): BI_l = 1 - E_tokens[cos(x_in, x_out)]."""

from __future__ import annotations

import torch


def cosine_per_token(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine between matching rows of x and y ([..., H] -> [...]), in float32."""
    x = x.float()
    y = y.float()
    dot = (x * y).sum(-1)
    return dot / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)
