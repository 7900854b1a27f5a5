"""What the rollout commands write beside their report: episode videos (collect, eval, training-time evals)."""

from __future__ import annotations

import json
from pathlib import Path

from vla_dist.config.schema import RunConfig
from vla_dist.data.codec import decode_frames
from vla_dist.data.video import tile_cameras, write_video


def write_videos(
    video_dir: Path, samples: list[dict[str, object]], cfg: RunConfig, label_outcome: bool = False
) -> list[Path]:
    """Cameras side by side, upscaled to ~256 px; `label_outcome` appends -success/-failure to names."""
    paths = []
    for sample in samples:
        frames = {
            cam: decode_frames(sample[f"{cam}.{cfg.data.image_codec}"], cfg.data.image_codec)
            for cam in cfg.task.cameras
        }
        suffix = ""
        if label_outcome:
            suffix = "-success" if json.loads(sample["meta.json"])["success"] else "-failure"
        path = video_dir / f"{sample['__key__']}{suffix}.mp4"
        write_video(path, tile_cameras(frames), fps=float(cfg.task.control_hz),
                    scale=max(1, 256 // cfg.task.image_size))
        paths.append(path)
    return paths

