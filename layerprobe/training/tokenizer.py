"""Tokenizers for reference training: a byte-level BPE trained offline on the training text, or a named one."""

from __future__ import annotations

import hashlib

from ..errors import LayerprobeError

EOS = "<|endoftext|>"
from ..corpus.vocab import MIN_VOCAB  # 256 byte symbols + the end-of-text token


def train_bpe_tokenizer(docs: list[str], vocab_size: int, *, min_frequency: int = 2, max_length: int | None = None):
    """A byte-level BPE (GPT-2 style) trained on `docs`, as a transformers fast tokenizer.

    Training is deterministic: the same documents and vocabulary size give the same merges, so every
    process of a distributed run (and a resumed run) trains the same tokenizer without coordination.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise LayerprobeError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + end-of-text); got {vocab_size}")
    if not docs:
        raise LayerprobeError("no training text to build a tokenizer from")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=EOS)
    if max_length:
        fast.model_max_length = max_length
    return fast


def check_tokenizer_spec(spec: str | None) -> None:
    """Refuse a --tokenizer that names a local folder that is not there (before any work): otherwise transformers
    takes it for a hub id and answers with its rules for repo ids."""
    if not spec:
        return
    from pathlib import Path

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LayerprobeError(f"--tokenizer {spec} is a file; give the folder holding the tokenizer files "
                                  "(tokenizer.json, tokenizer_config.json) or a hub id")
        return
    looks_local = spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")
    if looks_local:
        raise LayerprobeError(f"--tokenizer folder {spec} does not exist; give an existing folder or a hub id "
                              "(org/name)")


def load_tokenizer(spec: str):
    """A tokenizer named by --tokenizer: a local folder or a hub id; its own code is never run."""
    from ..corpus.vocab import load_hf_tokenizer

    check_tokenizer_spec(spec)
    tok = load_hf_tokenizer(spec)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's full definition: a resumed run must tokenize exactly as before."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
