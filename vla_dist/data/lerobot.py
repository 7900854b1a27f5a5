"""Reading a LeRobot dataset (format v3.0) from a local directory, without lerobot: pyarrow for the
parquet files, PyAV for the videos. `vla-dist import lerobot` (data/lerobot_import.py) uses it.

The layout (what LeRobot 0.4 / lerobot-dataset 0.4.4 writes; facts measured on datasets it wrote):
    meta/info.json                               codebase_version "v3.0", fps, features (dtype/shape/names
                                                 per key; cameras have dtype "video"), data_path and
                                                 video_path templates
    meta/tasks.parquet                           task string (the pandas index column) <-> task_index
    meta/episodes/chunk-CCC/file-FFF.parquet     one row per episode: length, data/{chunk,file}_index,
                                                 videos/<camera>/{chunk_index,file_index,from_timestamp}
    data/chunk-CCC/file-FFF.parquet              one row per frame, many episodes per file: episode_index,
                                                 frame_index, timestamp, task_index, observation.state, action
    videos/<camera>/chunk-CCC/file-FFF.mp4       episodes appended one after the other; frame i of an
                                                 episode is the one at from_timestamp + timestamp[i]
    (a camera of dtype "image" has no mp4: its frames are PNG bytes in a data-parquet column)
v2.1 (one file per episode, meta/*.jsonl) is refused with the way to convert it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

STATE_KEY, ACTION_KEY = "observation.state", "action"
CAMERA_PREFIX = "observation.images."
# LeRobot's decoder accepts a frame within 1e-4 s of its timestamp; ours a little more (float32 timestamps)
FRAME_TOLERANCE_S = 1e-3


class LeRobotFormatError(ValueError):
    """A directory that is not a readable LeRobot v3.0 dataset; the message names the file."""


@dataclass
class LeRobotEpisode:
    index: int
    task: str  # the task string of its first frame (the instruction)
    fps: float
    state: np.ndarray  # float32 [T, S]
    action: np.ndarray  # float32 [T, A]
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # camera key -> uint8 [T, H, W, 3]


def read_info(root: str | Path) -> dict[str, Any]:
    path = Path(root) / "meta" / "info.json"
    if not path.is_file():
        raise LeRobotFormatError(f"{path} is missing: not a LeRobot dataset")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LeRobotFormatError(f"{path}: unreadable JSON ({error})") from None
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise LeRobotFormatError(f"{path}: codebase_version {version!r}; only v3.x is read (a v2.1 dataset "
                                 "converts with LeRobot's own v2.1 -> v3.0 converter)")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise LeRobotFormatError(f"{path} lacks {key!r}")
    return info


def camera_keys(info: dict[str, Any]) -> list[str]:
    """Cameras stored as mp4 streams (dtype "video")."""
    return [key for key, feature in info["features"].items() if feature.get("dtype") == "video"]


def image_keys(info: dict[str, Any]) -> list[str]:
    """Cameras stored frame by frame inside the data parquet (dtype "image": struct{bytes, path})."""
    return [key for key, feature in info["features"].items() if feature.get("dtype") == "image"]


def _decode_images(cells: list[Any], path: Path, index: int, camera: str) -> np.ndarray:
    """uint8 [T, H, W, 3] from the image column's {"bytes", "path"} cells."""
    import io

    from PIL import Image, UnidentifiedImageError

    frames = []
    for t, cell in enumerate(cells):
        raw = cell.get("bytes") if isinstance(cell, dict) else None
        if not raw:
            raise LeRobotFormatError(f"{path}: episode {index}, {camera} frame {t} holds no image bytes "
                                     "(a dataset whose images live outside the parquet is not read)")
        try:
            frames.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
        except (OSError, UnidentifiedImageError) as error:
            raise LeRobotFormatError(f"{path}: episode {index}, {camera} frame {t}: unreadable image "
                                     f"({error})") from None
    return np.stack(frames)


def read_tasks(root: str | Path) -> dict[int, str]:
    """task_index -> task string. LeRobot writes the string as the pandas index of the table (a column
    the pandas metadata names, usually __index_level_0__); a plain `task` column is read too."""
    import pyarrow.parquet as pq

    path = Path(root) / "meta" / "tasks.parquet"
    if not path.is_file():
        raise LeRobotFormatError(f"{path} is missing")
    table = pq.read_table(path)
    names = table.column_names
    column = "task" if "task" in names else None
    pandas = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    for candidate in [*pandas.get("index_columns", []), "__index_level_0__"]:
        if column is None and isinstance(candidate, str) and candidate in names:
            column = candidate
    if column is None or "task_index" not in names:
        raise LeRobotFormatError(f"{path}: no task string / task_index columns in {names}")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(column).to_pylist(),
                                           strict=True)}


def read_episodes_meta(root: str | Path) -> list[dict[str, Any]]:
    """One dict per episode, by episode_index, without the per-episode stats/* columns."""
    import pyarrow.parquet as pq

    paths = sorted((Path(root) / "meta" / "episodes").glob("*/*.parquet"))
    if not paths:
        raise LeRobotFormatError(f"{Path(root) / 'meta' / 'episodes'} holds no episode parquet")
    rows: list[dict[str, Any]] = []
    for path in paths:
        columns = [name for name in pq.read_schema(path).names if not name.startswith("stats/")]
        rows += pq.read_table(path, columns=columns).to_pylist()
    return sorted(rows, key=lambda row: int(row["episode_index"]))


