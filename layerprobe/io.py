"""Atomic writes: results and checkpoints appear whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LayerprobeError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that files can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".layerprobe-probe-"):
            pass
    except OSError as e:
        raise LayerprobeError(
            f"cannot write to output folder {path}: {e.strerror or e}; choose another --out"
        ) from None
    return path


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse a folder that could not be created or written, without creating anything.

    Commands call this before loading a model, so a bad target costs nothing and leaves no empty folder.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:  # the nearest part of the path that exists
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        why = "it is a file" if probe == path else f"{probe} is a file"
        raise LayerprobeError(f"cannot write to output folder {path}: {why}; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LayerprobeError(f"cannot write to output folder {path}: {probe} is not writable; choose another {option}")
    return path


# The temporary names `atomic_path` uses: `.NAME.tmp-PID-HOST`, HOST a tag of this machine's name, so that on a
# folder shared between machines (NFS) a PID is only judged on the machine it belongs to. `.NAME.tmp-PID`,
# without a tag, is what earlier versions wrote: judged here, as they were.
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:-([0-9a-f]{8}))?$")
FOREIGN_TEMP_AGE_S = 24 * 3600  # another machine's temporary this old is left over (a container's old hostname)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that a killed process left in `folder` (our `.NAME.tmp-PID-HOST` pattern only, and
    only where process PID of this machine is gone, so a live writer keeps its file; another machine's sharing
    the folder only once a day old). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if not match:
            continue
        if match.group(2) in (None, _HOST):
            if _pid_alive(int(match.group(1))):
                continue
        elif not _older_than(entry, FOREIGN_TEMP_AGE_S):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temp_sibling(path: str | os.PathLike) -> Path:
    """The name this process writes `path` under before renaming it into place (`.NAME.tmp-PID-HOST`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_HOST}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it is renamed onto `path`."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


class JsonLinesAppender:
    """Appends one JSON line per record to `path`, flushed at once: a killed run leaves every completed line
    readable (readers skip a last line cut short). `path` None: a no-op, for processes that do not write."""

    def __init__(self, path: Path | None):
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
