"""The papers' recipes: each sets exactly the documented hyperparameters, and explicit flags win."""

from __future__ import annotations

import pytest

from layerprobe.corpus import parse_token_count, steps_for_tokens
from layerprobe.errors import LayerprobeError
from layerprobe.reference.presets import PRESETS
from layerprobe.training.recipes import RECIPES, SETTING_NAMES, describe, get_recipe, merge

# Written out from the published training scripts (not from recipes.py):
#  Mix-LN (arXiv:2412.13795), README "LLaMA-71M, Adam, 1 A100": --lr 1e-3 --total_batch_size 512
#    --num_training_steps 10000 --warmup_steps 1000 --weight_decay 0 --dtype bfloat16 --optimizer adam
#    --grad_clipping 0.0, POST_NUM=3; max_length 256 (GaLore's C4 setup), t5-base tokenizer, 32,000-row embedding.
#  Curse of Depth (arXiv:2502.05795), run_130m.sh: --lr 1e-3 --total_batch_size 512 --num_training_steps 20000
#    --warmup_steps 2000 --weight_decay 0 --dtype bfloat16 --optimizer adam --grad_clipping 0.0.
PAPER = {
    "mixln-71m": dict(preset="71m", steps=10_000, warmup_steps=1_000, lr=1e-3, post_ln_layers=3, norms="post,deepnorm,pre,mix"),
    "lns-130m": dict(preset="130m", steps=20_000, warmup_steps=2_000, lr=1e-3, post_ln_layers=None, norms="pre,lns"),
    "mixln-130m": dict(preset="130m", steps=20_000, warmup_steps=2_000, lr=1e-3, post_ln_layers=3, norms="post,deepnorm,pre,mix"),
}
COMMON = dict(seq_len=256, batch_size=512, weight_decay=0.0, grad_clip=0.0, dtype="bfloat16", min_lr_ratio=0.1,
              tokenizer="t5-base", vocab_size=32000)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_sets_the_papers_hyperparameters(name):
    r = get_recipe(name)
    want = PAPER[name]
    assert (r.preset, r.steps, r.lr, r.post_ln_layers, r.norms) == (
        want["preset"], want["steps"], want["lr"], want["post_ln_layers"], want["norms"])
    assert round(r.warmup_ratio * r.steps) == want["warmup_steps"]
    for k, v in COMMON.items():
        assert getattr(r, k) == v, k
    assert r.tokens == want["steps"] * 512 * 256


def test_every_recipe_follows_the_shared_setup_and_exists_as_a_preset():
    assert {"mixln-71m", "mixln-130m", "lns-130m"} <= set(RECIPES)
    for r in RECIPES.values():
        assert r.preset in PRESETS
        for k, v in COMMON.items():
            assert getattr(r, k) == v, (r.name, k)
        assert r.warmup_ratio == 0.1
        big = PRESETS[r.preset].hidden_size >= 1024  # 350m and 1b: lr 5e-4; up to 250m: 1e-3
        assert r.lr == (5e-4 if big else 1e-3), r.name
        if "mix" in r.norms:  # POST_NUM = ⌊L/4⌋
            assert r.post_ln_layers == PRESETS[r.preset].num_hidden_layers // 4


def test_explicit_flags_win_and_describe_says_so():
    merged = merge("mixln-71m", {"lr": 3e-4, "steps": None, "batch_size": 256, "data": "c4/"})
    assert merged["lr"] == 3e-4 and merged["batch_size"] == 256 and merged["steps"] == 10_000
    assert merged["data"] == "c4/" and merged["seq_len"] == 256
    assert merge(None, {"lr": 1.0, "steps": None}) == {"lr": 1.0}
    assert set(get_recipe("lns-130m").settings()) == set(SETTING_NAMES)
    text = "\n".join(describe("mixln-71m", {"lr": 3e-4}))
    assert "lr 0.0003  (--lr overrides 0.001)" in text and "10,000 steps" in text and "1.31B tokens" in text
    assert "clip 0 (0 = none)" in text and "bfloat16" in text and "t5-base" in text
    with pytest.raises(LayerprobeError, match="unknown recipe 'gpt-9'; choose from mixln-71m"):
        get_recipe("gpt-9")


@pytest.mark.parametrize("text,value", [("1.1B", 1_100_000_000), ("2.2b", 2_200_000_000), ("500M", 500_000_000),
                                        ("20K", 20_000), ("1T", 10**12), ("2200000", 2_200_000), ("2_200_000", 2_200_000),
                                        ("8.9B", 8_900_000_000), ("1G", 10**9), (12345, 12345)])
def test_parse_token_count(text, value):
    assert parse_token_count(text) == value


@pytest.mark.parametrize("bad", ["", "1.1X", "B", "-5M", "0", "1e9", "ten"])
def test_parse_token_count_rejects(bad):
    with pytest.raises(LayerprobeError, match="--tokens must be"):
        parse_token_count(bad)


def test_steps_for_tokens():
    assert steps_for_tokens(10_000 * 512 * 256, 512, 256) == 10_000
    assert steps_for_tokens(10_000 * 512 * 256 + 1, 512, 256) == 10_001
    assert steps_for_tokens(1, 512, 256) == 1
