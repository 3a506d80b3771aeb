"""Layer removal: prefix-cached sweeps (`prune_sweep`) and saving a pruned model (`save_pruned`).

The sweep in stages: `options` (what to remove), `candidates` (the sets, rankings included),
`measurement` (prefix-cached scoring, greedy), `table` (rows and summary); `sweep` runs them in order.
"""

from ..results import SweepResult
from .candidates import Candidate, ranking_sets
from .measures import Sums, chunk_rows_for, score
from .options import MODES, RANKINGS, SweepOptions, parse_by, parse_int_list, parse_modes
from .prefix import Capture, PrefixRunner
from .save import check_target, removal_logits, save_pruned
from .surgery import check_removal, format_removed, parse_removed, pruned, pruned_copy
from .sweep import prune_sweep

__all__ = [
    "prune_sweep", "save_pruned", "SweepResult", "PrefixRunner", "Capture", "pruned", "pruned_copy",
    "removal_logits", "check_removal", "check_target", "format_removed", "parse_removed", "ranking_sets", "score",
    "Sums", "chunk_rows_for", "MODES", "RANKINGS", "SweepOptions", "Candidate", "parse_modes", "parse_by",
    "parse_int_list",
]
