"""Pure functions on captured tensors; `capture.py` feeds them batch by batch."""

from .angular import angular_distance_matrix, angular_long_table
from .gradients import grad_norms_by_group
from .influence import cosine_per_token
from .loss import next_token_loss_sum, perplexity, predicted_tokens
from .variance import RunningMoments

__all__ = [
    "angular_distance_matrix",
    "angular_long_table",
    "cosine_per_token",
    "grad_norms_by_group",
    "next_token_loss_sum",
    "perplexity",
    "predicted_tokens",
    "RunningMoments",
]
