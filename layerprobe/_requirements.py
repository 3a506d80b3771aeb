"""The dependency floors of pyproject.toml, checked at `import layerprobe` from installed metadata.

A user who installs layerprobe into an environment with other pins should learn at import that, say, transformers is
too old, not meet an AttributeError deep in a forward. The floors are read from one place: the pyproject.toml beside
the package when it runs from a source tree (a checkout on PYTHONPATH, an editable install), else the installed
distribution's metadata. Only metadata is read: nothing heavy (torch, transformers) is imported.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)")


class DependencyTooOld(ImportError):
    """A dependency is older than the floor layerprobe declares (and was tested with)."""


def _declared() -> list[str]:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib

            return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
        except (ImportError, KeyError, ValueError):  # Python 3.10 has no tomllib; a foreign pyproject.toml
            pass
    try:
        return [r for r in metadata.requires("layerprobe") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        return []


def floors(requirements: list[str] | None = None) -> dict[str, str]:
    """{distribution: lowest version} for every `name>=version` requirement of the core dependencies."""
    found = {}
    for line in _declared() if requirements is None else requirements:
        m = _REQUIREMENT.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def too_old(requirements: list[str] | None = None) -> list[str]:
    """One phrase per installed dependency below its floor (a dependency that is not installed is pip's business)."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with transformers; without it there is nothing to compare with
        return []
    problems = []
    for name, floor in floors(requirements).items():
        try:
            installed = metadata.version(name)
            if Version(installed) < Version(floor):
                problems.append(f"{name}>={floor} (installed: {installed})")
        except (metadata.PackageNotFoundError, InvalidVersion):
            continue
    return problems


def check() -> None:
    """Raise DependencyTooOld, one line naming every dependency to upgrade and the command that does it."""
    problems = too_old()
    if not problems:
        return
    names = " ".join(f"'{p.split(' ')[0]}'" for p in problems)
    message = (f"layerprobe needs {', '.join(problems)}: upgrade with `pip install -U {names}` "
               f"(the tested versions are in constraints/lock.txt)")
    _one_line_if_uncaught()
    raise DependencyTooOld(message)


def _one_line_if_uncaught() -> None:
    """If nothing catches the error (the `layerprobe` command, a script), print `error: …` and exit 2, not a
    traceback through the import machinery; every other exception keeps the usual hook."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, DependencyTooOld):
            print(f"error: {value}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)  # SystemExit raised inside a hook would be reported as an error in the hook
        previous(kind, value, tb)

    sys.excepthook = hook
