"""The self-contained HTML page of a comparison: headline table, findings, definitions, figures, inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .._version import __version__
from ..comparison import HEADLINE_DEFINITIONS, paper_checks
from ..results import package_versions
from .compare_figures import styles
from .compare_table import HEADLINE_COLUMNS, cell, interval_lines, table_frame, visible_columns
from .depth_findings import depth_findings
from .html import esc, img_tag, page

def _colours(comp, styles) -> dict[str, str]:
    """Swatch colour of each model label and of each seed group (its first run's)."""
    out = {m.label: styles[m.label]["color"] for m in comp.models}
    for m in comp.models:
        out.setdefault(m.seed_group, styles[m.label]["color"])
    return out


def _headline_html(comp, styles, df=None) -> str:
    """The headline table: `df` (default: one row per model, or per seed group when a scheme has several seeds)."""
    df = table_frame(comp) if df is None else df
    colours = _colours(comp, styles)
    cols = visible_columns(df)
    head = "".join(f'<th class="t">{esc(h)}</th>' if f is None else f"<th>{esc(h)}</th>" for _, h, f in cols)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c, _, f in cols:
            text = esc(cell(row, c, f))
            if c == "model":
                color = colours.get(row["model"], "#777")
                text = f'<span class="swatch" style="background:{color}"></span>{text}'
            elif c == "seeds" and pd.notna(row.get("seed_list")) and str(row.get("seed_list")):
                text += f' <span class="muted">({esc(str(row["seed_list"]).replace(" ", ", "))})</span>'
            elif (c in ("removable_layers", "removable_relative") and pd.notna(row[c]) and pd.notna(row["layers"])
                  and "removable_which" in row):
                listed = row.get("removable_which" if c == "removable_layers" else "removable_relative_which")
                which = [int(x) for x in str(listed if pd.notna(listed) else "").split()]
                rest = [ell for ell in range(int(row["layers"])) if ell not in which]
                if which and rest and len(which) > len(rest):
                    text += f' <span class="muted">all but ℓ = {esc(", ".join(map(str, rest)))}</span>'
                elif which and rest:
                    text += f' <span class="muted">ℓ = {esc(", ".join(map(str, which)))}</span>'
                elif which:
                    text += ' <span class="muted">all</span>'
            cells.append(f'<td class="t">{text}</td>' if f is None else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="headline"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _definitions_html(comp) -> str:
    items = []
    shown = {c for c, _, _ in visible_columns(table_frame(comp))}
    names = {c: h for c, h, _, _, _ in HEADLINE_COLUMNS}
    for key, text in HEADLINE_DEFINITIONS.items():
        if key in shown:
            if key == "removable_layers":
                text = text.replace("the threshold", f"the threshold of {comp.threshold:g} nats")
            items.append(f"<dt>{esc(names[key])}</dt><dd>{esc(text)}</dd>")
    return f'<dl class="defs">{"".join(items)}</dl>'


def findings(comp) -> list[str]:
    """Plain sentences read off the headline numbers: each lists every model, ordered, nothing more."""
    df = table_frame(comp)  # per seed group (means ± sd) when a scheme has several seeds
    out = []

    def ranked(col, fmt, descending=False, prefix=""):
        d = df.dropna(subset=[col]) if col in df else df.iloc[0:0]
        if len(d) < 2:
            return None
        d = d.sort_values(col, ascending=not descending)
        return ", ".join(f"{r['model']} {prefix}{cell(r, col, fmt)}" for _, r in d.iterrows())

    text = ranked("perplexity", ".2f")
    if text:
        out.append(f"Perplexity, lowest first: {text}.")
    text = ranked("variance_growth_factor", ".3g", descending=True, prefix="×")
    if text:
        out.append(f"Fitted growth of the output variance from the first layer to the last: {text} "
                   "(×1 = flat; Pre-LN's Curse of Depth shows as a large factor).")
    text = ranked("grad_ratio", ".3g")
    if text:
        out.append(f"Gradient norm of the last quarter of layers over the first quarter: {text} "
                   "(< 1: deep layers get smaller gradients, as the Mix-LN paper reports for Pre-LN; "
                   "> 1: early layers do, as for Post-LN).")
    text = ranked("deep_half_share", ".0%")
    if text:
        out.append(f"Share of the single-layer removal cost that falls on the deeper half, lowest first: {text} "
                   "(under 50%: the deep layers matter less than the early ones).")
    if "removable_layers" in df and df["removable_layers"].notna().sum() >= 1:
        d = df.dropna(subset=["removable_layers"])
        parts = []
        for _, r in d.iterrows():
            count = cell(r, "removable_layers", "d")
            parts.append(f"{r['model']} {count}{' of ' if '±' in count else '/'}{int(r['layers'])}")
        out.append(f"Layers whose removal alone costs less than {comp.threshold:g} nats: " + ", ".join(parts) +
                   " (an absolute threshold: it depends on the models' scale).")
    out += depth_findings([(m.label, m.analysis.layers if m.analysis is not None else None) for m in comp.models])
    return out


def _inputs_html(comp, out: Path, styles) -> str:
    rows = []
    for m in comp.models:
        links = []
        for f in m.folders:
            idx = f / "index.html"
            shown = esc(str(f))
            try:
                rel = Path(os.path.relpath(idx.resolve(), out.resolve()))
            except ValueError:
                rel = None
            if idx.is_file() and rel is not None and not str(rel).startswith(".."):
                links.append(f'<a href="{esc(rel.as_posix())}"><code>{shown}</code></a>')
            else:
                links.append(f"<code>{shown}</code>")
        a = m.analysis
        data = (f"{a.manifest.get('data')} · {a.manifest.get('samples')} × {a.manifest.get('seq_len')} tokens"
                if a is not None else "")
        src = (a.summary.get("norm_scheme_source") if a is not None else "") or ""
        color = styles[m.label]["color"]
        training = ""
        if m.training is not None:
            t = m.train_manifest
            done = int(m.training["step"].max())
            training = f"{t.get('status', '')} {done}/{t.get('total_steps', done)} steps ({t.get('preset', '?')} preset)"
            if t.get("diverged_at"):
                training += f", diverged at step {t['diverged_at']}"
        rows.append("<tr>" + "".join([
            f'<td><span class="swatch" style="background:{color}"></span>{esc(m.label)}</td>',
            f"<td>{esc(m.norm_scheme)}" + (f' <span class="muted">· {esc(src)}</span>' if src else "") + "</td>",
            f"<td>{esc(', '.join(m.kinds))}</td>",
            f"<td>{esc(training)}</td>",
            f"<td>{esc(data)}</td>",
            f"<td>{'<br>'.join(links)}</td>",
        ]) + "</tr>")
    head = "".join(f'<th class="t">{h}</th>' for h in ("model", "norm scheme (how known)", "results", "training",
                                                        "analysed on", "folders"))
    return f'<table class="inputs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


EXTRA_CSS = """
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:middle}
.muted{color:#777;font-size:12px}
table.headline td,table.headline th{padding:4px 10px}
dl.defs{font-size:13px;color:#333;display:grid;grid-template-columns:max-content 1fr;gap:2px 12px}
dl.defs dt{font-weight:600} dl.defs dd{margin:0}
ul.findings li{margin:3px 0}
td.t,th.t{text-align:left}
figure.wide{grid-column:1/-1}
table.inputs td{text-align:left}
"""


def _section(title: str, figs: list[dict], out: Path, intro: str = "") -> str:
    if not figs:
        return ""
    wide = ' class="wide"'
    body = "".join(
        f"<figure{wide if f.get('wide') else ''}>{img_tag(out / f['file'], f['caption'])}"
        f"<figcaption>{esc(f['caption'])}</figcaption></figure>"
        for f in figs)
    return f"<h2>{esc(title)}</h2>{intro}<div class=\"grid\">{body}</div>"


def render_html(comp, out: Path, title: str) -> str:
    """The page for `comp`, whose figures are already drawn in `out`."""
    model_styles = styles(comp)
    figs = comp.figures
    by_section = {s: [f for f in figs if f["section"] == s] for s in ("per-layer", "angular", "training")}
    schemes = ", ".join(dict.fromkeys(m.norm_scheme for m in comp.models))
    versions = package_versions()
    subtitle = (f"{len(comp.models)} model(s) · norm schemes {esc(schemes)} · layer index ℓ is 0-based · "
                f"layerprobe {esc(__version__)} · torch {esc(versions.get('torch', '?'))} · "
                f"transformers {esc(versions.get('transformers', '?'))}")
    parts = ["<h2>At a glance</h2>", _headline_html(comp, model_styles)]
    if comp.seeded:
        parts.append("<details><summary>Every run (one row per seed)</summary>" +
                     _headline_html(comp, model_styles, comp.headline) + "</details>")
    facts = list(comp.notes) + findings(comp) + [line[0].upper() + line[1:] for line in interval_lines(comp)]
    specs = {(m.analysis.manifest.get("data"), m.analysis.manifest.get("seq_len"), m.analysis.manifest.get("samples"))
             for m in comp.models if m.analysis is not None}
    if len(specs) > 1:
        facts.append("Note: the models were analysed on different data (or numbers of tokens), so their "
                     "perplexities and Δloss are not directly comparable; the per-layer shapes are.")
    if facts:
        parts.append('<ul class="findings">' + "".join(f"<li>{esc(s)}</li>" for s in facts) + "</ul>")
    checks = paper_checks(comp.headline)
    if checks:
        rule = ("<p class=\"muted\">A claim is reproduced when it holds for every combination of the schemes' "
                "seeds (every seed of one beats every seed of the other: their min–max ranges do not overlap), not "
                "reproduced when it holds for none, and not decided otherwise. On one seed per scheme it rests on "
                "one training run each; <code>train-reference --seeds N</code> trains more.</p>")
        parts.append("<h3>Where these models reproduce the papers</h3><ul class=\"findings\">" +
                     "".join(f"<li>{esc(c['sentence'])}</li>" for c in checks) + "</ul>" + rule)
    parts.append("<details open><summary>How each number is defined</summary>" + _definitions_html(comp) + "</details>")
    x_note = ("<p class=\"muted\">The models have different depths, so the x axis is the normalised depth "
              "ℓ/(L−1).</p>" if comp.depth == "normalised" else "")
    parts.append(_section("Per-layer curves", by_section["per-layer"], out, x_note))
    parts.append(_section("Angular distance maps", by_section["angular"], out))
    parts.append(_section("Training", by_section["training"], out))
    parts.append("<h2>Inputs</h2>" + _inputs_html(comp, out, model_styles))
    parts.append(f"<p class=\"muted\">Made with <code>{esc(comp.made_with)}</code>. Tables: <code>headline.csv</code>, "
                 "<code>per_layer.csv</code>" + (", <code>training.csv</code>" if any(m.training is not None for m in comp.models) else "")
                 + " next to this file.</p>")
    html = page(title, subtitle, "".join(parts))
    return html.replace("</style>", EXTRA_CSS + "</style>", 1)


