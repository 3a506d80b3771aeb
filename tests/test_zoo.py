"""Every architecture in transformers' causal-LM mapping, tiny and random: right or one clean line.

For each model type that transformers builds tiny from its own config class (tests/zoo_models.py;
the others are skipped with the reason), analyze, analyze without gradients, a layer sweep and
save-pruned + reload are each checked against an independent computation (tests/zoo_check.py).
Each must be right, or a refusal that is one `error:` line (a LayerprobeError); never a wrong
number, a wrong norm scheme or a traceback. `python scripts/zoo_table.py` prints the README's table
from the same checks.
"""

from __future__ import annotations

import pytest

from zoo_check import check
from zoo_models import zoo_types

pytestmark = pytest.mark.slow  # ~130 architectures x four commands: a few minutes on one core

COLUMNS = ("analyze", "no_grad", "sweep", "save")


@pytest.mark.parametrize("model_type", zoo_types())
def test_architecture_is_right_or_refused_in_one_line(model_type, tmp_path):
    row = check(model_type, tmp_path)
    if row["build"] is not None:
        pytest.skip(f"{model_type}: {row['build']}")
    bad = {c: row[c] for c in COLUMNS if row[c][0] not in ("right", "refused")}
    assert not bad, f"{model_type}: {bad}"
    for c in COLUMNS:
        if row[c][0] == "refused":
            assert "\n" not in row[c][1] and row[c][1]


# Architectures the issue named, pinned so that a change in the zoo's builder cannot drop them silently.
NAMED = {
    "gemma3_text": "right", "glm4": "right", "cohere2": "right", "recurrent_gemma": "right", "lfm2": "right",
    "llama4_text": "right", "nemotron_h": "right", "jamba": "refused", "llama": "right",
}


@pytest.mark.parametrize("model_type", sorted(NAMED))
def test_named_architectures_sweep_and_save(model_type, tmp_path):
    """Sandwich norms measured as such, Cohere's logit_scale and Recurrent-Gemma's soft-capping swept,
    hybrid and per-layer lists rewritten on save; Jamba (layer kinds from periods) refused in one line."""
    row = check(model_type, tmp_path)
    assert row["build"] is None, row["build"]
    assert row["analyze"][0] == row["no_grad"][0] == row["sweep"][0] == "right", row
    assert row["save"][0] == NAMED[model_type], row["save"]
    if model_type == "jamba":
        assert "changes what layer 2 becomes" in row["save"][1] and "attn_layer_period" in row["save"][1]
    if model_type == "llama4_text":
        assert {"moe_layers", "no_rope_layers", "layer_types"} <= set(row["save"][1])
