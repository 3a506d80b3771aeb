"""Register the reference models with the transformers Auto classes as soon as transformers is imported.

`import layerprobe` promises that `AutoModelForCausalLM.from_pretrained(run_dir)` then loads a
`train-reference` checkpoint. Registering means importing `layerprobe.reference`, which imports torch
(seconds); doing it at `import layerprobe` would make every `layerprobe --help` pay for it. Instead a
finder on `sys.meta_path` waits for the `transformers` package: once its `__init__` has run, the
reference package is imported and registers itself. Nothing happens in a process that never imports
transformers, and nothing changes for one that already has.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_REFERENCE = "layerprobe.reference"


def _register() -> None:
    # The reference package registers itself on import; when it is already in sys.modules it has done so,
    # or is doing so right now (it is what imported transformers).
    if _REFERENCE not in sys.modules:
        importlib.import_module(_REFERENCE)


class _Loader(importlib.abc.Loader):
    """transformers' own loader, followed by the registration."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once: transformers is imported once per process
        spec = importlib.util.find_spec(fullname)  # the finders after this one
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_finder = _TransformersFinder()


def register_when_transformers_loads() -> None:
    """Register now if transformers is imported already, else as soon as it is."""
    if "transformers" in sys.modules:
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
