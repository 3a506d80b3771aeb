"""Training data at paper scale: stream any corpus once through a tokenizer into a memory-mapped token
file, then serve fixed-length blocks by index in constant memory.

    prepared = prepare_data("c4/en/", "t5-base", out="data/c4-t5")     # or the cache when out is None
    store = TokenStore(prepared.path, tokenizer="t5-base")
    split = split_store(store, 256, batch_size=512, eval_blocks=64)    # held-out = the last 64 blocks
    rows = step_rows(step, n_blocks=len(split.train), batch_size=512, seed=0, rank=r, world_size=w)
    ids = split.train[rows]                                             # LongTensor [512 / w, 256]
"""

from .budget import parse_token_count, steps_for_tokens
from .prepare import Prepared, cache_root, encode_texts, prepare_data, validate_spec
from .readers import Piece, is_prepared_dir, iter_documents, iter_pieces, source_files
from .store import BlockView, Split, TokenStore, check_tokenizer_matches, permute, read_index, split_store, step_rows
from .vocab import check_embedding, embedding_size, load_hf_tokenizer, parse_tokenizer_spec, separator, train_bpe_on_sample

__all__ = [
    "BlockView", "Piece", "Prepared", "Split", "TokenStore", "cache_root", "check_embedding", "check_tokenizer_matches",
    "embedding_size", "encode_texts", "is_prepared_dir", "iter_documents", "iter_pieces", "load_hf_tokenizer",
    "parse_token_count", "parse_tokenizer_spec", "permute", "prepare_data", "read_index", "separator", "source_files",
    "split_store", "step_rows", "steps_for_tokens", "train_bpe_on_sample", "validate_spec",
]
