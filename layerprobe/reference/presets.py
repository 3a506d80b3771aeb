"""Model sizes and training defaults: two CPU-sized presets and the papers' LLaMA sizes.

The paper presets take hidden/FFN/heads/layers from the Mix-LN and Curse-of-Depth papers; their
training defaults follow the recipe both use (sequence 256, global batch 512, lr 1e-3 up to 250M
and 5e-4 above, cosine with 10% warmup to 10% of peak, LLaMA's 32k vocabulary). The step counts
are the GaLore-style token budgets those papers build on; check them against the paper you want
to reproduce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .configuration import LayerprobeConfig


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    seq_len: int
    batch_size: int  # global: sequences per optimizer step
    lr: float
    steps: int
    vocab_size: int
    eval_every: int
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Seconds per run on a laptop CPU: smoke tests and the test suite.
    Preset("micro", 32, 88, 2, 4, 32, 8, 3e-3, 40, 384, 10, "tests and smoke runs"),
    # The CPU comparison `layerprobe demo` trains: four schemes, analysed and swept, in under four minutes on
    # 2 cores (200 steps: 300 took 5:44 and told the same story); 12 layers, as deep as 71m, so that depth
    # effects (variance growth, Mix-LN's ⌊αL⌋ = 3 Post-LN layers) have room to show. lr: the papers' 1e-3.
    Preset("tiny", 64, 176, 4, 12, 128, 16, 1e-3, 200, 2048, 50, "CPU comparison of schemes"),
    Preset("71m", 512, 1368, 8, 12, 256, 512, 1e-3, 10_000, 32000, 500, "Mix-LN LLaMA-71M"),
    Preset("130m", 768, 2048, 12, 12, 256, 512, 1e-3, 20_000, 32000, 1000, "Mix-LN LLaMA-130M"),
    Preset("250m", 768, 2560, 16, 24, 256, 512, 1e-3, 40_000, 32000, 1000, "Mix-LN LLaMA-250M"),
    Preset("350m", 1024, 2736, 16, 24, 256, 512, 5e-4, 60_000, 32000, 2000, "Mix-LN LLaMA-350M"),
    Preset("1b", 2048, 5461, 32, 24, 256, 512, 5e-4, 100_000, 32000, 2000, "Mix-LN LLaMA-1B; use FSDP"),
)}


def get_preset(name: str) -> Preset:
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]


def reference_config(
    preset: str | Preset = "tiny",
    norm_scheme: str = "pre",
    *,
    vocab_size: int | None = None,
    num_hidden_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    max_position_embeddings: int | None = None,
    **config_kwargs,
) -> LayerprobeConfig:
    """A LayerprobeConfig for a preset, with optional size overrides.

    When the width changes and no FFN size is given, the FFN keeps LLaMA's ≈ 8/3·hidden ratio.
    """
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    hidden = hidden_size or p.hidden_size
    if intermediate_size is None:
        intermediate_size = p.intermediate_size if hidden == p.hidden_size else _llama_ffn(hidden)
    return LayerprobeConfig(
        vocab_size=vocab_size or p.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads or p.num_attention_heads,
        num_hidden_layers=num_hidden_layers or p.num_hidden_layers,
        max_position_embeddings=max_position_embeddings or p.seq_len,
        norm_scheme=norm_scheme,
        **config_kwargs,
    )


def _llama_ffn(hidden: int, multiple_of: int = 8) -> int:
    f = int(8 * hidden / 3)
    return multiple_of * ((f + multiple_of - 1) // multiple_of)


__all__ = ["PRESETS", "Preset", "get_preset", "reference_config"]
