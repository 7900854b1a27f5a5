"""Layout and bookkeeping of training checkpoints (no torch, no DeepSpeed: the driver uses it).
The read side (names, `latest_checkpoint`) is `vla_dist/checkpoint_layout.py`.

    run.dir/checkpoints/step_N/      DeepSpeed's files (tag = step_N), written by every rank
    run.dir/checkpoints/step_N/train_meta.json   what export needs (model section, manifest, seed, lora)
    run.dir/checkpoints/step_N/adapter/          LoRA runs: the gathered peft adapter (rank 0)
    run.dir/checkpoints/step_N/COMPLETE          written by the driver after ALL ranks returned
    run.dir/checkpoints/latest                   "step_N", replaced atomically after COMPLETE exists
    run.dir/checkpoints/best -> step_N           train.keep_best: a relative symlink to the complete
                                                 checkpoint with the best training-time eval, replaced
                                                 atomically, never pruned (a step dir path for eval/export)
    run.dir/checkpoints/step_N_universal/        elastic resume's cache of step_N (never COMPLETE, never
                                                 `latest`; pruned with step_N): checkpoint/universal.py

A directory without COMPLETE is a crash leftover: never resumed from, deleted by the next prune.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vla_dist import atomic
from vla_dist.checkpoint_layout import (
    COMPLETE,
    LATEST,
    checkpoints_dir,
    is_complete,
    latest_checkpoint,
    step_dir,
    step_dirs,
    step_of,
)
from vla_dist.errors import ConfigError

# The read side of the layout is vla_dist/checkpoint_layout.py (config validation reads it too); its
# names stay importable from here, where the driver, export and tests use them (ckpt.step_dir, ...).
__all__ = [
    "BEST", "COMPLETE", "LATEST", "META", "TRAIN_STATE", "best_checkpoint", "checkpoints_dir", "is_complete",
    "kept_message", "latest_checkpoint", "mark_best", "mark_complete", "prune", "resolve_resume", "save_step",
    "step_dir", "step_dirs", "step_of",
]

BEST = "best"
META = "train_meta.json"
TRAIN_STATE = "train_state.json"  # step, LR schedule and data position as JSON (rank 0, written at save)


def mark_complete(path: str | os.PathLike[str], step: int, info: dict[str, Any]) -> None:
    """Marker first, then the pointer: `latest` only ever names a complete checkpoint."""
    path = Path(path)
    atomic.write_text(path / COMPLETE, json.dumps({"step": step, "time": time.time(), **info}, indent=2) + "\n",
                      fsync=True)
    atomic.write_text(path.parent / LATEST, path.name + "\n", fsync=True)


def save_step(run_dir: str | os.PathLike[str], step: int, save_ranks: Callable[[Path], None],
              info: dict[str, Any], keep_last: int, keep: Iterable[Path] = ()) -> Path:
    """The driver's side of a save, for `vla-dist train` and `vla-dist rl` alike: a fresh step dir
    (a crash leftover, or an earlier run's with resume=never, is removed first), the ranks' files
    (`save_ranks(path)` returns once every rank saved and raises if one died: then no COMPLETE and
    `latest` stays), the COMPLETE marker and `latest`, then pruning."""
    path = step_dir(run_dir, step)
    if path.exists():
        shutil.rmtree(path)
    save_ranks(path)
    mark_complete(path, step, info)
    prune(run_dir, keep_last, keep=keep)
    return path


def kept_message(run_dir: str | os.PathLike[str], resume_hint: str, start: str) -> str:
    """What a failed run tells its user was kept, read at the failure: the latest complete checkpoint
    and `resume_hint` (how to continue from it), or that a restart begins at `start`."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return f"No complete checkpoint yet: a restart begins at {start}."
    return f"Last complete checkpoint kept: {latest}; {resume_hint}."


def mark_best(path: str | os.PathLike[str]) -> None:
    """Point checkpoints/best at the complete step dir `path` (a symlink, so `best` itself reads as a
    checkpoint directory: `vla-dist eval eval.checkpoint=RUN/checkpoints/best` works)."""
    path = Path(path)
    atomic.replace_symlink(path.name, path.parent / BEST)


def best_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The step dir checkpoints/best points at, if complete."""
    pointer = checkpoints_dir(run_dir) / BEST
    if not pointer.is_symlink():
        return None
    target = pointer.parent / os.readlink(pointer)
    return target if is_complete(target) else None


def resolve_resume(resume: str, run_dir: str | os.PathLike[str]) -> Path | None:
    """train.resume -> the step dir to load, or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError("train.resume", f"{resume} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def prune(run_dir: str | os.PathLike[str], keep_last: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete incomplete step dirs and all but the newest `keep_last` complete ones; never `latest`,
    `best`, nor the step dirs in `keep` (e.g. checkpoints whose training-time eval is still running)."""
    root = checkpoints_dir(run_dir)
    latest = latest_checkpoint(run_dir)
    kept = {p.name for p in (*keep, latest, best_checkpoint(run_dir)) if p is not None}
    complete = sorted((p for p in step_dirs(root) if is_complete(p)), key=step_of)
    doomed = [p for p in step_dirs(root) if not is_complete(p) and (latest is None or step_of(p) < step_of(latest))]
    doomed += [p for p in complete[:-keep_last] if p.name not in kept]
    for path in doomed:
        # unmark first: a prune killed half-way (large checkpoints take a while to delete) leaves an
        # incomplete leftover, never a COMPLETE-marked directory with some of its shards gone
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    # universal conversions (checkpoint/universal.py) are caches of their step dir: they go with it
    for path in root.glob("step_*_universal") if root.is_dir() else []:
        if not is_complete(root / path.name[: -len("_universal")]):
            shutil.rmtree(path, ignore_errors=True)
    return doomed
