"""Per-dimension statistics of state or action arrays over every frame of every episode.

The manifest stores them and the training-side processor normalizes with them (mean/std, or the
q01/q99 range that ignores rare outliers). Exact, not streaming estimates: we keep the arrays, which
is cheap at robot-control sizes (a million frames of a 32-dim float32 vector is 128 MB).
"""

from __future__ import annotations

import numpy as np

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def compute_stats(arrays: list[np.ndarray]) -> dict[str, list[float] | int]:
    """`arrays`: [T_i, D] each, same D. Returns {mean, std, min, max, q01, q99: [D] lists, count}.

    std is the population std (ddof=0) of all frames; q01/q99 are numpy's linearly interpolated 1st
    and 99th percentiles. All computed in float64."""
    if not arrays:
        raise ValueError("compute_stats: no arrays given (no episodes?)")
    dims = {np.shape(array)[1] if np.ndim(array) == 2 else None for array in arrays}
    if None in dims:
        shapes = sorted({str(np.shape(array)) for array in arrays if np.ndim(array) != 2})
        raise ValueError(f"compute_stats: every array must be [T, D], got shapes {shapes}")
    if len(dims) != 1:
        raise ValueError(f"compute_stats: arrays have different dims {sorted(dims)}")
    frames = np.concatenate([np.asarray(array, dtype=np.float64) for array in arrays], axis=0)
    if frames.shape[0] == 0:
        raise ValueError("compute_stats: the arrays hold no frames")
    if frames.shape[1] == 0:
        raise ValueError("compute_stats: the arrays have zero dimensions")
    if not np.isfinite(frames).all():
        bad_dims = np.flatnonzero(~np.isfinite(frames).all(axis=0)).tolist()
        raise ValueError(f"compute_stats: non-finite values (nan/inf) in dimensions {bad_dims}")
    q01, q99 = np.quantile(frames, [0.01, 0.99], axis=0)
    return {
        "mean": frames.mean(axis=0).tolist(),
        "std": frames.std(axis=0).tolist(),
        "min": frames.min(axis=0).tolist(),
        "max": frames.max(axis=0).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
        "count": int(frames.shape[0]),
    }


class StatsAccumulator:
    """Collects arrays episode by episode (e.g. as shards are written), then `compute_stats`."""

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []
        self._frames = 0

    def add(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"StatsAccumulator.add: expected [T, D], got shape {array.shape}")
        if self._arrays and array.shape[1] != self._arrays[0].shape[1]:
            raise ValueError(f"StatsAccumulator.add: dim {array.shape[1]}, earlier arrays have "
                             f"{self._arrays[0].shape[1]}")
        self._arrays.append(np.array(array, copy=True))  # the caller may reuse its buffer
        self._frames += array.shape[0]

    @property
    def num_frames(self) -> int:
        return self._frames

    def result(self) -> dict[str, list[float] | int]:
        return compute_stats(self._arrays)
