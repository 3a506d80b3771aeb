"""When a run counts as diverged although its loss is still a number.

A NaN/Inf loss or gradient norm stops a run at once (`Run._diverged`). Two failures keep the loss finite:
- a per-layer statistic that is not finite: the residual stream has blown up (a Pre-LN model's final norm
  hides it from the loss), checked at every evaluation;
- a loss that never falls below its starting value: the run is stuck (with a huge learning rate the loss sits
  at ln(vocabulary)), checked at the end of the run.
"""

from __future__ import annotations

import math

# Per-layer lists in an evaluation record, and how a message names them.
LAYER_STATISTICS = {"layer_output_var": "output variance", "layer_token_var": "variance over tokens",
                    "layer_grad_norm": "gradient norm"}
# Fewer steps than this say nothing about learning: warmup alone may keep the loss where it started.
STUCK_MIN_STEPS = 20
# The best held-out loss must end at least this fraction below the first step's loss (noise is smaller).
STUCK_MARGIN = 0.01


def nonfinite_statistic(record: dict) -> str | None:
    """Why an evaluation record shows a run that has blown up (a non-finite held-out loss or per-layer
    statistic), or None."""
    loss = record.get("eval_loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return f"held-out loss is {loss}"
    for key, label in LAYER_STATISTICS.items():
        for layer, value in enumerate(record.get(key) or []):
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return f"{label} of layer {layer} is {value}"
    return None


def stuck_reason(first_loss: float | None, best_eval_loss: float | None, steps: int) -> str | None:
    """Why a finished run learned nothing, or None. First loss: the training loss of step 1, measured before
    any update (at initialisation it is about ln(vocabulary) for held-out text as well)."""
    if steps < STUCK_MIN_STEPS or first_loss is None or not math.isfinite(first_loss):
        return None
    if best_eval_loss is None or not math.isfinite(best_eval_loss):
        return f"the held-out loss was never finite in {steps} steps"
    if best_eval_loss > first_loss * (1 - STUCK_MARGIN):
        return (f"stuck: the loss never fell below its starting value in {steps} steps (best held-out "
                f"{best_eval_loss:.3f}, first step {first_loss:.3f})")
    return None
