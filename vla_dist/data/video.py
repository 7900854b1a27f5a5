"""Episode videos for people to watch (run.dir/videos/): mp4 files, not training data."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vla_dist import atomic
from vla_dist.data.codec import write_h264

# For people, not training: a little above the shards' crf (no visible difference at these sizes);
# yuv420p, the pixel format every browser and player shows.
VIDEO_CRF = 20


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: float, scale: int = 1) -> Path:
    """Write uint8 [T, H, W, 3] frames as H.264 mp4 at `path`, atomically (no half-written file is
    ever visible under `path`). `scale` repeats pixels (nearest neighbour) so 64x64 frames are
    watchable; an odd size is padded by one edge pixel, as 4:2:0 video needs even sizes."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".mp4" last: ffmpeg's faststart pass reopens the file by name
    with atomic.replacing(path, suffix=".mp4") as tmp:
        write_h264(str(tmp), frames, fps, crf=VIDEO_CRF, pix_fmt="yuv420p")
    return path


def tile_cameras(frames: Mapping[str, np.ndarray]) -> np.ndarray:
    """Cameras side by side, in the mapping's order: [T, H, W_1 + W_2 + ..., 3] (or [H, W, 3] per
    image). All cameras need the same number of frames and the same height."""
    if not frames:
        raise ValueError("tile_cameras: no cameras")
    arrays = list(frames.values())
    shapes = {name: array.shape for name, array in frames.items()}
    first = arrays[0]
    if first.ndim not in (3, 4) or any(array.ndim != first.ndim for array in arrays):
        raise ValueError(f"tile_cameras: expected all [T, H, W, 3] or all [H, W, 3], got {shapes}")
    # everything but the width must match: T (if present), H and channels
    width_axis = first.ndim - 2
    if any(array.shape[:width_axis] != first.shape[:width_axis] or array.shape[-1] != first.shape[-1]
           for array in arrays):
        raise ValueError(f"tile_cameras: cameras differ in frame count, height or channels: {shapes}")
    return np.concatenate(arrays, axis=width_axis)
