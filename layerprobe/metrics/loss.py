"""Next-token cross-entropy and perplexity: the one definition every command reports.

loss = mean over predicted tokens of −log p(x_{t+1} | x_{≤t}), in nats; perplexity = exp(loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# exp(709.78) is the largest float64; past it perplexity is reported as inf rather than raising.
_MAX_EXP = 700.0


def next_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of next-token cross-entropies (nats), in float32.

    `logits` [B, T, V] predict position t+1 from position t; the last position has no target.
    The labels are shifted, not the logits: slicing [B, T, V] logits would copy them.
    """
    vocab = logits.shape[-1]
    ids = input_ids.to(logits.device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def predicted_tokens(input_ids: torch.Tensor) -> int:
    """How many targets `next_token_loss_sum` sums over: B × (T − 1)."""
    return input_ids.shape[0] * max(input_ids.shape[1] - 1, 0)


def perplexity(loss: float) -> float:
    """exp(loss) for a mean loss in nats; inf where that overflows, NaN for NaN."""
    if loss != loss:
        return float("nan")
    return math.exp(loss) if loss < _MAX_EXP else float("inf")
