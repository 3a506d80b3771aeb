"""Logit lens (nostalgebraist, "interpreting GPT: the logit lens", 2020): what the model would
predict if it stopped after layer ℓ. Used to measure effective depth by Csordás et al., "Do
Language Models Use Their Depth Efficiently?", arXiv 2505.13898.

p_ℓ = softmax(readout(y_ℓ)), where y_ℓ is the output of layer ℓ before the final norm and
`readout` is the model's own final norm, output head and final logit transform
(`Anatomy.readout`). p_final is the model's own next-token distribution (its logits).

    lens_kl_ℓ   = mean over tokens of KL(p_final ‖ p_ℓ) = Σ_v p_final(v) (log p_final(v) − log p_ℓ(v)), nats
    lens_top1_ℓ = fraction of tokens where argmax p_ℓ = argmax p_final

The tokens are those of the angular distance (the last of each sample, or every one).
The lock-in layer is the first layer from which lens_top1 stays ≥ 0.5 to the last layer: from
there on, the lens's top prediction agrees with the final one on most tokens and keeps agreeing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOCK_IN_TOP1 = 0.5


class FinalDistribution(NamedTuple):
    """log p_final in float32, p_final and its argmax, for a chunk of tokens: formed once, used for every layer."""

    log_p: torch.Tensor  # [N, V]
    top: torch.Tensor  # [N]
    p: torch.Tensor  # [N, V], exp(log_p)


def final_distribution(final_logits: torch.Tensor) -> FinalDistribution:
    log_p = F.log_softmax(final_logits.float(), dim=-1)
    return FinalDistribution(log_p, final_logits.argmax(-1), log_p.exp())


def lens_sums(final: FinalDistribution, layer_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ KL(p_final ‖ p_ℓ), number of tokens whose top-1 agrees) over the rows of [..., N, V] logits:
    one value per leading index (e.g. [L, N, V] for every layer at once, giving [L]).

    Softmax and the KL are taken in float32 (bf16 logits are upcast), the sum in float64; both
    stay on the logits' device (no host sync).
    """
    kl, agree = lens_terms(final, layer_logits)
    return kl.sum(-1, dtype=torch.float64), agree.sum(-1)


def lens_terms(final: FinalDistribution, layer_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (KL(p_final ‖ p_ℓ) in float32, whether the top-1 agrees), [..., N] each; `lens_sums`
    sums them, the per-sample sums of the intervals (metrics/intervals.py) group them by sample."""
    log_layer = F.log_softmax(layer_logits.float(), dim=-1)
    # p_final (log p_final − log p_ℓ), in place on the layer's log-softmax: kl_div's own formula, without
    # its exp of p_final for every layer (half the lens's elementwise time on the CPU).
    kl = log_layer.neg_().add_(final.log_p).mul_(final.p).sum(-1)
    return kl, layer_logits.argmax(-1) == final.top


def lock_in_layer(top1: list[float], threshold: float = LOCK_IN_TOP1) -> int | None:
    """First layer from which top-1 agreement stays ≥ `threshold` through the last layer (None if never)."""
    found = None
    for layer in range(len(top1) - 1, -1, -1):
        value = top1[layer]
        if value is None or math.isnan(value) or value < threshold:
            break
        found = layer
    return found
