"""Token budgets: '1.1B' -> 1,100,000,000, and the steps a budget buys."""

from __future__ import annotations

import math
import re

from ..errors import LayerprobeError

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_token_count(text: str | int, option: str = "--tokens") -> int:
    """'1.1B' -> 1_100_000_000; K, M, B (or G), T suffixes in any case; plain integers; '2_200_000' and '2,200,000'.
    `option` names the flag in the error."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?|\.\d+)\s*([kKmMbBgGtT]?)", s)
        if not m:
            raise LayerprobeError(f"{option} must be a count such as 1.1B, 500M, 20K or 2200000 (got {text!r})")
        num, suf = m.groups()
        value = round(float(num) * _SUFFIX[suf.upper()]) if "." in num else int(num) * _SUFFIX[suf.upper()]
    if value <= 0:
        raise LayerprobeError(f"{option} must be positive (got {text!r})")
    return int(value)


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that train on at least `tokens` tokens with global batches of batch_size x seq_len."""
    return max(1, math.ceil(tokens / (batch_size * seq_len)))
