"""Self-contained HTML pages: figures embedded as data URIs, inline CSS, no script, no network.

Every string that comes from the user (model names, paths, data specs) goes through `esc`.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

from ..io import write_text
from ..results import read_manifest
from .confidence import STABILITY_CAPTION, STABILITY_HEADERS, interval_note, stability_rows, verdict_lines

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin-bottom:16px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px;background:#fff}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:right} th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left} table.kv td{text-align:left}
figure{margin:16px 0;background:#fff;border:1px solid #e6e6e6;padding:8px;border-radius:6px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#444;font-size:13px;margin-top:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:12px}
details{margin:8px 0} summary{cursor:pointer;color:#0072B2}
code{background:#eee;padding:1px 4px;border-radius:3px}
"""

# Which table each command's section shows, by manifest section name.
SECTION_TABLES = {"analyze": "layers.csv", "prune-sweep": "sweep.csv"}
SECTION_TITLES = {"analyze": "Per-layer analysis", "prune-sweep": "Pruning sweep", "compare": "Comparison"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def figure_html(folder: Path, fig: dict) -> str:
    path = Path(folder) / fig["file"]
    if not path.is_file():
        return ""
    return f"<figure>{img_tag(path, fig.get('caption') or fig['file'])}<figcaption>{esc(fig.get('caption', ''))}</figcaption></figure>"


def fmt_cell(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return esc(v)


def table_html(df: pd.DataFrame, max_rows: int = 500) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{fmt_cell(v)}</td>" for v in row) + "</tr>"
        for row in df.head(max_rows).itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def key_value_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{fmt_cell(v)}</td></tr>" for k, v in items.items() if v is not None)
    return f'<table class="kv">{rows}</table>'


def page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><div class=\"sub\">{subtitle}</div>{body}</main></body></html>\n"
    )


def _analyze_summary(section: dict) -> str:
    s = section.get("summary", {})
    items = {
        "loss (mean next-token cross-entropy, nats)": s.get("loss"),
        "perplexity": s.get("perplexity"),
        "layers": s.get("num_layers"),
        "norm scheme": f"{s.get('norm_scheme')} — {s.get('norm_scheme_source')}",
        "measured norm placement": s.get("measured_norm_scheme"),
        "parameters": s.get("parameters"),
        "data": f"{section.get('data')} · {section.get('samples')} samples × {section.get('seq_len')} tokens · seed {section.get('seed')}",
        "angular distance on": f"{section.get('tokens')} token(s)",
        "dtype / device": f"{section.get('dtype')} / {section.get('device')}",
        "wall time (s)": section.get("wall_time_s"),
        "intervals": interval_note(section),
    }
    return key_value_table(items)


def _sweep_summary(section: dict) -> str:
    """The summary's numbers, then the removal verdict and warnings, then the rankings' stability."""
    s = section.get("summary", {})
    shown = {k: v for k, v in s.items() if k not in ("ranking_stability", "warnings")}
    if interval_note(section):
        shown["intervals"] = interval_note(section)
    out = [key_value_table(shown)]
    out += [f'<p class="note">{esc(line)}</p>' for line in verdict_lines(s)]
    rows = stability_rows(s)
    if rows:
        out.append("<h3>How stable the rankings are over the samples</h3>"
                   + table_html(pd.DataFrame(rows, columns=list(STABILITY_HEADERS)))
                   + f'<p class="note">{esc(STABILITY_CAPTION)}</p>')
    return "".join(out)


TOKEN_KEYS = ("data", "text_column", "seq_len", "samples", "seed")  # what decides which tokens a command read


def _tokens_note(manifest: dict) -> str | None:
    """A sentence saying which tokens analyze and prune-sweep each read, when they read different ones."""
    a, p = manifest.get("analyze"), manifest.get("prune-sweep")
    if not (isinstance(a, dict) and isinstance(p, dict)) or all(a.get(k) == p.get(k) for k in TOKEN_KEYS):
        return None

    def tokens(s: dict) -> str:
        return f"{s.get('samples')} samples × {s.get('seq_len')} tokens of {s.get('data')} (seed {s.get('seed')})"

    return (f"The analysis and the pruning sweep read different tokens: the analysis {tokens(a)}, the sweep "
            f"{tokens(p)}. Their losses and perplexities are not directly comparable.")


def write_model_index(folder: str | Path) -> Path:
    """index.html for one model's folder: every command's section whose results are there."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    parts = []
    name = None
    for key, section in manifest.items():
        if not isinstance(section, dict) or "figures" not in section:
            continue
        name = name or section.get("model_name") or section.get("model")
        body = [f"<h2>{esc(SECTION_TITLES.get(key, key))}</h2>"]
        if key == "analyze":
            body.append(_analyze_summary(section))
        elif key == "prune-sweep" and section.get("summary"):
            body.append(_sweep_summary(section))
        elif section.get("summary"):
            body.append(key_value_table(section["summary"]))
        body.append('<div class="grid">' + "".join(figure_html(folder, f) for f in section["figures"]) + "</div>")
        table_file = folder / SECTION_TABLES.get(key, "")
        if key in SECTION_TABLES and table_file.is_file():
            df = pd.read_csv(table_file)
            body.append(f"<details><summary>{esc(table_file.name)} ({len(df)} rows)</summary>{table_html(df)}</details>")
        parts.append("".join(body))
    versions = next((s.get("versions") for s in manifest.values() if isinstance(s, dict) and s.get("versions")), {})
    subtitle = (f"model <code>{esc(name)}</code> · layerprobe {esc(manifest.get('layerprobe_version', '?'))}"
                f" · torch {esc(versions.get('torch', '?'))} · transformers {esc(versions.get('transformers', '?'))}"
                " · layer index ℓ is 0-based")
    note = _tokens_note(manifest)
    if note:
        parts.insert(0, f'<p class="note">{esc(note)}</p>')
    out = folder / "index.html"
    write_text(out, page(f"layerprobe — {name}", subtitle, "".join(parts) or "<p>No results yet.</p>"))
    return out
