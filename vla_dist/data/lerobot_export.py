"""`vla-dist export-data lerobot DATA_DIR --out DIR`: vla-dist shards as a LeRobot v3.0 dataset, so
that LeRobot's own tools (`LeRobotDataset`, its viewer, its training scripts) open what vla-dist
collected or imported.

The layout is the one LeRobot 0.4 writes itself (vla_dist/data/lerobot.py reads the same one):
`meta/info.json`, `meta/tasks.parquet`, `meta/episodes/chunk-000/file-000.parquet`,
`meta/stats.json`, the frames in `data/chunk-000/file-NNN.parquet`, and one H.264 (or AV1, LeRobot's
default) mp4 stream per camera in `videos/observation.images.<camera>/chunk-000/file-NNN.mp4`,
episodes back to back. Files roll over past `data_file_mb`/`video_file_mb` as LeRobot's do.
Everything streams: one episode's frames are in memory at a time (statistics keep the low-dimensional
columns and a few sampled frames per episode, as LeRobot's own image statistics do).

The export is written under `DIR.partial` and renamed to `DIR` once complete: an interrupted export
leaves no directory at `DIR` that LeRobot would open as a whole dataset.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vla_dist.data.lerobot import ACTION_KEY, CAMERA_PREFIX, STATE_KEY

DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
CHUNKS_SIZE = 1000  # files per chunk directory (LeRobot's default)
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # the q01 ... q99 entries LeRobot 0.4's stats.json holds
VIDEO_CODECS = {"h264": ("libx264", "h264"), "av1": ("libsvtav1", "av1")}  # ours -> (encoder, info.json name)
_INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
_IMAGE_SAMPLES_PER_EPISODE = 8  # frames per episode and camera in the image statistics


class LeRobotExportError(ValueError):
    """The export cannot be written as asked (the message names the file or argument)."""


class LeRobotV3Writer:
    """Writes a LeRobot v3.0 dataset one episode at a time into `root` (which must not exist).

    `add_episode(task, state [T,S], action [T,A], frames {camera: uint8 [T,H,W,3]})`, then `close()`
    for meta/ (info, tasks, episodes, stats). State and action are float32; every episode must have
    the cameras, frame size and widths of the first."""

    def __init__(self, root: str | Path, *, fps: float, robot_type: str | None = None,
                 state_names: Sequence[str] = (), action_names: Sequence[str] = (), vcodec: str = "h264",
                 crf: int = 23, gop: int = 2, data_file_mb: float = 100.0, video_file_mb: float = 200.0) -> None:
        if vcodec not in VIDEO_CODECS:
            raise LeRobotExportError(f"vcodec must be one of {sorted(VIDEO_CODECS)}, got {vcodec!r}")
        if float(fps) != int(fps) or fps <= 0:
            raise LeRobotExportError(f"LeRobot datasets have a whole-number fps; this dataset's is {fps}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=False)
        self.fps, self.robot_type, self.vcodec, self.crf, self.gop = int(fps), robot_type, vcodec, crf, gop
        self.state_names, self.action_names = list(state_names), list(action_names)
        self.data_limit, self.video_limit = data_file_mb * 2**20, video_file_mb * 2**20
        self.tasks: list[str] = []
        self.episode_rows: list[dict[str, Any]] = []
        self.frames = 0
        self.cameras: list[str] | None = None
        self.shape: tuple[int, int, int, int] | None = None  # S, A, H, W
        self._data_file, self._data_writer, self._data_bytes = 0, None, 0
        self._videos: dict[str, _VideoFile] = {}
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._image_samples: dict[str, list[np.ndarray]] = {}

    def add_episode(self, task: str, state: np.ndarray, action: np.ndarray, frames: Mapping[str, np.ndarray]) -> None:
        state, action = np.asarray(state, np.float32), np.asarray(action, np.float32)
        length = len(action)
        if self.cameras is None:
            self._start(state, action, frames)
        assert self.cameras is not None and self.shape is not None
        width = (state.shape[1], action.shape[1], *next(iter(frames.values())).shape[1:3])
        if sorted(frames) != self.cameras or width != self.shape or len(state) != length:
            raise LeRobotExportError(
                f"episode {len(self.episode_rows)}: cameras {sorted(frames)}, state/action/frame widths {width}, "
                f"{len(state)} states for {length} actions; the first episode had {self.cameras}, {self.shape}")
        if task not in self.tasks:
            self.tasks.append(task)
        index = len(self.episode_rows)
        row: dict[str, Any] = {"episode_index": index, "tasks": [task], "length": length}
        row |= self._write_data(index, task, state, action)
        for camera in self.cameras:
            video = frames[camera]
            if video.dtype != np.uint8 or len(video) != length:
                raise LeRobotExportError(f"episode {index}, camera {camera}: {len(video)} {video.dtype} frames "
                                         f"for {length} steps (uint8 expected)")
            row |= self._write_video(camera, video)
            picks = np.linspace(0, length - 1, min(length, _IMAGE_SAMPLES_PER_EPISODE)).round().astype(int)
            self._image_samples[camera].append(video[picks, ::2, ::2])  # LeRobot also downsamples for its stats
        row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        self.episode_rows.append(row)
        self._states.append(state)
        self._actions.append(action)
        self.frames += length

    def close(self) -> dict[str, Any]:
        """Finish the data and video files and write meta/; -> info.json's contents."""
        if not self.episode_rows:
            raise LeRobotExportError("no episodes to export")
        if self._data_writer is not None:
            self._data_writer.close()
        for video in self._videos.values():
            video.close()
        meta = self.root / "meta"
        pq.write_table(_pandas_tasks_table(self.tasks), meta / "tasks.parquet")
        (self.root / EPISODES_PATH).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episode_rows), self.root / EPISODES_PATH)
        (meta / "stats.json").write_text(json.dumps(self._stats(), indent=4))
        info = self._info()
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        return info

    # --- data and video files -------------------------------------------------------------------
    def _start(self, state: np.ndarray, action: np.ndarray, frames: Mapping[str, np.ndarray]) -> None:
        self.cameras = sorted(frames)
        if not self.cameras:
            raise LeRobotExportError("the episodes have no camera frames")
        height, width = next(iter(frames.values())).shape[1:3]
        self.shape = (state.shape[1], action.shape[1], height, width)
        self._image_samples = {camera: [] for camera in self.cameras}
        (self.root / "meta").mkdir()

    def _write_data(self, index: int, task: str, state: np.ndarray, action: np.ndarray) -> dict[str, Any]:
        length, start = len(action), self.frames
        if self._data_writer is not None and self._data_bytes >= self.data_limit:
            self._data_writer.close()
            self._data_writer, self._data_file, self._data_bytes = None, self._data_file + 1, 0
        chunk, file = divmod(self._data_file, CHUNKS_SIZE)
        table = pa.table({
            STATE_KEY: _fixed_size_list(state), ACTION_KEY: _fixed_size_list(action),
            "timestamp": pa.array(np.arange(length, dtype=np.float32) / np.float32(self.fps)),
            "frame_index": pa.array(np.arange(length, dtype=np.int64)),
            "episode_index": pa.array(np.full(length, index, np.int64)),
            "index": pa.array(np.arange(start, start + length, dtype=np.int64)),
            "task_index": pa.array(np.full(length, self.tasks.index(task), np.int64)),
        })
        if self._data_writer is None:
            path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(path, table.schema, compression="snappy")
        self._data_writer.write_table(table)  # one row group per episode
        self._data_bytes += table.nbytes
        return {"data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": start, "dataset_to_index": start + length}

    def _write_video(self, camera: str, video: np.ndarray) -> dict[str, Any]:
        key = CAMERA_PREFIX + camera
        current = self._videos.get(camera)
        if current is None or current.bytes() >= self.video_limit:
            number = 0 if current is None else current.number + 1
            if current is not None:
                current.close()
            chunk, file = divmod(number, CHUNKS_SIZE)
            path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            current = self._videos[camera] = _VideoFile(path, number, self.fps, video.shape[1:3],
                                                        VIDEO_CODECS[self.vcodec][0], self.crf, self.gop)
        first = current.frames
        current.encode(video)
        chunk, file = divmod(current.number, CHUNKS_SIZE)
        return {f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                f"videos/{key}/from_timestamp": first / self.fps,
                f"videos/{key}/to_timestamp": current.frames / self.fps}

    # --- meta -----------------------------------------------------------------------------------
    def _stats(self) -> dict[str, Any]:
        states, actions = np.concatenate(self._states), np.concatenate(self._actions)
        lengths = [row["length"] for row in self.episode_rows]
        columns = {
            "timestamp": np.concatenate([np.arange(n, dtype=np.float32) / self.fps for n in lengths]),
            "frame_index": np.concatenate([np.arange(n) for n in lengths]),
            "episode_index": np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]),
            "index": np.arange(self.frames),
            "task_index": np.concatenate([np.full(row["length"], self.tasks.index(row["tasks"][0]))
                                          for row in self.episode_rows]),
        }
        stats = {STATE_KEY: _vector_stats(states), ACTION_KEY: _vector_stats(actions)}
        stats |= {name: _vector_stats(values[:, None]) for name, values in columns.items()}
        for camera, samples in self._image_samples.items():
            stats[CAMERA_PREFIX + camera] = _image_stats(np.concatenate(samples))
        return stats

    def _info(self) -> dict[str, Any]:
        assert self.cameras is not None and self.shape is not None
        state_dim, action_dim, height, width = self.shape
        scalar = {"shape": [1], "names": None}
        video_info = {"video.height": height, "video.width": width, "video.codec": VIDEO_CODECS[self.vcodec][1],
                      "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                      "video.channels": 3, "has_audio": False}
        features: dict[str, Any] = {
            STATE_KEY: {"dtype": "float32", "shape": [state_dim], "names": _names(self.state_names, state_dim)},
            ACTION_KEY: {"dtype": "float32", "shape": [action_dim], "names": _names(self.action_names, action_dim)},
            **{CAMERA_PREFIX + camera: {"dtype": "video", "shape": [height, width, 3],
                                        "names": ["height", "width", "channels"], "info": dict(video_info)}
               for camera in self.cameras},
            "timestamp": {"dtype": "float32", **scalar},
            **{name: {"dtype": "int64", **scalar} for name in _INDEX_COLUMNS[1:]},
        }
        episodes = len(self.episode_rows)
        return {
            "codebase_version": "v3.0", "robot_type": self.robot_type,
            "total_episodes": episodes, "total_frames": self.frames, "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": self.data_limit / 2**20,
            "video_files_size_in_mb": self.video_limit / 2**20, "fps": self.fps, "splits": {"train": f"0:{episodes}"},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH, "features": features,
        }


class _VideoFile:
    """One camera's mp4 (yuv420p, `gop` frames between keyframes as LeRobot encodes, so that random
    frame access stays cheap); pts count frames from the file's start."""

    def __init__(self, path: Path, number: int, fps: int, size: tuple[int, int], encoder: str, crf: int,
                 gop: int) -> None:
        import av

        if size[0] % 2 or size[1] % 2:
            raise LeRobotExportError(f"{path}: frames of {size[0]}x{size[1]}; yuv420p video needs even sizes")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.number, self.frames = path, number, 0
        self.container = av.open(str(path), "w")
        options = {"g": str(gop), "crf": str(crf)} | ({"preset": "12"} if encoder == "libsvtav1" else {})
        self.stream = self.container.add_stream(encoder, rate=fps, options=options)
        self.stream.width, self.stream.height, self.stream.pix_fmt = size[1], size[0], "yuv420p"
        self.time_base = self.stream.time_base = Fraction(1, fps)  # the muxer changes the stream's: keep ours

    def encode(self, video: np.ndarray) -> None:
        import av

        for frame in video:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts, picture.time_base = self.frames, self.time_base
            self.frames += 1
            for packet in self.stream.encode(picture):
                self.container.mux(packet)

    def bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def export_lerobot(data_dir: str | Path, out: str | Path, *, vcodec: str = "h264", robot_type: str | None = None,
                   on_episode: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Export every episode of the vla-dist dataset `data_dir` to a new LeRobot v3.0 dataset at
    `out`; the report. Each episode's instruction becomes its LeRobot task string."""
    import time

    from vla_dist.data.manifest import read_manifest
    from vla_dist.data.reader import ShardErrors, iter_episodes

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LeRobotExportError(f"{out}: exists and is not empty (export into a new directory)")
    manifest = read_manifest(data_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a previous interrupted export's leftovers
    source = manifest.get("source") or {}
    writer = LeRobotV3Writer(
        partial, fps=manifest["fps"], robot_type=robot_type or source.get("robot_type") or "franka_panda",
        state_names=manifest["state_space"].get("names") or (),
        action_names=manifest["action_space"].get("names") or (), vcodec=vcodec)
    errors = ShardErrors()
    for done, episode in enumerate(iter_episodes(data_dir, verify="sha256", on_error=errors), start=1):
        writer.add_episode(episode.instruction, episode.state, episode.actions, episode.frames)
        if on_episode is not None:
            on_episode(done, int(manifest["episodes"]))
    if errors:
        shutil.rmtree(partial, ignore_errors=True)
        raise LeRobotExportError(f"{data_dir}: corrupt shards {errors.shards}; nothing exported")
    info = writer.close()
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    return {"command": "export-data", "format": "lerobot", "episodes": info["total_episodes"],
            "frames": info["total_frames"], "tasks": info["total_tasks"], "cameras": ",".join(writer.cameras or []),
            "vcodec": vcodec, "out": str(out), "wall_seconds": round(time.perf_counter() - started, 2)}


def _names(names: Sequence[str], dim: int) -> list[str] | None:
    return list(names) if len(names) == dim else None


def _fixed_size_list(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _pandas_tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet with the task string as its pandas index: LeRobot looks tasks up through
    DataFrame.index, and a plain column silently gives it integer 'tasks'."""
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"], "column_indexes": [],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.0.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _vector_stats(values: np.ndarray) -> dict[str, list[Any]]:
    """min/max/mean/std/qNN per dimension over frames, and the frame count (stats.json's layout)."""
    values64 = values.astype(np.float64)
    stats = {"min": values.min(0), "max": values.max(0), "mean": values64.mean(0), "std": values64.std(0)}
    stats |= {f"q{round(q * 100):02d}": np.quantile(values64, q, axis=0) for q in QUANTILES}
    return {**{name: np.asarray(value).tolist() for name, value in stats.items()}, "count": [len(values)]}


def _image_stats(frames: np.ndarray) -> dict[str, list[Any]]:
    """Per-channel statistics of uint8 [N, H, W, 3] frames in [0, 1], each shaped [3, 1, 1] as LeRobot's."""
    stats = _vector_stats(frames.reshape(-1, 3).astype(np.float32) / 255.0)
    return {name: [[[channel]] for channel in value] if name != "count" else [len(frames)]
            for name, value in stats.items()}
