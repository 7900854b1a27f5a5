"""`vla-dist import lerobot SRC --out DATA_DIR`: a local LeRobot v3.0 dataset as vla-dist shards +
manifest, which `vla-dist train` (and `vla-dist eval eval.offline_data=`) read like collected data.

Per episode: every video camera (`observation.images.<name>` becomes camera `<name>`), optionally
resized to square `image_size`; `observation.state` and `action`; the task string as the
instruction (and, made a name, as the task); fps. Statistics are recomputed over the imported
frames. Action and state spaces are recorded as the source names them (`type: "lerobot"`).

The episodes are imported in groups of `shard_max_episodes` (one shard each), in this process or,
with `workers` > 1, as Ray tasks; each group is written into `DATA_DIR/.import/gNNNNNN/` and
finished by its `result.json` (written last). The driver then moves the shards into DATA_DIR,
numbered in episode order, and writes the manifest, last and atomically: an interrupted import
leaves no manifest, and re-running it keeps every finished group (same source and settings) and
imports only the rest. An episode whose parquet or mp4 is missing or broken is skipped and counted
(`skipped_episodes`, each named with its file in the manifest's `source.skipped`); with `strict`
it fails the import instead.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_dist import atomic
from vla_dist.data.codec import encode_episode
from vla_dist.data.episode import Episode
from vla_dist.data.lerobot import (
    ACTION_KEY,
    CAMERA_PREFIX,
    STATE_KEY,
    LeRobotFormatError,
    iter_lerobot_episodes,
    read_episodes_meta,
    read_info,
)
from vla_dist.data.manifest import write_manifest
from vla_dist.data.shards import SHARD_PREFIX, EpisodeShardWriter, clear_shards
from vla_dist.data.stats import compute_stats

PARTS_DIR = ".import"
RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"


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


def import_group(src: str, part_dir: str, indices: list[int], settings: dict[str, Any]) -> dict[str, Any]:
    """Import the episodes `indices` of `src` into `part_dir` (one shard); its result, also written
    to part_dir/result.json last (the arrays the statistics need beside it, as .npz)."""
    part = Path(part_dir)
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    size, skipped = settings["image_size"], []
    states, actions, tasks, cameras = [], [], {}, None
    with EpisodeShardWriter(part, max_episodes=len(indices), max_bytes=2**40) as writer:
        for source in iter_lerobot_episodes(src, episodes=set(indices),
                                            on_skip=None if settings["strict"] else lambda i, why: skipped.append(
                                                {"episode": i, "why": why})):
            frames = {camera_name(key): video for key, video in source.frames.items()}
            if settings["image_size"]:
                frames = {name: resize_square(video, settings["image_size"]) for name, video in frames.items()}
            shapes = {video.shape[1:3] for video in frames.values()}
            if len(shapes) != 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
                raise LeRobotFormatError(f"{src}: episode {source.index} has camera frames of shapes {sorted(shapes)}; "
                                         "vla-dist stores square frames: pass --image-size N to resize")
            size = next(iter(shapes))[0]
            cameras = cameras or list(frames)
            name = task_name(source.task)
            writer.write(encode_episode(Episode(
                episode_id=f"lerobot{source.index:06d}", task=name, instruction=source.task, seed=source.index,
                success=True, fps=source.fps, frames=frames, state=source.state, actions=source.action),
                settings["codec"]))
            states.append(source.state)
            actions.append(source.action)
            tasks[name] = tasks.get(name, 0) + 1
    np.savez(part / ARRAYS_FILE, lengths=np.array([len(a) for a in actions], np.int64),
             states=np.concatenate(states) if states else np.zeros((0, 0), np.float32),
             actions=np.concatenate(actions) if actions else np.zeros((0, 0), np.float32))
    result = {"settings": settings, "indices": indices, "records": [r.to_dict() for r in writer.records],
              "tasks": tasks, "cameras": cameras, "image_size": size, "skipped": skipped,
              "episodes": len(states), "frames": int(sum(len(a) for a in actions))}
    atomic.write_text(part / RESULT_FILE, json.dumps(result))
    return result


def import_lerobot(src: str | Path, out: str | Path, *, image_size: int = 0, codec: str = "mp4",
                   shard_max_episodes: int = 64, workers: int = 1, strict: bool = False,
                   submit: Callable[..., Any] | None = None,
                   on_episode: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Import every episode of the LeRobot dataset `src` into `out`; the report. `image_size` 0 keeps
    the source resolution (square frames only). `submit(fn, *args)` runs a group elsewhere and
    returns something `collect` below can wait on (the CLI passes Ray tasks); None: in this process."""
    started = time.perf_counter()
    src, out = Path(src).resolve(), Path(out)
    info = read_info(src)
    metas = read_episodes_meta(src)
    out.mkdir(parents=True, exist_ok=True)
    clear_shards(out)  # and its manifest: none until the import is whole
    indices = [int(meta["episode_index"]) for meta in metas]
    groups = [indices[i:i + shard_max_episodes] for i in range(0, len(indices), shard_max_episodes)]
    settings = {"src": str(src), "image_size": image_size, "codec": codec, "strict": strict}
    parts = [out / PARTS_DIR / f"g{number:06d}" for number in range(len(groups))]
    results: dict[int, dict[str, Any]] = {}
    for number, part in enumerate(parts):  # groups an interrupted import finished: kept
        kept = _finished(part, settings, groups[number])
        if kept is not None:
            results[number] = kept
    kept_groups = len(results)

    def progress() -> None:
        if on_episode is not None:
            on_episode(sum(len(groups[n]) for n in results), len(indices))

    progress()
    todo = [n for n in range(len(groups)) if n not in results]
    if submit is None or workers <= 1:
        for number in todo:
            results[number] = import_group(str(src), str(parts[number]), groups[number], settings)
            progress()
    else:
        import ray

        waiting, pending = list(todo), {}
        while waiting or pending:
            while waiting and len(pending) < workers:  # at most `workers` groups at a time
                number = waiting.pop(0)
                pending[submit(import_group, str(src), str(parts[number]), groups[number], settings)] = number
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
            progress()
    return _assemble(src, out, info, [results[n] for n in range(len(groups))], parts, kept_groups, started)


