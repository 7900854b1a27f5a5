"""Exclusive locks on output paths, so that two processes never write the same run at once.

Two plans (`vla-dist recipes run`, `vla-dist quickstart`) started into one directory may share stages:
both would train the same baseline seed into the same run.dir, and both read-modify-write the
comparison record. Each takes `holding(paths)` first: the second waits for the first to finish and then
finds its result (a finished stage is kept). The lock is the kernel's `flock` on a hidden sibling
file `.NAME.lock`, not a file whose presence means "locked": a process that dies (SIGKILL, OOM, a lost
node's job) releases it with its file descriptors, so a crash never leaves a stale lock to delete by
hand. Sibling, not inside: a stage set aside is renamed to PATH.stale, and the lock must stay with the
name. The lock files stay after release, empty: unlinking one on release would let a process still
waiting on the old file and a newcomer creating a new one both hold "the" lock. On NFS, Linux maps
`flock` to the server's byte-range locks (NFSv4), so a shared recipes.dir
on a cluster filesystem is covered too.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path


def lock_file(path: str | os.PathLike[str]) -> Path:
    """The file whose lock guards `path`: `.NAME.lock` beside it."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


@contextmanager
def holding(paths: Sequence[str | os.PathLike[str]],
            on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on each of `paths` (in sorted order, so that two holders of overlapping
    sets cannot deadlock) for the block. When another process holds one, `on_wait(path)` is called once
    and this waits for it."""
    with ExitStack() as stack:
        for path in sorted({Path(p).absolute() for p in paths}):
            target = lock_file(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(target, "a+b"))
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(path)
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            # closing the file (ExitStack, in reverse order) releases the lock
        yield
