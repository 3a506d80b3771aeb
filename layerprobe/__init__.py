"""layerprobe: which layers of a language model actually contribute, and why.

The public names load on first use (PEP 562), so that `import layerprobe` and `layerprobe --help`
do not pay for torch, transformers, pandas and matplotlib until a command needs them.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import _requirements
from ._hf_registration import register_when_transformers_loads
from ._version import __version__

_requirements.check()  # a dependency below pyproject.toml's floor: one clear line now, not an AttributeError later

# Public name -> the module that defines it.
_PUBLIC = {
    "analyze": "analysis",
    "load": "results",
    "load_model": "loading",
    "AnalysisResult": "results",
    "LayerprobeError": "errors",
    "compare": "api",
    "Comparison": "comparison",
    "prune_sweep": "pruning",
    "save_pruned": "pruning",
    "SweepResult": "pruning",
    "demo": "demo_pipeline",  # not `demo.py`: importing a submodule would shadow the function
    "LayerMonitor": "monitor",
}

__all__ = [*_PUBLIC, "__version__"]

# `import layerprobe` promises that AutoModelForCausalLM.from_pretrained(run_dir) loads our reference
# checkpoints; the registration needs torch, so it happens when transformers is first imported.
register_when_transformers_loads()


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a subpackage: layerprobe.reference, ...
        raise AttributeError(f"module 'layerprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
