"""prune-sweep against a naive implementation written here: for every removal, rebuild the layer
list without the removed layers and run the whole model, then compute loss, KL and top-1 from
the full logits. Plus saving (reload + generate with the KV cache), the CLI, and bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from generation_checks import assert_generate_matches_recompute, assert_left_padding_is_invisible
from tiny_models import VOCAB, make_tiny
from torch import nn
from typer.testing import CliRunner

from layerprobe.cli import app
from layerprobe.errors import LayerprobeError
from layerprobe.loading import load_model
from layerprobe.pruning import PrefixRunner, format_removed, parse_removed, prune_sweep, pruned, pruned_copy, save_pruned
from layerprobe.pruning.sweep import ranking_sets

LAYERS = 5
ARCHS = {
    # arch: (path of the layer list, config overrides). A large init makes every layer matter,
    # so the losses of different removals differ and a wrong layer would show.
    "llama": ("model.layers", dict(num_hidden_layers=LAYERS, initializer_range=0.25)),
    # Alternating sliding-window and full attention: each layer gets its own mask from
    # layer_types, which the pruned config must keep in step with the layers.
    "qwen2": ("model.layers", dict(num_hidden_layers=LAYERS, initializer_range=0.25, use_sliding_window=True,
                                   sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2
                                   + ["sliding_attention"])),
    "gpt2": ("transformer.h", dict(n_layer=LAYERS, initializer_range=0.25)),
    "gpt_neox": ("gpt_neox.layers", dict(num_hidden_layers=LAYERS, initializer_range=0.25)),
    "opt": ("model.decoder.layers", dict(num_hidden_layers=LAYERS, init_std=0.25)),
}
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            folder = tiny_dir(arch, **ARCHS[arch][1])
            cache[arch] = load_model(str(folder), device="cpu")
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    """5 samples of 12 tokens: with batch size 2 the last batch holds one sample."""
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    np.save(path, np.random.default_rng(1).integers(3, VOCAB, size=(5, 12)))
    return path


# -- the naive reference -------------------------------------------------------------------------
def naive_pruned(model, path: str, remove) -> nn.Module:
    """A copy of `model` whose layer list lacks `remove`, config and layer_idx fixed by hand."""
    m = copy.deepcopy(model)
    *parent_path, name = path.split(".")
    parent = m
    for p in parent_path:
        parent = getattr(parent, p)
    old = getattr(parent, name)
    keep = [i for i in range(len(old)) if i not in set(remove)]
    setattr(parent, name, nn.ModuleList([old[i] for i in keep]))
    cfg = m.config
    cfg.num_hidden_layers = len(keep)  # GPT-2 maps it to n_layer
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    for new, layer in enumerate(getattr(parent, name)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    return m


def naive_measures(full_model, pruned_model, ids: torch.Tensor, batch_size: int) -> dict:
    """Loss, KL(full ‖ pruned) and top-1 agreement from whole logits, summed over batches."""
    ce = kl = 0.0
    top1 = n = 0
    with torch.no_grad():
        for batch in torch.split(ids, batch_size):
            # float64 from the logits on: the reference should not carry float32 rounding of its own.
            lf = full_model(input_ids=batch, use_cache=False).logits[:, :-1].double()
            lp = pruned_model(input_ids=batch, use_cache=False).logits[:, :-1].double()
            tgt = batch[:, 1:]
            ce += float(F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), reduction="sum"))
            kl += float(F.kl_div(F.log_softmax(lp, -1), F.log_softmax(lf, -1), log_target=True, reduction="sum"))
            top1 += int((lp.argmax(-1) == lf.argmax(-1)).sum())
            n += tgt.numel()
    return {"loss": ce / n, "kl": kl / n, "top1_agreement": top1 / n}


def naive_full_loss(model, ids, batch_size) -> float:
    ce, n = 0.0, 0
    with torch.no_grad():
        for batch in torch.split(ids, batch_size):
            lf = model(input_ids=batch, use_cache=False).logits[:, :-1].double()
            ce += float(F.cross_entropy(lf.reshape(-1, lf.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
            n += batch[:, 1:].numel()
    return ce / n


def assert_row_matches(row, ref, full_loss):
    assert row["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    assert row["delta_loss"] == pytest.approx(ref["loss"] - full_loss, rel=1e-4, abs=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(ref["loss"]), rel=RTOL)
    assert row["kl"] == pytest.approx(ref["kl"], rel=RTOL)
    assert row["top1_agreement"] == pytest.approx(ref["top1_agreement"], abs=1e-12)


# -- equality with the naive implementation --------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_and_block_sweeps_equal_naive(tiny, ids_file, arch):
    lm = tiny(arch)
    path = ARCHS[arch][0]
    ids = torch.from_numpy(np.load(ids_file))
    result = prune_sweep(lm, mode="layer,block", block_size="2,4", data=str(ids_file), batch_size=2,
                         chunk_elements=3 * VOCAB, progress=False)  # 3 rows per chunk: chunking is exercised
    t = result.table
    full_loss = naive_full_loss(lm.model, ids, 2)
    assert t.iloc[0]["removed"] == "none" and t.iloc[0]["mode"] == "full"
    assert t.iloc[0]["loss"] == pytest.approx(full_loss, rel=RTOL)
    assert t.iloc[0]["kl"] == 0 and t.iloc[0]["top1_agreement"] == 1
    assert (t["tokens"] == ids[:, 1:].numel()).all()
    layer = result.rows("layer")
    assert list(layer["first_layer"]) == list(range(LAYERS))
    expected_blocks = [(l, n) for n in (2, 4) for l in range(LAYERS - n + 1)]
    block = result.rows("block")
    assert [(int(r.first_layer), int(r.block_size)) for r in block.itertuples()] == expected_blocks
    for _, row in pd.concat([layer, block]).iterrows():
        removed = parse_removed(row["removed"])
        ref = naive_measures(lm.model, naive_pruned(lm.model, path, removed), ids, 2)
        assert_row_matches(row, ref, full_loss)
    # Removals differ: a sweep that measured the same model every time would fail here.
    assert layer["loss"].nunique() == LAYERS
    assert (layer["kl"] > 1e-3).all() and (layer["top1_agreement"] < 1).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_naive_greedy(tiny, ids_file, arch):
    lm = tiny(arch)
    path = ARCHS[arch][0]
    ids = torch.from_numpy(np.load(ids_file))
    result = prune_sweep(lm, mode="greedy", steps=3, data=str(ids_file), batch_size=2, progress=False)
    greedy = result.rows("greedy")
    full_loss = naive_full_loss(lm.model, ids, 2)
    removed: list[int] = []
    for step, row in zip(range(1, 4), greedy.itertuples(index=False)):
        trials = {j: naive_measures(lm.model, naive_pruned(lm.model, path, removed + [j]), ids, 2)
                  for j in range(LAYERS) if j not in removed}
        best = min(trials, key=lambda j: (trials[j]["loss"], j))
        removed.append(best)
        assert row.step == step and row.added_layer == best
        assert parse_removed(row.removed) == tuple(sorted(removed))
        assert_row_matches(row._asdict(), trials[best], full_loss)


def test_ranked_sets_follow_the_analysis(tiny, ids_file):
    from layerprobe import analyze

    lm = tiny("llama")
    ids = torch.from_numpy(np.load(ids_file))
    result = prune_sweep(lm, mode="ranked", by="all", steps=3, data=str(ids_file), batch_size=2, progress=False)
    a = analyze(lm, data=str(ids_file), batch_size=2, grad=False, progress=False)
    bi_order = list(a.layers.sort_values(["block_influence", "layer"])["layer"])
    ad_order = list(a.layers.sort_values(["angular_distance", "layer"])["layer"])
    full_loss = naive_full_loss(lm.model, ids, 2)
    for by, expect in {
        "influence": [tuple(sorted(bi_order[:k])) for k in (1, 2, 3)],
        "angular-layer": [tuple(sorted(ad_order[:k])) for k in (1, 2, 3)],
        "last": [(4,), (3, 4), (2, 3, 4)],
    }.items():
        rows = result.table[(result.table["mode"] == "ranked") & (result.table["by"] == by)]
        assert [parse_removed(r) for r in rows["removed"]] == expect, by
    angular = result.table[(result.table["mode"] == "ranked") & (result.table["by"] == "angular")]
    for k, r in zip((1, 2, 3), angular.itertuples(index=False)):
        sub = a.angular[a.angular["n"] == k]
        first = int(sub.sort_values(["angular_distance", "layer"]).iloc[0]["layer"])
        assert parse_removed(r.removed) == tuple(range(first, first + k))
        ref = naive_measures(lm.model, naive_pruned(lm.model, "model.layers", parse_removed(r.removed)), ids, 2)
        assert_row_matches(r._asdict(), ref, full_loss)
    assert result.manifest["ranking_source"].startswith("analyze")


def test_ranking_sets_by_hand():
    layers = pd.DataFrame({"layer": range(4), "block_influence": [0.5, 0.1, 0.3, 0.1],
                           "angular_distance": [0.4, 0.2, 0.1, 0.3]})
    angular = pd.DataFrame([(l, n, d) for (l, n, d) in
                            [(0, 1, .4), (1, 1, .2), (2, 1, .1), (3, 1, .3), (0, 2, .5), (1, 2, .25), (2, 2, .3)]],
                           columns=["layer", "n", "angular_distance"])
    assert ranking_sets("influence", 4, 3, layers, angular) == [(1,), (1, 3), (1, 2, 3)]  # ties: lower index first
    assert ranking_sets("angular-layer", 4, 2, layers, angular) == [(2,), (1, 2)]
    assert ranking_sets("angular", 4, 2, layers, angular) == [(2,), (1, 2)]
    assert ranking_sets("last", 4, 2, None, None) == [(3,), (2, 3)]


def test_prefix_runner_reproduces_the_full_model(tiny):
    lm = tiny("qwen2")
    from layerprobe.anatomy import find_anatomy

    runner = PrefixRunner(lm.model, find_anatomy(lm.model))
    ids = torch.from_numpy(np.random.default_rng(3).integers(3, VOCAB, size=(2, 10)))
    cap = runner.capture(ids)
    with torch.no_grad():
        again = runner.run(cap.inputs[0], 0, set(), cap.calls)
        logits = runner.logits(runner.final_hidden(again))
        own = lm.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(again, cap.output)
    torch.testing.assert_close(logits, own, rtol=1e-6, atol=1e-6)
    assert runner.layer_calls == LAYERS


def test_a_tail_that_is_not_rebuilt_runs_through_the_model_or_is_refused(tmp_path, monkeypatch):
    """Gemma 2 soft-caps its logits; a runner that forgets it must not produce numbers of its own:
    it runs the model's own final path (checked against its logits), and where that fails too it refuses."""
    import layerprobe.pruning.prefix as prefix
    from layerprobe.anatomy import find_anatomy

    lm = load_model(str(make_tiny("gemma2", tmp_path / "g2", num_hidden_layers=3, final_logit_softcapping=0.5)))
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    runner = PrefixRunner(lm.model, find_anatomy(lm.model))
    assert runner.softcap  # the sweep handles it ...
    runner.capture(ids)
    assert not runner.own_tail
    runner2 = PrefixRunner(lm.model, find_anatomy(lm.model))
    runner2.softcap = None  # ... and when it is missing, the model's own path is used
    cap = runner2.capture(ids)
    assert runner2.own_tail
    # Layer 1 removed by hand: a hook that returns its input; the model's own logits are the reference.
    layers = lm.model.model.layers
    handle = layers[1].register_forward_hook(lambda m, args, out: args[0] if isinstance(out, torch.Tensor)
                                             else (args[0],) + tuple(out[1:]))
    with torch.no_grad():
        want = lm.model(input_ids=ids, use_cache=False).logits
    handle.remove()
    with torch.inference_mode():
        got = runner2.logits(runner2.final_hidden(runner2.run(cap.inputs[1], 1, {1}, cap.calls)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def broken(*args, **kwargs):
        raise RuntimeError("this model's own path cannot run from a layer's output")

    monkeypatch.setattr(prefix, "own_path_logits", broken)
    runner3 = PrefixRunner(lm.model, find_anatomy(lm.model))
    runner3.softcap = None
    with pytest.raises(LayerprobeError, match="not final norm"):
        runner3.capture(ids)


# -- the pruned model ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_save_pruned_reloads_and_generates(tiny, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    lm = tiny(arch)
    remove = [1, 3]
    out = save_pruned(lm, remove, tmp_path / "small")
    info = json.loads((out / "layerprobe_pruned.json").read_text())
    assert info["removed"] == remove and info["num_layers"] == LAYERS - 2
    assert info["check"]["max_relative_logit_difference"] <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = reloaded.config
    assert cfg.num_hidden_layers == LAYERS - 2
    if arch == "qwen2":
        assert cfg.layer_types == [lm.config.layer_types[i] for i in (0, 2, 4)]
    layers = find_layers(reloaded, ARCHS[arch][0])
    assert [m.layer_idx for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")] == \
        [i for i in range(LAYERS - 2) for m in layers[i].modules() if hasattr(m, "layer_idx")]
    # The original model is whole again after saving.
    assert len(find_layers(lm.model, ARCHS[arch][0])) == LAYERS and lm.config.num_hidden_layers == LAYERS
    ids = torch.from_numpy(np.random.default_rng(5).integers(3, VOCAB, size=(2, 9)))
    in_memory = pruned_copy(lm.model, remove)
    reference = naive_pruned(lm.model, ARCHS[arch][0], remove)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        torch.testing.assert_close(got, in_memory(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # Generation with the KV cache (layer_idx are the cache slots): each step's logits equal a full recompute, also
    # with a left-padded row; the in-memory copy generates the same tokens.
    with_cache = assert_generate_matches_recompute(reloaded, ids, steps=6)
    assert_left_padding_is_invisible(reloaded, VOCAB)
    with torch.no_grad():
        assert torch.equal(in_memory.generate(ids, use_cache=True, max_new_tokens=6, do_sample=False, pad_token_id=0),
                           with_cache)
    # Greedy decoding by hand from the naive model gives the same tokens.
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = reference(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq, with_cache)


@pytest.mark.parametrize("scheme", ["mix", "sandwich", "hybrid_star"])
def test_save_pruned_reference_model_generates_with_its_cache(tmp_path, scheme):
    """A pruned reference checkpoint, reloaded: cached decoding equals a full recompute (logits, 1e-5), left padding
    included, and the cache slots are the new layer indices."""
    from transformers import AutoModelForCausalLM

    from layerprobe.reference import LayerprobeConfig, LayerprobeForCausalLM

    torch.manual_seed(0)
    config = LayerprobeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                              num_attention_heads=4, max_position_embeddings=64, norm_scheme=scheme,
                              post_ln_ratio=0.4)
    LayerprobeForCausalLM(config).save_pretrained(tmp_path / "ref")
    out = save_pruned(load_model(str(tmp_path / "ref")), [1, 3], tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [layer.layer_idx for layer in reloaded.model.layers] == list(range(LAYERS - 2))
    ids = torch.from_numpy(np.random.default_rng(7).integers(3, VOCAB, size=(2, 6)))
    assert_generate_matches_recompute(reloaded, ids, steps=5)
    assert_left_padding_is_invisible(reloaded, VOCAB)


def find_layers(model, path):
    obj = model
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def test_pruned_context_restores_the_model(tiny):
    lm = tiny("qwen2")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    types = list(lm.config.layer_types)
    with pruned(lm.model, [0, 4]) as m:
        assert len(m.model.layers) == 3 and m.config.num_hidden_layers == 3
        assert m.config.layer_types == [types[i] for i in (1, 2, 3)]
        assert [l.self_attn.layer_idx for l in m.model.layers] == [0, 1, 2]
    assert len(lm.model.model.layers) == LAYERS and lm.config.layer_types == types
    assert [l.self_attn.layer_idx for l in lm.model.model.layers] == list(range(LAYERS))
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_save_refuses_a_model_whose_layers_depend_on_their_index(tmp_path):
    """GPT-2 with scale_attn_by_inverse_layer_idx: re-indexed layers compute something else."""
    folder = make_tiny("gpt2", tmp_path / "g", n_layer=4, initializer_range=0.5, scale_attn_by_inverse_layer_idx=True)
    lm = load_model(str(folder))
    with pytest.raises(LayerprobeError, match="depend on their index"):
        save_pruned(lm, [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_config_changes_rewrite_every_per_layer_entry():
    """Counts, per-layer lists, index lists, layer-keyed dicts and cyclic patterns, by hand for keep = 0, 2, 3."""
    from transformers import PretrainedConfig

    from layerprobe.pruning.surgery import config_changes

    cfg = PretrainedConfig(num_hidden_layers=4, decoder_layers=4, layer_types=["full_attention", "sliding_attention", "conv", "moe"], moe_layers=[1, 3],
                           head_dim=4, per_layer_config={"2": {"head_dim": 8}, "3": {"head_dim": 16}}, block_types=["r", "r", "att"],
                           architectures=["A", "B", "C", "D"])
    assert config_changes(cfg, [0, 2, 3], 4) == {
        "num_hidden_layers": 3, "decoder_layers": 3, "layer_types": ["full_attention", "conv", "moe"], "moe_layers": [2],
        "per_layer_config": {1: {"head_dim": 8}, 2: {"head_dim": 16}}, "block_types": ["r", "att", "r"],
    }


def test_save_refuses_a_config_that_builds_other_layers_in_one_line(tmp_path):
    """Jamba derives each layer's kind from attn_layer_period/offset: after removing layer 1 the config
    would build layer 2 as another kind. Gemma-4 holds per-layer input embeddings outside the layers,
    sized by the layer count. Both are refused before anything is written."""
    from zoo_models import build

    for model_type, message in [("jamba", "changes what layer 2 becomes.*attn_layer_period"),
                                ("gemma4_text", "resizes model.embed_tokens_per_layer.weight")]:
        model, why = build(model_type)
        assert model is not None, why
        with pytest.raises(LayerprobeError, match=message) as e:
            save_pruned(model, [1], tmp_path / model_type)
        assert "\n" not in str(e.value) and not (tmp_path / model_type).exists()
        assert list(tmp_path.iterdir()) == []  # no temporary left behind either


def test_format_and_parse_removed():
    for removed, text in [((), "none"), ((7,), "7"), ((7, 8, 9), "7-9"), ((3, 7, 8, 9, 12), "3,7-9,12")]:
        assert format_removed(removed) == text
        assert parse_removed(text) == removed


# -- CLI and files ---------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_csv_manifest_figures_and_index_with_analyze(tiny, ids_file, tmp_path):
    lm = tiny("llama")
    folder = lm.spec
    out = tmp_path / "report"
    r = _cli("analyze", folder, "--data", ids_file, "--batch-size", 2, "--no-grad", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    r = _cli("prune-sweep", folder, "--data", ids_file, "--batch-size", 2, "--mode", "all", "--block-size", "all",
             "--steps", 2, "--out", out, "-q", "--remove", "1-2", "--save-pruned", tmp_path / "small")
    assert r.exit_code == 0, r.output
    t = pd.read_csv(out / "sweep.csv", dtype={"removed": str})
    for col in ("mode", "removed", "loss", "delta_loss", "perplexity", "kl", "top1_agreement"):
        assert col in t.columns
    assert t.iloc[0]["removed"] == "none"
    assert set(t["mode"]) == {"full", "layer", "block", "greedy", "ranked", "remove"}
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["prune-sweep"]
    assert "analyze" in manifest  # merged, not overwritten
    assert section["ranking_source"].endswith("(analyze on the same tokens)")  # reused layers.csv
    assert section["saved_pruned"] == str(tmp_path / "small")
    assert "config rewritten for the kept layers: num_hidden_layers" in r.output
    files = [f["file"] for f in section["figures"]]
    assert files == ["prune_layers.png", "prune_blocks.png", "prune_curves.png"]
    for f in files:
        assert (out / f).stat().st_size > 10_000
    html = (out / "index.html").read_text()
    assert "Pruning sweep" in html and "Per-layer analysis" in html and "sweep.csv" in html
    assert "removing one layer" in r.output and "greedy removal" in r.output
    # The rows agree with the Python API on the same tokens.
    api = prune_sweep(lm, mode="layer", data=str(ids_file), batch_size=2, progress=False).table
    np.testing.assert_allclose(t[t["mode"] == "layer"]["loss"].to_numpy(), api[api["mode"] == "layer"]["loss"].to_numpy(),
                               rtol=1e-12)
    assert load_model(str(tmp_path / "small")).config.num_hidden_layers == LAYERS - 2


@pytest.mark.parametrize("args, message", [
    (["--remove", "0-4"], "removes every one of the 5 layers"),
    (["--remove", "2,7"], "layer 7 is out of range; this model has layers 0-4"),
    (["--remove", "-1"], "layer -1 is out of range"),
    (["--mode", "block", "--block-size", "6"], "--block-size 6 is larger than the model allows"),
    (["--mode", "block", "--block-size", "5"], "--block-size 5 is larger than the model allows"),
    (["--mode", "greedy", "--steps", "5"], "--steps 5 is beyond the depth"),
    (["--mode", "ranked", "--steps", "9"], "--steps 9 is beyond the depth"),
    (["--mode", "greedy", "--steps", "0"], "--steps must be at least 1"),
    (["--mode", "sideways"], "unknown --mode sideways"),
    (["--mode", "ranked", "--by", "vibes"], "unknown --by vibes"),
    (["--save-pruned", "x"], "--save-pruned needs --remove"),
    (["--lm-eval-tasks", "hellaswag"], "lm-eval"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, ids_file, tmp_path, args, message):
    lm = tiny("llama")
    r = _cli("prune-sweep", lm.spec, "--data", ids_file, "--out", tmp_path / "o", "-q", *args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert message in lines[0], lines[0]
    assert "Traceback" not in r.output


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_layer_sweep_equals_naive(smollm2):
    lm = smollm2
    result = prune_sweep(lm, mode="layer", samples=2, seq_len=32, batch_size=2, progress=False)
    from layerprobe.data import load_token_blocks

    ids = load_token_blocks("builtin", lm.tokenizer, seq_len=32, samples=2, seed=0)
    L = lm.config.num_hidden_layers
    layer = result.rows("layer")
    assert len(layer) == L == 30
    full_loss = naive_full_loss(lm.model, ids, 2)
    assert result.table.iloc[0]["loss"] == pytest.approx(full_loss, rel=RTOL)
    assert full_loss < 5  # a trained model on English text, not noise
    for l in (0, 7, 15, 29):
        ref = naive_measures(lm.model, naive_pruned(lm.model, "model.layers", [l]), ids, 2)
        assert_row_matches(layer.iloc[l], ref, full_loss)
    # The first layer matters far more than a middle one in a trained model.
    assert layer.iloc[0]["delta_loss"] > 5 * layer.iloc[15]["delta_loss"] > 0


@pytest.mark.slow
def test_lm_eval_scores_each_row_on_a_local_task(tmp_path, smollm2):
    """Downstream accuracy through lm-evaluation-harness, on a task file with local data (no hub)."""
    pytest.importorskip("lm_eval")
    rows = [
        {"question": "The capital of France is", "choices": [" Paris", " banana", " seven"], "answer": 0},
        {"question": "In Python, a function is defined with the keyword", "choices": [" car", " def", " blue"],
         "answer": 1},
        {"question": "Two plus two equals", "choices": [" four", " green", " table"], "answer": 0},
        {"question": "The opposite of hot is", "choices": [" run", " cold", " window"], "answer": 1},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = tmp_path / "local_mc.yaml"
    task.write_text(
        "task: layerprobe_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    lm = smollm2
    result = prune_sweep(lm, remove=[0, 1, 2], samples=2, seq_len=32, batch_size=2, lm_eval_tasks=[str(task)],
                         progress=False)
    acc = result.table["lm_eval:layerprobe_local_mc:acc"]
    assert list(result.table["mode"]) == ["full", "remove"]
    assert acc.iloc[0] >= 0.75  # the whole model knows these
    assert acc.between(0, 1).all() and "lm_eval:layerprobe_local_mc:sample_len" not in result.table


@pytest.mark.slow
def test_smollm2_from_gguf_saves_as_safetensors_and_generates(smollm2, tmp_path):
    """A GGUF-loaded model carries a quantizer marker that save_pretrained refuses; the pruned copy is
    written as plain safetensors with its tokenizer, and the GGUF model is left as it was."""
    out = save_pruned(smollm2, [20, 21, 22], tmp_path / "smol27")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert smollm2.model.hf_quantizer is not None and len(smollm2.model.model.layers) == 30
    small = load_model(str(out), device="cpu")
    assert small.config.num_hidden_layers == 27 and small.tokenizer is not None
    ids = small.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cached = small.model.generate(ids, **kw)
        assert torch.equal(cached, small.model.generate(ids, use_cache=False, **kw))
        with pruned(smollm2.model, [20, 21, 22]):
            assert torch.equal(cached, smollm2.model.generate(ids, **kw))
