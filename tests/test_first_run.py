"""What a new user sees in the first minutes (issue 11): no foreign progress bars, no colour-only marks, no
captions that promise what is not drawn, and a word when two results read different tokens."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

import layerprobe
from layerprobe.report import render_analysis, render_sweep


@pytest.fixture(scope="module")
def tiny_results(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("first-run")
    loaded = layerprobe.load_model(str(tiny_dir("llama", tokenizer=True)))
    analysis = layerprobe.analyze(loaded, data="builtin", seq_len=16, samples=4, progress=False)
    folder = render_analysis(analysis, root / "model")
    sweep = layerprobe.prune_sweep(loaded, mode="layer,block", data="builtin", seq_len=16, samples=4, seed=1,
                                   progress=False)
    render_sweep(sweep, folder)
    return analysis, sweep, folder


def _plain(renderable) -> str:
    console = Console(width=120, color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


def test_marks_show_without_colour(tiny_results):
    from layerprobe.report.analysis import summary_table
    from layerprobe.report.pruning import _layer_table

    analysis, sweep, _ = tiny_results
    for text in (_plain(summary_table(analysis)), _plain(_layer_table(sweep.rows("layer")))):
        assert "cyan" not in text
        assert "•: the quarter" in text
        marked = [line for line in text.splitlines() if line.lstrip().startswith("• ")]
        assert len(marked) == max(1, analysis.summary["num_layers"] // 4)


def test_norm_scheme_wording(tiny_results):
    from layerprobe.report.analysis import summary_table

    title = _plain(summary_table(tiny_results[0])).splitlines()[0]
    assert "norm scheme pre (architecture: llama)" in title and "((" not in title and "))" not in title


def test_curves_caption_names_only_what_is_drawn(tiny_results):
    from layerprobe.report.pruning import curves

    _, sweep, folder = tiny_results
    figures = json.loads((folder / "manifest.json").read_text())["prune-sweep"]["figures"]
    caption = next(f["caption"] for f in figures if f["file"] == "prune_curves.png")
    drawn = [label for label, _, _ in curves(sweep)]
    assert drawn and all(label in caption for label in drawn)
    assert "greedy" not in caption and "ranked" not in caption  # this sweep drew neither


def test_model_page_says_when_analysis_and_sweep_read_different_tokens(tiny_results):
    _, _, folder = tiny_results
    html = (folder / "index.html").read_text(encoding="utf-8")
    assert "read different tokens" in html and "(seed 0)" in html and "(seed 1)" in html


def test_model_page_quiet_when_the_tokens_agree(tiny_dir, tmp_path):
    loaded = layerprobe.load_model(str(tiny_dir("llama", tokenizer=True)))
    folder = render_analysis(layerprobe.analyze(loaded, data="builtin", seq_len=16, samples=4, progress=False),
                             tmp_path / "m")
    render_sweep(layerprobe.prune_sweep(loaded, mode="layer", data="builtin", seq_len=16, samples=4,
                                        progress=False), folder)
    assert "read different tokens" not in (folder / "index.html").read_text(encoding="utf-8")


def test_transformers_progress_bars_are_off_while_loading(capfd):
    """The GGUF reader's plain tqdm bar and transformers' own bars stay silent inside the loader's quiet
    block, and both switches are as they were afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from layerprobe.loading import _Quiet

    hf_logging.enable_progress_bar()
    original = gguf_utils.tqdm
    capfd.readouterr()
    with _Quiet():
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    assert capfd.readouterr().err == ""
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
    for _ in gguf_utils.tqdm(range(3), desc="visible", disable=False):
        pass
    assert "visible" in capfd.readouterr().err  # the check above can fail: tqdm does write here
