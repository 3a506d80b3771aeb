"""Figures draw user strings literally (maths parsing off), so tick labels that matplotlib writes as mathtext
(log axes) must come out as plain Unicode rather than as raw `$\\mathdefault{...}$` markup."""

from __future__ import annotations

from layerprobe.report.style import new_figure, plain_tick_label, save_figure


def test_plain_tick_label():
    assert plain_tick_label("$\\mathdefault{10^{-2}}$") == "10⁻²"
    assert plain_tick_label("$\\mathdefault{10^{0}}$") == "10⁰"
    assert plain_tick_label("$\\mathdefault{2\\times10^{-1}}$") == "2×10⁻¹"
    assert plain_tick_label("$\\mathdefault{-10^{3}}$") == "-10³"
    assert plain_tick_label("0.5") == "0.5" and plain_tick_label("$") == "$"


def test_saved_log_axes_have_no_mathtext_labels(tmp_path):
    fig, ax = new_figure()
    ax.plot([1, 2, 3], [1e-3, 1e-1, 10], label="m$x$ (a user's name)")
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([1, 2, 3], ["$a$", "b", "c"])  # a user's names as tick labels stay as given
    ax.legend()
    save_figure(fig, tmp_path / "f.png")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels and not any("$" in t or "mathdefault" in t for t in labels), labels
    assert any(t.startswith("10") for t in labels), labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["$a$", "b", "c"]
    assert (tmp_path / "f.png").stat().st_size > 0
