"""The papers' training recipes as data: one name gives every hyperparameter of a published run.

Each recipe gives the values of the official training scripts, which follow GaLore's LLaMA-on-C4
setup: sequence 256, global batch 512, Adam (weight decay 0), no gradient clipping, 10% linear
warmup, cosine decay to 10% of the peak, bf16, the t5-base tokenizer with a 32,000-row embedding.
Sources (`source` of each recipe):
  Mix-LN (Li et al., 2024, arXiv:2412.13795), github.com/pixeli99/MixLN README and scripts/run_71m.sh:
    71M: lr 1e-3, 10,000 steps, 1,000 warmup, POST_NUM=3 Post-LN layers, --grad_clipping 0.0
  Curse of Depth (Sun et al., 2025, arXiv:2502.05795), github.com/lmsdss/LayerNorm-Scaling run_130m.sh:
    130M: lr 1e-3, 20,000 steps, 2,000 warmup, --weight_decay 0 --optimizer adam --grad_clipping 0.0
The larger sizes take the steps of GaLore's token budgets (presets.py) and lr 5e-4 above 250M;
`verified` says which recipes were checked against a published script.
Tokens per run = steps x 512 x 256 (the papers quote GaLore's counts, e.g. "1.1B" for 10k steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import LayerprobeError


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    preset: str  # model size (layerprobe.reference.presets)
    norms: str  # the schemes the paper's table compares
    steps: int
    lr: float
    seq_len: int = 256
    batch_size: int = 512  # global: sequences per optimizer step
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # Adam, not AdamW
    grad_clip: float = 0.0  # no clipping
    dtype: str = "bfloat16"
    eval_every: int = 1000
    post_ln_layers: int | None = None  # Mix-LN: the first layers that are Post-LN (POST_NUM)
    tokenizer: str = "t5-base"
    vocab_size: int = 32000
    eval_tokens: int = 10_000_000  # held-out C4 validation tokens
    source: str = ""
    verified: bool = False

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def settings(self) -> dict:
        """The training settings the recipe fixes (what flags override), without its bookkeeping fields."""
        d = asdict(self)
        for k in ("name", "paper", "source", "verified"):
            d.pop(k)
        return d


_MIX = "post,deepnorm,pre,mix"
_LNS = "pre,lns"
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("mixln-71m", "Mix-LN", "71m", _MIX, 10_000, 1e-3, post_ln_layers=3,
           source="Mix-LN README / scripts/run_71m.sh (Table 1: Post-LN 35.18, DeepNorm 34.87, Pre-LN 34.77, Mix-LN 33.12)",
           verified=True),
    Recipe("mixln-130m", "Mix-LN", "130m", _MIX, 20_000, 1e-3, post_ln_layers=3,
           source="GaLore 130M budget, 20k steps (the Mix-LN 130M script was not checked)"),
    Recipe("mixln-250m", "Mix-LN", "250m", _MIX, 40_000, 1e-3, post_ln_layers=6, source="presets.py 250m budget"),
    Recipe("mixln-1b", "Mix-LN", "1b", _MIX, 100_000, 5e-4, post_ln_layers=6,
           source="Mix-LN README (scripts/run_1b.sh post_pre 6); GaLore 1B budget"),
    Recipe("lns-130m", "Curse of Depth", "130m", _LNS, 20_000, 1e-3,
           source="LayerNorm-Scaling run_130m.sh (Table 1: Pre-LN 26.73, LNS 25.76)", verified=True),
    Recipe("lns-250m", "Curse of Depth", "250m", _LNS, 40_000, 1e-3, source="presets.py 250m budget"),
    Recipe("lns-350m", "Curse of Depth", "350m", _LNS, 60_000, 5e-4, source="presets.py 350m budget (GaLore)"),
    Recipe("lns-1b", "Curse of Depth", "1b", _LNS, 100_000, 5e-4, source="presets.py 1b budget (GaLore)"),
)}


def get_recipe(name: str) -> Recipe:
    key = str(name).strip().lower()
    if key not in RECIPES:
        raise LayerprobeError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[key]


SETTING_NAMES = tuple(f.name for f in fields(Recipe) if f.name not in ("name", "paper", "source", "verified"))


def merge(recipe: Recipe | str | None, explicit: dict) -> dict:
    """Recipe values < explicit flags: `explicit` holds only what the user gave (None = not given)."""
    given = {k: v for k, v in explicit.items() if v is not None}
    if recipe is None:
        return given
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    return {**r.settings(), **given}


def describe(recipe: Recipe | str, explicit: dict | None = None) -> list[str]:
    """The lines printed before training: every value that will run, with the flags that overrode the recipe."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    given = {k: v for k, v in (explicit or {}).items() if v is not None and k in SETTING_NAMES}
    s = merge(r, given)
    tag = lambda k: f"  (--{k.replace('_', '-')} overrides {getattr(r, k)!r})" if k in given and given[k] != getattr(r, k) else ""
    tokens = s["steps"] * s["batch_size"] * s["seq_len"]
    return [
        f"recipe {r.name}: {r.paper}, {'checked against ' if r.verified else 'from '}{r.source}",
        f"  model {s['preset']}{tag('preset')}, schemes {s['norms']}{tag('norms')}"
        + (f", {s['post_ln_layers']} Post-LN layers{tag('post_ln_layers')}" if s.get("post_ln_layers") else ""),
        f"  {s['steps']:,} steps{tag('steps')} x {s['batch_size']}{tag('batch_size')} x {s['seq_len']}{tag('seq_len')} tokens"
        f" = {tokens / 1e9:.2f}B tokens",
        f"  Adam lr {s['lr']:g}{tag('lr')}, weight decay {s['weight_decay']:g}{tag('weight_decay')}, "
        f"clip {s['grad_clip']:g}{tag('grad_clip')} (0 = none), warmup {s['warmup_ratio']:.0%}{tag('warmup_ratio')}, "
        f"cosine to {s['min_lr_ratio']:.0%}{tag('min_lr_ratio')}",
        f"  {s['dtype']}{tag('dtype')}, tokenizer {s['tokenizer']}{tag('tokenizer')}, embedding {s['vocab_size']:,} rows"
        f"{tag('vocab_size')}, eval every {s['eval_every']:,}{tag('eval_every')} on {s['eval_tokens'] / 1e6:g}M tokens",
    ]


__all__ = ["RECIPES", "Recipe", "SETTING_NAMES", "describe", "get_recipe", "merge"]
