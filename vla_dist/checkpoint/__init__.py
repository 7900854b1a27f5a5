"""Checkpoints: DeepSpeed shards per step under run.dir/checkpoints/step_N, a COMPLETE marker once
every rank finished, an atomic `latest` pointer, keep-last-K, resume selection, and export."""

from vla_dist.checkpoint.manager import (
    COMPLETE,
    LATEST,
    META,
    checkpoints_dir,
    is_complete,
    latest_checkpoint,
    mark_complete,
    prune,
    resolve_resume,
    step_dir,
)

__all__ = ["COMPLETE", "LATEST", "META", "checkpoints_dir", "is_complete", "latest_checkpoint", "mark_complete",
           "prune", "resolve_resume", "step_dir"]
