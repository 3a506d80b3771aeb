"""What the trainer measures on held-out data (loss, per-layer output variance), and its clip.

The held-out forwards are the monitor's probe (`monitor.probe.probe_sums`): one `LayerCapture`, the code
that fills analyze's layers.csv, so a trained run's curves and an analysis of its checkpoint are the same
quantities, computed by one implementation:

- output variance: the population variance of a layer's output over every sample, position and hidden
  unit (`RunningMoments`, from the capture's per-token float32 Σy and ‖y‖ summed in float64), the quantity
  whose growth with depth the Curse-of-Depth paper plots;
- token variance: the variance over hidden units of each token's output, averaged over tokens
  (`metrics.token_variance`, from the same per-token sums). It leaves out the spread between tokens'
  means, so it is logged under its own name.

Before the move onto the capture these were float64 sums over whole float32 batches and a float32 var per
token; on 24- and 30-step micro runs (fp32, CPU) the logged layer_output_var and layer_token_var moved by
at most 5e-9 relative, eval_loss and every other number not at all (docs/design.md).

Gradient norms (per layer and sublayer, before clipping), the clip factor and weight-update sizes are the
monitor's (`layerprobe.monitor.LayerMonitor`, which any training loop can use): train-reference calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..anatomy import find_anatomy
from ..metrics import clip_factor
from ..monitor.probe import probe_sums
from .distributed import DistEnv
from .model import unwrap


@dataclass
class EvalStats:
    loss: float  # mean next-token cross-entropy over every held-out predicted token (nats)
    output_variance: list[float]  # per layer, RunningMoments' population variance
    token_variance: list[float]  # per layer, mean over tokens of the variance over hidden units


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, micro_batch_size: int, env: DistEnv,
             autocast_dtype: torch.dtype | None = None) -> EvalStats:
    """Held-out loss and each layer's output statistics over `blocks`, split over and summed across processes.

    Each process reads blocks rank, rank + world, ...; the capture's sums (count, sum, sum of squares per
    layer, token-variance sums) and the loss sum and predicted tokens are all-reduced, in one collective,
    before any ratio is taken, so the result does not depend on the number of processes.
    """
    mine = blocks[env.rank::env.world_size]
    capture, loss_sum, predicted = probe_sums(find_anatomy(unwrap(model)), mine, forward_model=model,
                                              batch_size=micro_batch_size, metrics={"variance"},
                                              token_variance=True, autocast_dtype=autocast_dtype)
    # The per-sample rows land rank by rank, not in data order (blocks are dealt out strided): unused here.
    # Every process must describe the same [total] block even when the shares differ by one.
    start = sum(len(blocks[rank::env.world_size]) for rank in range(env.rank))
    loss_total, predicted_total = capture.all_reduce(env, start, len(blocks), extra=[loss_sum, predicted])
    columns = capture.per_layer()
    return EvalStats(loss=loss_total / predicted_total, output_variance=columns["output_variance"],
                     token_variance=columns["token_variance"])


def clip_gradients(model, total_norm: float, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)), as `clip_grad_norm_` does, with the
    norm already measured (and logged) rather than measured again."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return
    coef = clip_factor(total_norm, max_norm)
    if coef < 1.0:
        grads = [p.grad for p in unwrap(model).parameters() if p.grad is not None]
        torch._foreach_mul_(grads, coef)