def _finished(part: Path, settings: dict[str, Any], indices: list[int]) -> dict[str, Any] | None:
    """The result of a group an earlier run finished with the same source, settings and episodes."""
    try:
        result = json.loads((part / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if result.get("settings") != settings or result.get("indices") != indices:
        return None
    if not all((part / record["name"]).is_file() for record in result["records"]) or not (part / ARRAYS_FILE).is_file():
        return None
    return result


def _assemble(src: Path, out: Path, info: dict[str, Any], results: list[dict[str, Any]], parts: list[Path],
              kept_groups: int, started: float) -> dict[str, Any]:
    """Move every group's shard into `out` in episode order, then write the manifest (last)."""
    records, states, actions, tasks, skipped = [], [], [], {}, []
    cameras, size = None, 0
    for result, part in zip(results, parts, strict=True):
        skipped += result["skipped"]
        if not result["episodes"]:
            continue
        arrays = np.load(part / ARRAYS_FILE, allow_pickle=False)
        states.append(arrays["states"])
        actions.append(arrays["actions"])
        if cameras is not None and (result["cameras"], result["image_size"]) != (cameras, size):
            raise LeRobotFormatError(f"{src}: episodes {result['indices'][0]}.. have cameras/size "
                                     f"{result['cameras']}/{result['image_size']}, earlier ones {cameras}/{size}")
        cameras, size = result["cameras"], result["image_size"]
        for name, count in result["tasks"].items():
            tasks[name] = tasks.get(name, 0) + count
        for record in result["records"]:
            moved = {**record, "name": f"{SHARD_PREFIX}{len(records):06d}.tar"}
            (part / record["name"]).rename(out / moved["name"])
            records.append(moved)
    if not records:
        raise LeRobotFormatError(f"{src}: no episode could be read ({len(skipped)} skipped; first: "
                                 f"{skipped[0]['why'] if skipped else 'none listed'})")
    episodes, frames = sum(r["episodes"] for r in records), int(sum(len(a) for a in actions))
    features = info["features"]
    manifest = write_manifest(
        out, shards=records, episodes=episodes, frames=frames, tasks=tasks,
        action_space={"type": "lerobot", "dim": int(actions[0].shape[1]), "names": _names(features[ACTION_KEY])},
        state_space={"dim": int(states[0].shape[1]), "names": _names(features[STATE_KEY])},
        action_stats=compute_stats([np.concatenate(actions)]), state_stats=compute_stats([np.concatenate(states)]),
        cameras=cameras or [], image_size=size, image_codec=results[0]["settings"]["codec"], fps=float(info["fps"]),
        extra={"complete": True, "source": {"format": "lerobot", "codebase_version": info["codebase_version"],
                                            "path": str(src), "robot_type": info.get("robot_type"),
                                            "skipped": skipped}})
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return {"command": "import", "format": "lerobot", "episodes": episodes, "frames": frames,
            "skipped_episodes": len(skipped), "cameras": ",".join(cameras or []), "image_size": size,
            "tasks": len(tasks), "shards": len(records), "groups_kept": kept_groups, "manifest": str(manifest),
            "wall_seconds": round(time.perf_counter() - started, 2), "skipped": skipped}


def _names(feature: dict[str, Any]) -> list[str]:
    """A feature's per-dimension names (LeRobot: a list, or {"axes"/"motors": [...]}); [] if none."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next((value for value in names.values() if isinstance(value, list)), None)
    shape = feature.get("shape") or [0]
    return [str(n) for n in names] if isinstance(names, list) and len(names) == int(shape[0]) else []
