"""Next-token cross-entropy and perplexity: the one definition every command reports.

loss = mean over predicted tokens of −log p(x_{t+1} | x_{≤t}) = logsumexp(z_t) − z_t[x_{t+1}], in
nats, where z_t are the logits at position t; perplexity = exp(loss). `analyze` sums it over whole
batches (`next_token_loss_sum`), the pruning sweep over chunks of rows (`cross_entropy_rows`, with
the log-partition it also needs for KL): both are `cross_entropy_rows`. `chunked_loss_sum` forms
the same sum from the last hidden state, head and loss a chunk of rows at a time, so the [B·T, V]
logits (and their float32 copy) never exist at once.
"""

from __future__ import annotations

import math

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # a target that contributes nothing (the last position, which has no next token)

# Logits per chunk of `chunked_loss_sum`: 2^27 float32 = 512 MiB (about 1,000 rows at V = 128k).
CE_CHUNK_ELEMENTS = 1 << 27

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
    return cross_entropy_rows(logits, next_token_labels(input_ids.to(logits.device))).sum()


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """The target of every position: the next token, IGNORE at the last."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE)], dim=1)


def _head_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return cross_entropy_rows(logits, targets.to(logits.device)).sum()  # the head may sit on another device


def chunked_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                     vocab: int, chunk_elements: int | None = None) -> torch.Tensor:
    """Σ cross_entropy_rows(head(hidden), targets) over rows of `hidden` [..., H], a chunk at a time.

    Under autograd each chunk is checkpointed: the backward runs the chunk's head again instead of
    keeping its logits, so one chunk's logits live at a time, forward and backward. No host
    sync: rows whose target is IGNORE are computed and add 0.
    """
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    rows = max(1, (chunk_elements or CE_CHUNK_ELEMENTS) // vocab)
    total = None
    for start in range(0, h.shape[0], rows):
        args = (head, h[start:start + rows], t[start:start + rows])
        part = checkpoint(_head_loss, *args, use_reentrant=False) if torch.is_grad_enabled() and h.requires_grad \
            else _head_loss(*args)
        total = part if total is None else total + part
    return total if total is not None else h.new_zeros((), dtype=torch.float32)


def predicted_tokens(input_ids: torch.Tensor) -> int:
    """How many targets `next_token_loss_sum` sums over: B × (T − 1)."""
    return input_ids.shape[0] * max(input_ids.shape[1] - 1, 0)


def perplexity(loss: float) -> float:
    """exp(loss) for a mean loss in nats; inf where that overflows, NaN for NaN."""
    if loss != loss:
        return float("nan")
    return math.exp(loss) if loss < _MAX_EXP else float("inf")
