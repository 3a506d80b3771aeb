"""Tiny random causal LMs of many architectures, written with `save_pretrained`, for tests.

Other test modules import this: keep these stable.
- `ARCHS`: llama, mistral, qwen2, qwen3, gemma, gemma2, phi, phi3, gpt2, gptj, gpt_neo, gpt_neox,
  opt, falcon, bloom
- `make_tiny(arch, path, *, tokenizer=False, **config_overrides) -> path`
- `tiny_config(arch, **overrides)`, `tiny_tokenizer()`, `random_ids(batch, seq, seed)`, `VOCAB`
Every model is float32, seeded (the same arch and overrides give the same weights), 3 layers,
hidden 32, vocab 256 (under 100k parameters), so building one takes well under a second and a
forward pass on a few tokens is instant on a CPU.

    from tiny_models import ARCHS, make_tiny   # pytest puts tests/ on sys.path
    folder = make_tiny("llama", tmp_path / "llama")
    loaded = layerprobe.loading.load_model(str(folder))
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256
SEED = 0

# Special tokens that fit inside the tiny vocabulary: several configs default to ids of their
# real vocabularies (GPT-2's 50256, Phi-3's 32000), which would index past the embedding table.
_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _configs() -> dict[str, tuple[str, dict]]:
    """arch -> (config class name in transformers, config kwargs). Comments say why a key is needed."""
    llama_like = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **_SPECIAL,
    )
    return {
        "llama": ("LlamaConfig", dict(llama_like)),
        "mistral": ("MistralConfig", dict(llama_like, sliding_window=None)),
        "qwen2": ("Qwen2Config", dict(llama_like)),
        # Qwen3 has its own head_dim (default 128) and q/k norms.
        "qwen3": ("Qwen3Config", dict(llama_like, head_dim=8)),
        # Gemma's head_dim defaults to 256; it scales embeddings by sqrt(hidden).
        "gemma": ("GemmaConfig", dict(llama_like, head_dim=8)),
        # Gemma2: head_dim and query_pre_attn_scalar default to 256; it alternates sliding and
        # full attention, so keep the window small but real; four norms per layer ("sandwich").
        "gemma2": ("Gemma2Config", dict(llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)),
        # Phi: parallel attention + MLP after one norm; only part of each head is rotated.
        "phi": ("PhiConfig", dict(llama_like, num_key_value_heads=4, partial_rotary_factor=0.5)),
        "phi3": ("Phi3Config", dict(llama_like, num_key_value_heads=4, original_max_position_embeddings=128)),
        "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                    bos_token_id=1, eos_token_id=2)),
        # GPT-J: parallel attention + MLP sharing ln_1; rotary_dim must divide the head size (8).
        "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, rotary_dim=4,
                                    n_positions=128, bos_token_id=1, eos_token_id=2)),
        # GPT-Neo: attention_types must expand to exactly num_layers entries.
        "gpt_neo": ("GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4,
                                         attention_types=[[["global", "local"], 1], [["global"], 1]],
                                         window_size=16, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2)),
        "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.5,
                                           max_position_embeddings=128, bos_token_id=1, eos_token_id=2)),
        "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                  num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                                  **_SPECIAL)),
        # Falcon 40B/180B style: separate ln_attn / ln_mlp feeding parallel attention and MLP, GQA.
        "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                        alibi=False, bias=False, **_SPECIAL)),
        "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4, **_SPECIAL)),
    }


ARCHS: tuple[str, ...] = tuple(_configs())


def tiny_config(arch: str, **overrides):
    """The (unsaved) config of a tiny `arch` model; `overrides` replace or add config keys."""
    import transformers

    table = _configs()
    if arch not in table:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {', '.join(table)}")
    class_name, kwargs = table[arch]
    config = getattr(transformers, class_name)(**{**kwargs, **overrides})
    config.architectures = None  # set by save_pretrained from the model class
    return config


def tiny_tokenizer():
    """A character-level fast tokenizer whose ids fit VOCAB: <pad>=0, <s>=1, </s>=2, <unk>=3, then
    printable ASCII and newline. Enough to run text through a tiny model; it knows no merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per char
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def make_tiny(arch: str, path, *, tokenizer: bool = False, **overrides) -> Path:
    """Build a seeded random fp32 `arch` causal LM and save it (safetensors) to `path`; return `path`.

    The same arch and overrides always give the same weights. `overrides` go to the config,
    e.g. `make_tiny("opt", p, do_layer_norm_before=False)` for a Post-LN OPT.
    `tokenizer=True` also saves `tiny_tokenizer()` next to it.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def random_ids(batch: int = 2, seq: int = 8, seed: int = SEED) -> torch.Tensor:
    """Token ids inside the tiny vocabulary, avoiding the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
