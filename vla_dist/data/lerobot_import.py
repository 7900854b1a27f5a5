"""`vla-dist import lerobot SRC --out DATA_DIR`: a local LeRobot v3.0 dataset as vla-dist shards +
manifest, which `vla-dist train` (and `vla-dist eval eval.offline_data=`) read like collected data.

Per episode: every video camera (`observation.images.<name>` becomes camera `<name>`), optionally
resized to square `image_size`; `observation.state` and `action`; the task string as the
instruction (and, made a name, as the task); fps. Statistics are recomputed over the imported
frames. The manifest is written last, atomically: an interrupted import leaves no manifest, so
nothing reads a half dataset (re-run it: the output directory's shards are replaced).
Action and state spaces are recorded as the source names them (`type: "lerobot"`).

WIP (next sessions): Ray tasks for large datasets, resume of an interrupted import, skipping
(and counting) episodes with corrupt files.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_dist.data.codec import encode_episode
from vla_dist.data.episode import Episode
from vla_dist.data.lerobot import ACTION_KEY, CAMERA_PREFIX, STATE_KEY, iter_lerobot_episodes, read_info
from vla_dist.data.manifest import write_manifest
from vla_dist.data.shards import EpisodeShardWriter, clear_shards
from vla_dist.data.stats import compute_stats


def task_name(task: str) -> str:
    """A task string as a name (the manifest's task counts, per-task reports): lower case, words
    joined by '_', at most 48 characters."""
    return re.sub(r"[^a-z0-9]+", "_", task.lower()).strip("_")[:48] or "task"


def camera_name(key: str) -> str:
    name = key.removeprefix(CAMERA_PREFIX)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-") or "camera"


def resize_square(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, size, size, 3] (bilinear; a non-square frame is stretched)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR)) for frame in frames])


def import_lerobot(src: str | Path, out: str | Path, *, image_size: int = 0, codec: str = "mp4",
                   shard_max_episodes: int = 64, on_episode: Callable[[int, int], None] | None = None
                   ) -> dict[str, Any]:
    """Import every episode of the LeRobot dataset `src` into `out`; the report. `image_size` 0 keeps
    the source resolution (square frames only)."""
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    info = read_info(src)
    out.mkdir(parents=True, exist_ok=True)
    clear_shards(out)  # and its manifest: none until the import is whole
    total = int(info.get("total_episodes", 0))
    states, actions, tasks, cameras = [], [], {}, None
    frames_written, size = 0, image_size
    with EpisodeShardWriter(out, max_episodes=shard_max_episodes) as writer:
        for done, source in enumerate(iter_lerobot_episodes(src), start=1):
            frames = {camera_name(key): video for key, video in source.frames.items()}
            if size:
                frames = {name: resize_square(video, size) for name, video in frames.items()}
            shapes = {video.shape[1:3] for video in frames.values()}
            if len(shapes) != 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
                raise ValueError(f"{src}: episode {source.index} has camera frames of shapes {sorted(shapes)}; "
                                 "vla-dist stores square frames: pass --image-size N to resize")
            size = next(iter(shapes))[0]
            cameras = cameras or list(frames)
            name = task_name(source.task)
            writer.write(encode_episode(Episode(
                episode_id=f"lerobot{source.index:06d}", task=name, instruction=source.task, seed=source.index,
                success=True, fps=source.fps, frames=frames, state=source.state, actions=source.action), codec))
            states.append(source.state)
            actions.append(source.action)
            tasks[name] = tasks.get(name, 0) + 1
            frames_written += source.state.shape[0]
            if on_episode is not None:
                on_episode(done, total)
    features = info["features"]
    manifest = write_manifest(
        out, shards=writer.records, episodes=len(states), frames=frames_written, tasks=tasks,
        action_space={"type": "lerobot", "dim": int(actions[0].shape[1]), "names": _names(features[ACTION_KEY])},
        state_space={"dim": int(states[0].shape[1]), "names": _names(features[STATE_KEY])},
        action_stats=compute_stats(actions), state_stats=compute_stats(states), cameras=cameras or [],
        image_size=size, image_codec=codec, fps=float(info["fps"]),
        extra={"complete": True, "source": {"format": "lerobot", "codebase_version": info["codebase_version"],
                                            "path": str(src.resolve()), "robot_type": info.get("robot_type")}})
    return {"command": "import", "format": "lerobot", "episodes": len(states), "frames": frames_written,
            "cameras": ",".join(cameras or []), "image_size": size, "tasks": len(tasks), "shards": len(writer.records),
            "manifest": str(manifest), "wall_seconds": round(time.perf_counter() - started, 2)}


def _names(feature: dict[str, Any]) -> list[str]:
    """A feature's per-dimension names (LeRobot: a list, or {"axes"/"motors": [...]}); [] if none."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next((value for value in names.values() if isinstance(value, list)), None)
    shape = feature.get("shape") or [0]
    return [str(n) for n in names] if isinstance(names, list) and len(names) == int(shape[0]) else []
