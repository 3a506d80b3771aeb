"""Every formula layerprobe reports, one module per formula, each citing its paper.

Pure functions on tensors: `capture.py` and the pruning sweep feed them batch by batch.
"""

from .activation import MASSIVE_RATIO, activation_extremes, massive_onset
from .angular import angular_distance_matrix, angular_distance_sums, angular_long_table, unit_vectors
from .gradients import clip_factor, grad_norms_by_group, gradient_squares
from .influence import block_influence, cosine_and_norms, cosine_per_token
from .token_terms import fused_layer_terms, layer_terms
from .lens import LOCK_IN_TOP1, final_distribution, lens_sums, lens_terms, lock_in_layer
from .loss import chunked_loss_sum, cross_entropy_rows, next_token_labels, next_token_loss_sum, perplexity, predicted_tokens
from .update import second_half_ratio, update_terms
from .variance import RunningMoments, token_variance
from .weights import weight_change_sums, weight_update_ratio

__all__ = [
    "activation_extremes",
    "MASSIVE_RATIO",
    "massive_onset",
    "LOCK_IN_TOP1",
    "final_distribution",
    "lens_sums",
    "lens_terms",
    "update_terms",
    "layer_terms",
    "fused_layer_terms",
    "lock_in_layer",
    "second_half_ratio",
    "angular_distance_matrix",
    "angular_distance_sums",
    "angular_long_table",
    "unit_vectors",
    "block_influence",
    "cosine_and_norms",
    "cosine_per_token",
    "chunked_loss_sum",
    "cross_entropy_rows",
    "next_token_labels",
    "clip_factor",
    "grad_norms_by_group",
    "gradient_squares",
    "next_token_loss_sum",
    "perplexity",
    "predicted_tokens",
    "RunningMoments",
    "token_variance",
    "weight_change_sums",
    "weight_update_ratio",
]