def _to_numpy(column: Any, dtype: Any) -> np.ndarray:
    """A list/fixed-size-list column -> [T, D]; a scalar column -> [T]."""
    import pyarrow as pa

    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        flat = array.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(array), -1).astype(dtype, copy=False)
    return array.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def decode_frames_at(video: Path, times_s: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB: for each time (seconds in the file), the frame presented there.
    Seeks to the key frame before the first and decodes forward to the last."""
    import av

    first, last = float(times_s.min()), float(times_s.max())
    stamps: list[float] = []
    frames: list[np.ndarray] = []
    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            base = Fraction(stream.time_base) if stream.time_base is not None else Fraction(1, 1)
            start = stream.start_time or 0
            container.seek(max(int(first / base) + start, start), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                stamp = float((frame.pts - start) * base)
                if stamp < first - FRAME_TOLERANCE_S:
                    continue
                stamps.append(stamp)
                frames.append(frame.to_ndarray(format="rgb24"))
                if stamp >= last - FRAME_TOLERANCE_S:
                    break
    except (OSError, av.FFmpegError) as error:
        raise LeRobotFormatError(f"{video}: unreadable video ({error})") from None
    if not stamps:
        raise LeRobotFormatError(f"{video}: no frame in [{first:.4f}, {last:.4f}] s")
    got = np.asarray(stamps)
    nearest = np.abs(times_s[:, None] - got[None, :]).argmin(axis=1)
    off = np.abs(got[nearest] - times_s)
    if (off > FRAME_TOLERANCE_S).any():
        worst = int(off.argmax())
        raise LeRobotFormatError(f"{video}: no frame within {FRAME_TOLERANCE_S} s of t={times_s[worst]:.4f} s "
                                 f"(nearest {got[nearest[worst]]:.4f} s)")
    return np.stack([frames[i] for i in nearest])


def iter_lerobot_episodes(root: str | Path, decode_video: bool = True, episodes: set[int] | None = None,
                          on_skip: Callable[[int, str], None] | None = None) -> Iterator[LeRobotEpisode]:
    """The dataset's episodes in episode_index order (one data file is kept in memory at a time);
    only those in `episodes` when given. An episode whose files are missing or broken raises
    LeRobotFormatError naming the file, or with `on_skip` is passed over: on_skip(index, why)."""
    root = Path(root)
    info = read_info(root)
    for key in (STATE_KEY, ACTION_KEY):
        if key not in info["features"]:
            raise LeRobotFormatError(f"{root / 'meta' / 'info.json'}: no {key!r} feature "
                                     f"(has {list(info['features'])})")
    tasks, tables = read_tasks(root), _DataFiles(image_keys(info))
    for meta in read_episodes_meta(root):
        index = int(meta["episode_index"])
        if episodes is not None and index not in episodes:
            continue
        try:
            yield _read_episode(root, info, tasks, meta, tables, decode_video)
        except LeRobotFormatError as error:
            if on_skip is None:
                raise
            on_skip(index, str(error))


class _DataFiles:
    """The data parquet last read (consecutive episodes share one), or why it could not be read."""

    def __init__(self, images: list[str]) -> None:
        self.images = images  # image-dtype cameras: their frames are in the data parquet
        self.path: Path | None = None
        self.table: Any = None
        self.error: str | None = None

    def rows(self, path: Path, index: int) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.path != path:
            self.path, self.table, self.error = path, None, None
            columns = ["episode_index", "frame_index", "timestamp", "task_index", STATE_KEY, ACTION_KEY,
                       *self.images]
            if not path.is_file():
                self.error = f"{path} is missing"
            else:
                try:
                    self.table = pq.read_table(path, columns=columns)
                except (OSError, pa.ArrowException) as error:
                    self.error = f"{path}: unreadable parquet ({str(error).splitlines()[0]})"
        if self.error is not None:
            raise LeRobotFormatError(f"{self.error} (episode {index})")
        return self.table


def _read_episode(root: Path, info: dict[str, Any], tasks: dict[int, str], meta: dict[str, Any], tables: _DataFiles,
                  decode_video: bool) -> LeRobotEpisode:
    import pyarrow.compute as pc

    index = int(meta["episode_index"])
    path = root / info["data_path"].format(chunk_index=int(meta["data/chunk_index"]),
                                           file_index=int(meta["data/file_index"]))
    table = tables.rows(path, index)
    rows = table.filter(pc.equal(table.column("episode_index"), index))
    rows = rows.take(np.argsort(_to_numpy(rows.column("frame_index"), np.int64), kind="stable"))
    if rows.num_rows != int(meta["length"]) or rows.num_rows == 0:
        raise LeRobotFormatError(f"{path}: episode {index} has {rows.num_rows} frames, meta/episodes says "
                                 f"{meta['length']}")
    timestamp = _to_numpy(rows.column("timestamp"), np.float64)
    episode = LeRobotEpisode(index=index, task=tasks[int(_to_numpy(rows.column("task_index"), np.int64)[0])],
                             fps=float(info["fps"]), state=_to_numpy(rows.column(STATE_KEY), np.float32),
                             action=_to_numpy(rows.column(ACTION_KEY), np.float32))
    for camera in tables.images if decode_video else []:  # PNG (or JPEG) bytes per frame, in the parquet
        episode.frames[camera] = _decode_images(rows.column(camera).to_pylist(), path, index, camera)
    for camera in camera_keys(info) if decode_video else []:
        video = root / info["video_path"].format(video_key=camera,
                                                 chunk_index=int(meta[f"videos/{camera}/chunk_index"]),
                                                 file_index=int(meta[f"videos/{camera}/file_index"]))
        if not video.is_file():
            raise LeRobotFormatError(f"{video} is missing (episode {index}, camera {camera})")
        episode.frames[camera] = decode_frames_at(video, float(meta[f"videos/{camera}/from_timestamp"]) + timestamp)
    return episode
