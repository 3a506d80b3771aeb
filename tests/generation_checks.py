"""Cached decoding against a full recompute, compared on logits (not greedy tokens).

Greedy tokens of a random model agree by luck when its logits are nearly flat; logits do not. Used by the
reference-model, norm-scheme and pruning tests, for every scheme, pruned models and left padding.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch

TOL = dict(rtol=1e-5, atol=1e-5)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as generate() builds them from the attention mask."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def full_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits at the last position, recomputed from scratch without any cache."""
    kwargs = {} if mask is None else dict(attention_mask=mask, position_ids=_positions(mask))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits[:, -1].float()


@contextmanager
def no_transformers_deprecation():
    """Fail on any deprecation message from transformers (its logger's warning_once or a Python warning)."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                seen.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Catch(level=logging.WARNING)
    logger.addHandler(handler)
    # warning_once remembers what it said in this process: forget it, so a message said by an earlier test shows again.
    if hasattr(logging.Logger, "warning_once") and hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        seen += [str(w.message) for w in caught if "deprecat" in str(w.message).lower()
                 and "transformers" in (w.filename or "")]
    finally:
        logger.removeHandler(handler)
    assert not seen, f"transformers deprecation messages: {seen}"


def assert_generate_matches_recompute(model, prompt: torch.Tensor, steps: int = 6,
                                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """generate() with its KV cache: every step's logits equal a full recompute of the same tokens (1e-5).
    Returns the generated sequences."""
    kwargs = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True, use_cache=True)
    if mask is not None:
        kwargs["attention_mask"] = mask
    with torch.no_grad(), no_transformers_deprecation():
        out = model.generate(prompt, **kwargs)
    seqs, p = out.sequences, prompt.shape[1]
    assert len(out.logits) == steps
    for i, step_logits in enumerate(out.logits):
        step_mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], i)], dim=1)
        torch.testing.assert_close(step_logits.float(), full_logits(model, seqs[:, :p + i], step_mask), **TOL)
    return seqs


def assert_manual_cache_matches_recompute(model, prompt: torch.Tensor, continuation: torch.Tensor,
                                          cache_kw: str = "cache") -> None:
    """The prompt through the model with an empty DynamicCache, then one token at a time by hand, the cache passed
    as `cache_kw` (`cache` or the old `past_key_values`): each step's logits equal a full recompute (1e-5)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=prompt, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        torch.testing.assert_close(logits.float(), full_logits(model, prompt), **TOL)
        seq = prompt
        for j in range(continuation.shape[1]):
            token = continuation[:, j:j + 1]
            seq = torch.cat([seq, token], dim=1)
            logits = model(input_ids=token, use_cache=True, **{cache_kw: cache}).logits[:, -1]
            torch.testing.assert_close(logits.float(), full_logits(model, seq), **TOL)
    assert cache.get_seq_length() == seq.shape[1]


def assert_left_padding_is_invisible(model, vocab: int, steps: int = 4, seed: int = 0) -> None:
    """A batch with a left-padded row: generate()'s logits for that row equal the same row generated alone,
    unpadded (so padding changes nothing), and every step equals a full recompute under the same mask."""
    g = torch.Generator().manual_seed(seed)
    long_row = torch.randint(1, vocab, (1, 7), generator=g)
    short_row = torch.randint(1, vocab, (1, 4), generator=g)
    pads = 3
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, pads, dtype=torch.long), short_row], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pads] = 0
    assert_generate_matches_recompute(model, batch, steps, mask)
    kwargs = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        padded = model.generate(batch, attention_mask=mask, **kwargs)
        alone = model.generate(short_row, **kwargs)
    for step_padded, step_alone in zip(padded.logits, alone.logits):
        torch.testing.assert_close(step_padded[1:].float(), step_alone.float(), **TOL)
