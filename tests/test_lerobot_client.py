"""The LeRobot round trip with LeRobot's own code as the client (heavy): lerobot-dataset 0.4.4's
`LeRobotDataset` writes a dataset that `vla-dist import lerobot` reads exactly, and opens the dataset
`vla-dist export-data lerobot` writes from collected sim data with the same values.

LeRobot cannot share vla-dist's environment (it needs a torchvision whose VideoReader, its pyav
decoder, later torchvision releases dropped, and so an older torch), so the first run builds a
virtual environment under the compile-cache directory (about 4 minutes and 8 GB) and later runs
reuse it; tests/lerobot_client.py runs in it as a subprocess. VLA_DIST_LEROBOT_PYTHON names an
existing environment's python instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_dist.cli import main
from vla_dist.data import iter_episodes
from vla_dist.runtime import cache_root

from .test_lerobot_import import LENGTHS, TASKS, recorded_episodes

pytestmark = pytest.mark.heavy
REQUIREMENTS = ["torchvision==0.25.0", "lerobot-dataset==0.4.4"]  # torchvision 0.25 brings its torch (2.10)
NEEDS_BYTES = 12 * 2**30
CLIENT = Path(__file__).with_name("lerobot_client.py")


@pytest.fixture(scope="module")
def lerobot_python() -> Path:
    if os.environ.get("VLA_DIST_LEROBOT_PYTHON"):
        return Path(os.environ["VLA_DIST_LEROBOT_PYTHON"])
    venv = cache_root() / "lerobot-client-venv"
    marker = venv / "vla-dist-installed.txt"
    if marker.is_file() and marker.read_text() == " ".join(REQUIREMENTS):
        return venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(venv.parent).free
    if free < NEEDS_BYTES:
        pytest.skip(f"LeRobot's environment needs about 8 GB; {venv.parent} has {free / 2**30:.1f} GiB free")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *REQUIREMENTS], capture_output=True,
                             text=True, timeout=1500, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    marker.write_text(" ".join(REQUIREMENTS))
    return venv / "bin" / "python"


def run_client(python: Path, *args: Path) -> None:
    proc = subprocess.run([str(python), str(CLIENT), *map(str, args)], capture_output=True, text=True, timeout=900,
                          check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("camera_dtype", ["video", "image"])  # mp4 streams, or PNG frames inside the parquet
def test_a_dataset_lerobot_wrote_imports_exactly(lerobot_python, tmp_path, camera_dtype):
    episodes = recorded_episodes()
    tasks = list(dict.fromkeys(TASKS))
    arrays = {"fps": np.array(10), "tasks": np.array(tasks), "cameras": np.array(["front", "wrist"])}
    for e, episode in enumerate(episodes):
        arrays |= {f"state_{e}": episode["state"], f"action_{e}": episode["action"],
                   f"task_{e}": np.array(tasks.index(episode["task"]))}
        arrays |= {f"frames_{camera}_{e}": frames for camera, frames in episode["frames"].items()}
    np.savez(tmp_path / "episodes.npz", **arrays)
    made, out = tmp_path / "lerobot-made", tmp_path / "imported"
    run_client(lerobot_python, Path("create"), made, tmp_path / "episodes.npz", Path(camera_dtype))

    assert main(["import", "lerobot", str(made), "--out", str(out)]) == 0
    imported = sorted(iter_episodes(out), key=lambda episode: episode.episode_id)
    assert [len(episode.actions) for episode in imported] == LENGTHS
    for episode, want in zip(imported, episodes, strict=True):
        assert episode.instruction == want["task"] and episode.fps == 10.0
        np.testing.assert_array_equal(episode.state, want["state"])
        np.testing.assert_array_equal(episode.actions, want["action"])
        for camera in ("front", "wrist"):
            error = np.abs(episode.frames[camera].astype(int) - want["frames"][camera].astype(int)).mean()
            assert error < 3.0, (episode.episode_id, camera, error)  # LeRobot's AV1 or PNG, then our mp4


def test_lerobot_opens_what_we_export(lerobot_python, quickstart_run, tmp_path):
    _, data_dir, _ = quickstart_run
    out = tmp_path / "exported"
    assert main(["export-data", "lerobot", str(data_dir), "--out", str(out)]) == 0
    run_client(lerobot_python, Path("read"), out, tmp_path / "read.npz")
    seen = np.load(tmp_path / "read.npz", allow_pickle=False)

    originals = list(iter_episodes(data_dir))
    assert int(seen["num_episodes"]) == len(originals) and float(seen["fps"]) == originals[0].fps
    assert {"action", "observation.state"} <= set(seen["stats_keys"].tolist())
    cameras = seen["cameras"].tolist()
    assert cameras == sorted(originals[0].frames)
    np.testing.assert_array_equal(seen["state"], np.concatenate([episode.state for episode in originals]))
    np.testing.assert_array_equal(seen["action"], np.concatenate([episode.actions for episode in originals]))
    lengths = [len(episode.actions) for episode in originals]
    np.testing.assert_array_equal(seen["episode_index"], np.repeat(np.arange(len(originals)), lengths))
    np.testing.assert_array_equal(seen["frame_index"], np.concatenate([np.arange(n) for n in lengths]))
    assert seen["tasks"].tolist() == [episode.instruction for episode in originals for _ in range(len(episode.actions))]
    for camera in cameras:
        ours = np.concatenate([episode.frames[camera] for episode in originals]).astype(int)
        error = np.abs(seen["frames_" + camera].astype(int) - ours).mean()
        assert error < 4.0, (camera, error)  # one more lossy encode; LeRobot decodes it itself
