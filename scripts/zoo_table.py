"""Run the zoo check (tests/zoo_check.py) on every causal-LM architecture transformers ships and
print the README's coverage table (Markdown), one row per architecture.

    OMP_NUM_THREADS=1 python scripts/zoo_table.py [--json out.json] [model_type ...]

right: equal to the independent computation (save: the per-layer config keys it rewrote besides
the layer count; "no lens": the logit lens is NaN because no final path gives the model's logits);
refused: one `error:` line (listed under the table); unbuildable architectures are listed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

COLUMNS = ("analyze", "no_grad", "sweep", "save")
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def main() -> int:
    import transformers
    from transformers.utils import logging

    from zoo_check import check
    from zoo_models import zoo_types

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*")
    ap.add_argument("--json")
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
    built = {t: r for t, r in rows.items() if r["build"] is None}
    print(f"transformers {transformers.__version__}: {len(rows)} causal-LM model types, {len(built)} build tiny.\n")
    print("| model type | analyze | analyze --no-grad | prune-sweep | --save-pruned |")
    print("|---|---|---|---|---|")
    notes = {}
    for t, r in built.items():
        cells = []
        for c in COLUMNS:
            status, detail = r[c]
            if status == "refused":
                key = detail.split(";")[0][:110]
                n = notes.setdefault(key, len(notes) + 1)
                cells.append(f"refused ({n})")
            elif status == "right" and isinstance(detail, dict):  # save: the config keys rewritten
                lists = [k for k in detail if k not in COUNT_KEYS]
                cells.append("right" + (f" ({', '.join(lists)})" if lists else ""))
            elif status == "right" and detail:
                cells.append(f"right, {detail}")
            else:
                cells.append(status)
        print(f"| {t} | " + " | ".join(cells) + " |")
    if notes:
        print()
        for key, n in notes.items():
            print(f"({n}) `error: {key}`  ")
    counts = {s: sum(1 for r in built.values() if all(r[c][0] == s for c in COLUMNS)) for s in ("right",)}
    refused = sum(1 for r in built.values() if any(r[c][0] == "refused" for c in COLUMNS)
                  and all(r[c][0] in ("right", "refused") for c in COLUMNS))
    bad = [t for t, r in built.items() if any(r[c][0] in ("wrong", "crash") for c in COLUMNS)]
    print(f"\nAll four right: {counts['right']}; at least one clean refusal: {refused}; wrong or crash: {len(bad)}"
          + (f" ({', '.join(bad)})" if bad else "") + f"; not buildable tiny: {len(rows) - len(built)}.")
    unbuilt = {t: r["build"] for t, r in rows.items() if r["build"] is not None}
    if unbuilt:
        print("\n<details><summary>Not buildable tiny from their own config (reason)</summary>\n")
        for t, why in unbuilt.items():
            print(f"- {t}: {why}")
        print("\n</details>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
