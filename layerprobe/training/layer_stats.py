"""What the trainer measures on held-out data (loss, per-layer output variance), and its clip.

Each is the definition `analyze` uses, from `layerprobe.metrics`, so a trained run's curves and an
analysis of its checkpoint are the same quantities:

- output variance: the population variance of a layer's output over every sample, position and hidden
  unit (`RunningMoments`), the quantity whose growth with depth the Curse-of-Depth paper plots;
- token variance: the variance over hidden units of each token's output, averaged over tokens. It leaves
  out the spread between tokens' means, so it is logged under its own name.

Gradient norms (per layer and sublayer, before clipping), the clip factor and weight-update sizes are the
monitor's (`layerprobe.monitor.LayerMonitor`, which any training loop can use): train-reference calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..metrics import RunningMoments, clip_factor
from ..metrics.loss import next_token_loss_sum, predicted_tokens
from .distributed import DistEnv, all_reduce_sum
from .model import autocast, unwrap


@dataclass
class EvalStats:
    loss: float  # mean next-token cross-entropy over every held-out predicted token (nats)
    output_variance: list[float]  # per layer, RunningMoments' population variance
    token_variance: list[float]  # per layer, mean over tokens of the variance over hidden units


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, micro_batch_size: int, env: DistEnv,
             autocast_dtype: torch.dtype | None = None) -> EvalStats:
    """Held-out loss and each layer's output statistics over `blocks`, split over and summed across processes.

    Each process reads blocks rank, rank + world, ...; the sums (count, sum, sum of squares per layer, loss
    sum, predicted tokens) are all-reduced before any ratio is taken, so the result does not depend on the
    number of processes.
    """
    layers = unwrap(model).model.layers
    moments = [RunningMoments() for _ in layers]
    token_var_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens_seen = 0

    def hook(index):
        def fn(module, args, output):
            h = (output[0] if isinstance(output, (tuple, list)) else output).float()
            moments[index].update(h)
            token_var_sum[index] += h.var(dim=-1, unbiased=False).sum(dtype=torch.float64).cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(1, dtype=torch.float64)
    n_pred = 0
    mine = blocks[env.rank::env.world_size]
    try:
        for i in range(0, len(mine), micro_batch_size):
            ids = mine[i:i + micro_batch_size].to(env.device)
            with autocast(autocast_dtype, env.device):
                logits = model(input_ids=ids, use_cache=False).logits
            loss_sum += next_token_loss_sum(logits, ids).double().cpu()
            n_pred += predicted_tokens(ids)
            tokens_seen += ids.shape[0] * ids.shape[1]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_layer = torch.tensor([[float(m.count), float(m.s1), float(m.s2)] for m in moments], dtype=torch.float64)
    totals = all_reduce_sum(env, torch.cat([loss_sum, torch.tensor([float(n_pred), float(tokens_seen)],
                                                                    dtype=torch.float64),
                                            token_var_sum, per_layer.flatten()]))
    L = len(layers)
    loss = (totals[0] / totals[1]).item()
    token_variance = (totals[3:3 + L] / totals[2]).tolist()
    output_variance = []
    for n, s1, s2 in totals[3 + L:].reshape(L, 3).tolist():
        merged = RunningMoments()
        merged.add_sums(int(n), torch.tensor(s1, dtype=torch.float64), torch.tensor(s2, dtype=torch.float64))
        output_variance.append(merged.variance)
    return EvalStats(loss=loss, output_variance=output_variance, token_variance=token_variance)


def clip_gradients(model, total_norm: float, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)), as `clip_grad_norm_` does, with the
    norm already measured (and logged) rather than measured again."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return
    coef = clip_factor(total_norm, max_norm)
    if coef < 1.0:
        grads = [p.grad for p in unwrap(model).parameters() if p.grad is not None]
        torch._foreach_mul_(grads, coef)
