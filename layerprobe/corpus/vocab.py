"""Tokenizers for preparation: a Hugging Face tokenizer by folder or hub id, or a byte-level BPE
trained on a bounded sample of the data; the separator between documents; the embedding size rule.

Embedding size. A model needs one embedding row per id it can see. `embedding_size` returns
len(tokenizer) rounded up to a multiple of 64 (tensor-core friendly), and never less than the
largest id seen in the prepared data + 1. t5-base (the papers' tokenizer on C4) has 32,100 ids
(32,000 SentencePiece pieces + 100 sentinel <extra_id_*> tokens that never occur in text), so the
rule gives 32,128 rows, as Hugging Face's T5 does; the papers' 32,000 rows are exact as long as the
largest id in the data is below 32,000, which the index records (`max_id`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable

from ..errors import LayerprobeError, first_line

EOS = "<|endoftext|>"  # the byte-level BPE's one special token: end of text, also its BOS and padding
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token

SAMPLE_BYTES = 32 << 20  # BPE training reads at most this much text: a few tens of MB, never the corpus
DEFAULT_BPE_VOCAB = 32000
EMBEDDING_MULTIPLE = 64

__all__ = ["DEFAULT_BPE_VOCAB", "EOS", "MIN_VOCAB", "SAMPLE_BYTES", "check_tokenizer_spec", "embedding_size",
           "fingerprint", "load_hf_tokenizer", "load_tokenizer", "parse_tokenizer_spec", "separator",
           "train_bpe_on_sample", "train_bpe_tokenizer"]


def fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's full definition (tokenizer.json, or the vocabulary for slow tokenizers):
    prepared data and resumed runs must tokenize exactly as before."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


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
    """A tokenizer named by --tokenizer, for a run: a local folder or a hub id (its own code is never run),
    padding with its EOS token when it has no pad token."""
    check_tokenizer_spec(spec)
    tok = load_hf_tokenizer(spec)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """'bpe' / 'bpe:N' -> ('bpe', N); anything else is a folder or hub id -> (spec, None)."""
    spec = str(spec).strip()
    if spec == "bpe" or spec.startswith("bpe:"):
        n = DEFAULT_BPE_VOCAB
        if spec.startswith("bpe:"):
            try:
                n = int(spec[4:])
            except ValueError:
                raise LayerprobeError(f"--tokenizer bpe:N needs an integer vocabulary size (got {spec!r})") from None
        if n < MIN_VOCAB:
            raise LayerprobeError(f"a byte-level BPE needs at least {MIN_VOCAB} ids (256 bytes + end-of-text); got {n}")
        return "bpe", n
    if not spec:
        raise LayerprobeError("--tokenizer is empty: give a folder, a hub id such as t5-base, or bpe[:N]")
    return spec, None


def _refuse_custom_code(spec: str, err: Exception) -> None:
    first = first_line(err)
    if "trust_remote_code" in first or "custom code" in first:
        raise LayerprobeError(f"tokenizer {spec!r} needs its own code to load, which layerprobe does not run for "
                              "training data; give a tokenizer without custom code, or none (one is trained on the "
                              "data)") from None


def load_hf_tokenizer(spec: str):
    """A tokenizer from a local folder or the Hugging Face cache; the hub is asked only when it is not cached.

    A tokenizer's own code is never run (nor asked about: transformers would prompt on stdin)."""
    from transformers import AutoTokenizer

    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        raise LayerprobeError(f"--tokenizer {spec} is a file; give the folder that holds tokenizer.json / tokenizer_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else spec, local_files_only=True,
                                                 trust_remote_code=False)
        except Exception as e:
            cached_err = e
        _refuse_custom_code(spec, cached_err)
        if local.is_dir():
            raise LayerprobeError(f"could not load the tokenizer in {local}: {first_line(cached_err)}") from None
        reach = _hub_unreachable()
        if reach:
            e = cached_err if reach == "offline" else OSError(reach)
        else:
            try:
                return AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
            except Exception as e2:
                _refuse_custom_code(spec, e2)
                e = e2
    first = first_line(e)
    raise LayerprobeError(
        f"tokenizer {spec!r} is not a local folder, not in the Hugging Face cache, and could not be fetched from the hub "
        f"({first[:160]}): download it once where the hub is reachable, or give its folder"
    )


def _hub_unreachable() -> str | None:
    """Why the hub cannot be asked (offline mode, no route), or None: saves the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return "offline"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as e:
        return f"{url.hostname} unreachable: {e.strerror or e}"
    return None


def train_bpe_on_sample(pieces: Iterable, vocab_size: int, max_bytes: int = SAMPLE_BYTES):
    """A byte-level BPE trained on the first `max_bytes` of text of a piece stream (deterministic)."""
    docs, total = [], 0
    for p in pieces:
        text = p.text if hasattr(p, "text") else str(p)
        docs.append(text[: max(0, max_bytes - total)])
        total += len(docs[-1].encode("utf-8"))
        if total >= max_bytes:
            break
    return train_bpe_tokenizer([d for d in docs if d], vocab_size)


def separator(tokenizer) -> tuple[int | None, str]:
    """(id, description) of the token written after each document: EOS, else SEP; None if the tokenizer has neither."""
    for attr in ("eos", "sep"):
        tid = getattr(tokenizer, f"{attr}_token_id", None)
        if tid is not None:
            return int(tid), f"{attr.upper()} {getattr(tokenizer, f'{attr}_token')!r} (id {tid})"
    return None, "none: the tokenizer has no EOS or SEP token, so documents are concatenated without a separator"


def embedding_size(vocab_len: int, max_id: int | None = None, multiple: int = EMBEDDING_MULTIPLE) -> int:
    """Rows a model's embedding needs: len(tokenizer) rounded up to `multiple`, at least max id seen + 1."""
    rows = -(-int(vocab_len) // multiple) * multiple
    return max(rows, (max_id + 1) if max_id is not None else 0)


def check_embedding(rows: int, max_id: int, where: str) -> None:
    """A model with `rows` embedding rows cannot read data holding id `max_id`: say so before training."""
    if max_id >= rows:
        raise LayerprobeError(
            f"{where} holds token id {max_id}, but the model's embedding has {rows} rows; use a vocabulary of at least "
            f"{max_id + 1} (embedding_size gives {embedding_size(max_id + 1)})"
        )


