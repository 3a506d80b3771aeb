"""What every fault test checks besides the one-line error: that the folder the command writes to is left
exactly as it was (every file's bytes, and no file added)."""

from __future__ import annotations

from pathlib import Path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes); {} when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_unchanged(folder: Path, before: dict[str, bytes]) -> None:
    after = snapshot(folder)
    assert sorted(after) == sorted(before), f"files changed in {folder}: {sorted(set(after) ^ set(before))}"
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"rewritten in {folder}: {changed}"
