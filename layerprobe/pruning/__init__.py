"""Layer removal: prefix-cached sweeps (`prune_sweep`) and saving a pruned model (`save_pruned`)."""

from .measures import Sums, chunk_rows_for, score
from .prefix import Capture, PrefixRunner
from .save import removal_logits, save_pruned
from .surgery import check_removal, format_removed, parse_removed, pruned, pruned_copy
from .sweep import MODES, RANKINGS, SweepResult, prune_sweep, ranking_sets

__all__ = [
    "prune_sweep", "save_pruned", "SweepResult", "PrefixRunner", "Capture", "pruned", "pruned_copy",
    "removal_logits", "check_removal", "format_removed", "parse_removed", "ranking_sets", "score", "Sums",
    "chunk_rows_for", "MODES", "RANKINGS",
]
