"""A LeRobot v3.0 dataset written without lerobot (pyarrow + PyAV), for the import tests: the
layout LeRobot 0.4 writes (checked against lerobot-dataset 0.4.4's LeRobotDataset, which opens such
a directory with exact states, actions and tasks). One data file, one video file per camera, all
episodes back to back, as LeRobot does below its 100/200 MB file sizes; no stats.json."""

from __future__ import annotations

import json
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def _pandas_tasks_table(tasks: list[str]) -> pa.Table:
    """tasks.parquet readable by pandas with the task string as index (what LeRobot expects:
    it looks tasks up via DataFrame.index; a plain column silently yields integer 'task's)."""
    tab = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pmeta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.0.0",
    }
    return tab.replace_schema_metadata({b"pandas": json.dumps(pmeta).encode()})


def _fixed_size_list(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def write_dataset(
    root: str | Path,
    episodes: Iterable[dict[str, Any]],
    fps: int,
    robot_type: str | None = None,
    vcodec: str = "libx264",
    crf: int = 30,
    gop: int = 2,
    state_key: str = "observation.state",
    action_key: str = "action",
) -> Path:
    import av

    root = Path(root)
    root.mkdir(parents=True, exist_ok=False)
    eps = list(episodes)
    if not eps:
        raise ValueError("no episodes")
    cams = sorted(eps[0]["frames"])
    S, A = eps[0]["state"].shape[1], eps[0]["action"].shape[1]

    tasks: list[str] = []
    for e in eps:
        if e["task"] not in tasks:
            tasks.append(e["task"])

    # ---- videos: one stream per camera, all episodes back to back, pts = global frame counter
    containers, streams, hw = {}, {}, {}
    for cam in cams:
        p = root / VIDEO_PATH.format(video_key=cam, chunk_index=0, file_index=0)
        p.parent.mkdir(parents=True, exist_ok=True)
        h, w = eps[0]["frames"][cam].shape[1:3]
        hw[cam] = (h, w)
        c = av.open(str(p), "w")
        opts = {"g": str(gop), "crf": str(crf)}
        if vcodec == "libsvtav1":
            opts["preset"] = "12"
        s = c.add_stream(vcodec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = Fraction(1, fps)
        containers[cam], streams[cam] = c, s

    cols: dict[str, list] = {k: [] for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")}
    states, actions = [], []
    ep_rows = []
    g = 0  # global frame index
    for ei, e in enumerate(eps):
        T = len(e["state"])
        for cam in cams:
            fr = e["frames"][cam]
            assert fr.shape[0] == T and fr.dtype == np.uint8
            for t in range(T):
                vf = av.VideoFrame.from_ndarray(fr[t], format="rgb24")
                vf.pts = g + t
                vf.time_base = Fraction(1, fps)
                for pkt in streams[cam].encode(vf):
                    containers[cam].mux(pkt)
        cols["timestamp"].append(np.arange(T, dtype=np.float32) / np.float32(fps))
        cols["frame_index"].append(np.arange(T, dtype=np.int64))
        cols["episode_index"].append(np.full(T, ei, np.int64))
        cols["index"].append(np.arange(g, g + T, dtype=np.int64))
        cols["task_index"].append(np.full(T, tasks.index(e["task"]), np.int64))
        states.append(np.asarray(e["state"], np.float32))
        actions.append(np.asarray(e["action"], np.float32))
        row = {
            "episode_index": ei, "tasks": [e["task"]], "length": T,
            "data/chunk_index": 0, "data/file_index": 0,
            "dataset_from_index": g, "dataset_to_index": g + T,
        }
        for cam in cams:
            row |= {
                f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": 0,
                f"videos/{cam}/from_timestamp": g / fps, f"videos/{cam}/to_timestamp": (g + T) / fps,
            }
        row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        ep_rows.append(row)
        g += T
    for cam in cams:
        for pkt in streams[cam].encode():
            containers[cam].mux(pkt)
        containers[cam].close()

    # ---- data parquet
    state_all, action_all = np.concatenate(states), np.concatenate(actions)
    data = pa.table({
        state_key: _fixed_size_list(state_all), action_key: _fixed_size_list(action_all),
        **{k: pa.array(np.concatenate(v)) for k, v in cols.items()},
    })
    dp = root / DATA_PATH.format(chunk_index=0, file_index=0)
    dp.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, dp, compression="snappy")

    # ---- meta
    (root / "meta").mkdir(exist_ok=True)
    pq.write_table(_pandas_tasks_table(tasks), root / "meta/tasks.parquet")
    epp = root / "meta/episodes/chunk-000/file-000.parquet"
    epp.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ep_rows), epp)

    scalar = {"dtype": None, "shape": [1], "names": None}
    features = {
        state_key: {"dtype": "float32", "shape": [S], "names": None},
        action_key: {"dtype": "float32", "shape": [A], "names": None},
        **{cam: {"dtype": "video", "shape": [*hw[cam], 3], "names": ["height", "width", "channels"],
                 "info": {"video.height": hw[cam][0], "video.width": hw[cam][1],
                          "video.codec": "av1" if vcodec == "libsvtav1" else vcodec,
                          "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                          "video.fps": fps, "video.channels": 3, "has_audio": False}}
           for cam in cams},
        "timestamp": scalar | {"dtype": "float32"},
        **{k: scalar | {"dtype": "int64"} for k in ("frame_index", "episode_index", "index", "task_index")},
    }
    info = {
        "codebase_version": "v3.0", "robot_type": robot_type,
        "total_episodes": len(eps), "total_frames": g, "total_tasks": len(tasks),
        "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "fps": fps, "splits": {"train": f"0:{len(eps)}"},
        "data_path": DATA_PATH, "video_path": VIDEO_PATH, "features": features,
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return root
