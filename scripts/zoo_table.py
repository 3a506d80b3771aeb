"""Run the zoo check (tests/zoo_check.py) on every causal-LM architecture transformers ships and
print the README's coverage table (Markdown), one row per architecture.

    OMP_NUM_THREADS=1 python scripts/zoo_table.py [--json out.json] [--readme README.md] [model_type ...]

--readme replaces the text between the README's zoo-table markers with the table (~1 min on one core).

right: equal to the independent computation (save: the per-layer config keys it rewrote besides
the layer count; "no lens": the logit lens is NaN because no final path gives the model's logits);
refused: one `error:` line (listed under the table); unbuildable architectures are listed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

COLUMNS = ("analyze", "no_grad", "sweep", "save")
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_blocks")


def main() -> int:
    import transformers
    from transformers.utils import logging

    from zoo_check import check
    from zoo_models import zoo_types

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--readme", help="write the table between the zoo-table markers of this file")
    args = ap.parse_args()
    logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types or zoo_types():
            rows[t] = check(t, Path(tmp) / t)
            print(t, {k: (v[0] if isinstance(v, tuple) else v) for k, v in rows[t].items()}, file=sys.stderr,
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    text = "\n".join(table_lines(rows, transformers.__version__)) + "\n"
    if args.readme:
        write_readme(Path(args.readme), text)
    else:
        print(text, end="")
    return 0


START, END = "<!-- zoo-table:start (scripts/zoo_table.py --readme README.md) -->", "<!-- zoo-table:end -->"


def write_readme(path: Path, text: str) -> None:
    from layerprobe.io import atomic_path

    old = path.read_text(encoding="utf-8")
    if START not in old or END not in old:
        raise SystemExit(f"error: {path} has no zoo-table markers")
    head, rest = old.split(START, 1)
    new = head + START + "\n" + text + END + rest.split(END, 1)[1]
    with atomic_path(path) as tmp:
        tmp.write_text(new, encoding="utf-8")


def table_lines(rows: dict, version: str) -> list[str]:
    out = []
    line = out.append
    built = {t: r for t, r in rows.items() if r["build"] is None}
    line(f"transformers {version}: {len(rows)} model types in the causal-LM mapping, {len(built)} build tiny and causal.")
    counts = {s: sum(1 for r in built.values() if all(r[c][0] == s for c in COLUMNS)) for s in ("right",)}
    refused = sum(1 for r in built.values() if any(r[c][0] == "refused" for c in COLUMNS)
                  and all(r[c][0] in ("right", "refused") for c in COLUMNS))
    bad = [t for t, r in built.items() if any(r[c][0] in ("wrong", "crash") for c in COLUMNS)]
    line(f"All four right: **{counts['right']}**; right or one clean `error:` line: **{refused}**; wrong or crash: "
         f"**{len(bad)}**" + (f" ({', '.join(bad)})" if bad else "") + f"; not buildable tiny: {len(rows) - len(built)}.")
    line("")
    line("<details><summary>The table: architecture × command</summary>")
    line("")
    line("| model type | analyze | analyze --no-grad | prune-sweep | --save-pruned |")
    line("|---|---|---|---|---|")
    notes = {}
    for t, r in built.items():
        cells = []
        for c in COLUMNS:
            status, detail = r[c]
            if status == "refused":
                key = re.sub(r"\S*\.pruned\.tmp\S*", "<folder>", detail)  # the temporary's name varies
                key = re.sub(r"\(relative (logit )?difference [^)]*\)", "(...)", key)[:220]
                n = notes.setdefault(key, len(notes) + 1)
                cells.append(f"refused ({n})")
            elif status == "right" and isinstance(detail, dict):  # save: the config keys rewritten
                lists = [k for k in detail if k not in COUNT_KEYS]
                cells.append("right" + (f" ({', '.join(lists)})" if lists else ""))
            elif status == "right" and detail:
                cells.append(f"right, {detail}")
            else:
                cells.append(status)
        line(f"| {t} | " + " | ".join(cells) + " |")
    if notes:
        line("")
        for key, n in notes.items():
            line(f"({n}) `error: {key}`  ")
    line("")
    line("</details>")
    unbuilt = {t: r["build"] for t, r in rows.items() if r["build"] is not None}
    if unbuilt:
        line("")
        line("<details><summary>Not buildable tiny from their own config (reason)</summary>")
        line("")
        for t, why in unbuilt.items():
            line(f"- {t}: {why}")
        line("")
        line("</details>")
    return out


if __name__ == "__main__":
    sys.exit(main())
