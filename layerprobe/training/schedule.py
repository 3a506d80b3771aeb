"""The learning-rate schedule of the Mix-LN / Curse-of-Depth recipe: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def lr_at(step: int, plan) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio × peak at the last step (0-based step).

    A pure function of the step, so a resumed run sets the same rate as one that never stopped; `plan` is a
    `settings.Plan` (its lr, warmup_steps, steps and settings.min_lr_ratio).
    """
    peak, floor = plan.lr, plan.lr * plan.settings.min_lr_ratio
    if step < plan.warmup_steps:
        return peak * (step + 1) / plan.warmup_steps
    span = max(1, plan.steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
