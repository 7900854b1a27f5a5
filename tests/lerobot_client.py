"""LeRobot's own code as the client of vla-dist's LeRobot import and export: run with the python of a
separate virtual environment holding lerobot-dataset 0.4.4 (module `ledataset`, LeRobot's dataset
package; it cannot share vla-dist's environment), by tests/test_lerobot_client.py.

    python lerobot_client.py create OUT_DIR EPISODES.npz [image]   # LeRobotDataset.create/add_frame/save_episode
    python lerobot_client.py read DATASET_DIR OUT.npz       # LeRobotDataset(root=...) item by item

EPISODES.npz (create's input) and OUT.npz (read's output) hold numpy arrays only (no pickle):
`fps`, `tasks` (unicode), `cameras` (unicode), per episode `state_E`, `action_E`, `task_E` and
`frames_CAMERA_E` (uint8 [T, H, W, 3]); read writes the same per frame plus `episode_index` and
`frame_index`. Imports nothing but numpy and ledataset; never touches the network (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CAMERA_PREFIX = "observation.images."


def create(out: Path, episodes_npz: Path, camera_dtype: str = "video") -> None:
    """`camera_dtype` "image": frames as PNG inside the data parquet (LeRobot's use_videos=False)."""
    from ledataset.datasets.lerobot_dataset import LeRobotDataset

    data = np.load(episodes_npz, allow_pickle=False)
    cameras, tasks = [str(c) for c in data["cameras"]], [str(t) for t in data["tasks"]]
    first = data["frames_" + cameras[0] + "_0"]
    features = {
        "observation.state": {"dtype": "float32", "shape": (data["state_0"].shape[1],), "names": None},
        "action": {"dtype": "float32", "shape": (data["action_0"].shape[1],), "names": None},
        **{CAMERA_PREFIX + camera: {"dtype": camera_dtype, "shape": first.shape[1:],
                                    "names": ["height", "width", "channels"]} for camera in cameras},
    }
    dataset = LeRobotDataset.create(repo_id="local/lerobot-made", fps=int(data["fps"]), features=features, root=out,
                                    robot_type="test_arm", use_videos=camera_dtype == "video")  # its default codec: AV1
    episode = 0
    while f"state_{episode}" in data:
        for t in range(len(data[f"state_{episode}"])):
            dataset.add_frame({"observation.state": data[f"state_{episode}"][t],
                               "action": data[f"action_{episode}"][t], "task": tasks[int(data[f"task_{episode}"])],
                               **{CAMERA_PREFIX + c: data[f"frames_{c}_{episode}"][t] for c in cameras}})
        dataset.save_episode(parallel_encoding=False)
        episode += 1
    dataset.finalize()


def read(root: Path, out_npz: Path) -> None:
    from ledataset.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("local/vla-dist-export", root=root, video_backend="pyav")
    cameras = sorted(key.removeprefix(CAMERA_PREFIX) for key in dataset.meta.video_keys)
    rows: dict[str, list[np.ndarray]] = {}
    tasks: list[str] = []
    for index in range(len(dataset)):
        item = dataset[index]
        tasks.append(item["task"])
        for key in ("observation.state", "action", "episode_index", "frame_index"):
            rows.setdefault(key, []).append(item[key].numpy())
        for camera in cameras:  # float [3, H, W] in [0, 1] -> uint8 [H, W, 3]
            frame = (item[CAMERA_PREFIX + camera].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
            rows.setdefault("frames_" + camera, []).append(frame)
    np.savez(out_npz, fps=np.array(dataset.fps), num_episodes=np.array(dataset.num_episodes),
             cameras=np.array(cameras), tasks=np.array(tasks), stats_keys=np.array(sorted(dataset.meta.stats)),
             **{key.replace("observation.", ""): np.stack(values) for key, values in rows.items()})


if __name__ == "__main__":
    mode, first, second, *rest = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:]
    {"create": create, "read": read}[mode](first, second, *rest)
