"""Next-token cross-entropy and perplexity: the one definition every command reports.

loss = mean over predicted tokens of −log p(x_{t+1} | x_{≤t}) = logsumexp(z_t) − z_t[x_{t+1}], in
nats, where z_t are the logits at position t; perplexity = exp(loss). `analyze` sums it over whole
batches (`next_token_loss_sum`), the pruning sweep over chunks of rows (`cross_entropy_rows`, with
the log-partition it also needs for KL): both are `cross_entropy_rows`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that contributes nothing (the last position, which has no next token)

# exp(709.78) is the largest float64; past it perplexity is reported as inf rather than raising.
_MAX_EXP = 700.0


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor,
                       log_partition: torch.Tensor | None = None) -> torch.Tensor:
    """−log softmax(z)[target] = logsumexp(z) − z[target] for each row of `logits` [..., V], in float32.

    `targets` [...]; a target of IGNORE gives 0. `log_partition`: logsumexp(z) per row when the
    caller already has it (the pruning sweep shares it with KL), so only the gather is left.
    Without it, torch's fused cross-entropy forms the same quantity (2x faster with backward on
    CPU than logsumexp and gather, and one [rows, V] buffer in the backward instead of two).
    """
    if log_partition is not None:
        return log_partition - logits.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    vocab = logits.shape[-1]
    rows = F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none")
    return rows.reshape(targets.shape)


def next_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of next-token cross-entropies (nats), in float32.

    `logits` [B, T, V] predict position t+1 from position t; the last position has no target.
    The labels are shifted, not the logits: slicing [B, T, V] logits would copy them.
    """
    ids = input_ids.to(logits.device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1)
    return cross_entropy_rows(logits, labels).sum()


def predicted_tokens(input_ids: torch.Tensor) -> int:
    """How many targets `next_token_loss_sum` sums over: B × (T − 1)."""
    return input_ids.shape[0] * max(input_ids.shape[1] - 1, 0)


def perplexity(loss: float) -> float:
    """exp(loss) for a mean loss in nats; inf where that overflows, NaN for NaN."""
    if loss != loss:
        return float("nan")
    return math.exp(loss) if loss < _MAX_EXP else float("inf")
