"""Atomic file writes: a reader sees a file whole or not at all, never half of it.

Each writer fills a hidden temporary sibling of the target, `.NAME.PID.tmp` (same directory, so the
rename stays on one filesystem; the pid keeps concurrent processes apart), then renames it over the
target with `os.replace`; on an error the temporary file is removed and the target is left as it
was. Temporary files are created with plain `open()`, so the target gets the usual mode (0666 minus
the umask, 0644 under umask 022), not `mkstemp`'s 0600. With `fsync=True` the data is on disk before
the rename (for files whose presence marks something complete: a checkpoint, a dataset); without
it the rename protects against a crashed process, not against a lost machine.

Not served here, on purpose: shards (data/shards.py publishes webdataset's own `.partial` file,
fsynced while hashing it in one pass) and universal checkpoints (checkpoint/universal.py renames a
directory a converter process wrote).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_sibling(path: str | os.PathLike[str], suffix: str = "") -> Path:
    """The temporary name a write of `path` goes through: `.NAME.PID.tmp` + `suffix`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


@contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path for the caller (or a library it calls) to write; when the block ends
    without an error, rename it over `path`; on an error, remove it. `suffix` ends the temporary
    name, for writers that look at the extension (ffmpeg: ".mp4")."""
    path = Path(path)
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str, fsync: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically; `fsync=True` flushes it to disk before the rename."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    return path


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """A report: `payload` as indented JSON (values JSON cannot hold written as str), atomically,
    creating the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(payload, indent=2, default=str))


def replace_symlink(target: str, link: str | os.PathLike[str]) -> None:
    """Point the symlink `link` at `target` atomically (a reader finds the old link or the new one)."""
    tmp = temp_sibling(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
