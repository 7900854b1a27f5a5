"""Where a run's checkpoints live and which of them are complete: the read side of the layout that
`checkpoint/manager.py` writes (see there for the whole layout).

    run.dir/checkpoints/step_N/          one save, by every rank
    run.dir/checkpoints/step_N/COMPLETE  written by the driver after all ranks returned
    run.dir/checkpoints/latest           "step_N", replaced atomically after COMPLETE exists

Plain filesystem reads (no torch, no writes), so config validation can check `train.resume` and
`eval.checkpoint` against it without importing the checkpoint package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

COMPLETE = "COMPLETE"
LATEST = "latest"
_STEP = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / COMPLETE).is_file()


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The step dir `latest` names if complete; else the newest complete step dir; else None."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(candidate):
            return candidate
    complete = sorted((p for p in step_dirs(root) if is_complete(p)), key=step_of)
    return complete[-1] if complete else None


def step_of(path: str | os.PathLike[str]) -> int:
    """N of a step_N directory; -1 for any other name."""
    match = _STEP.match(Path(path).name)
    return int(match.group(1)) if match else -1


def step_dirs(root: Path) -> list[Path]:
    """The step_N directories under `root` (a checkpoints dir), complete or not, in no order."""
    return [p for p in root.glob("step_*") if p.is_dir() and _STEP.match(p.name)] if root.is_dir() else []
