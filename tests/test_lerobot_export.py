"""`vla-dist export-data lerobot DATA_DIR --out DIR`: the quickstart's collected sim data becomes a
LeRobot v3.0 dataset whose metadata says what the data is, and which imports back with the same
states, actions and instructions and close frames; an occupied --out or a corrupt shard exports
nothing. (tests/test_lerobot_client.py opens the export with LeRobot's own LeRobotDataset.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq

from vla_dist.cli import main
from vla_dist.data import iter_episodes
from vla_dist.data.manifest import read_manifest


def test_collected_data_exports_and_imports_back(quickstart_run, tmp_path, capsys):
    _, data_dir, _ = quickstart_run
    manifest = read_manifest(data_dir)
    out = tmp_path / "lerobot"
    assert main(["export-data", "lerobot", str(data_dir), "--out", str(out)]) == 0
    assert "export-data done: " in capsys.readouterr().out
    assert not out.with_name("lerobot.partial").exists()

    info = json.loads((out / "meta" / "info.json").read_text())
    assert (info["codebase_version"], info["total_episodes"], info["total_frames"]) == (
        "v3.0", manifest["episodes"], manifest["frames"])
    assert info["fps"] == manifest["fps"] and info["robot_type"] == "franka_panda"
    features = info["features"]
    assert features["action"]["shape"] == [manifest["action_space"]["dim"]]
    assert features["observation.state"]["shape"] == [manifest["state_space"]["dim"]]
    size = manifest["image_size"]
    for camera in manifest["cameras"]:
        assert features[f"observation.images.{camera}"]["shape"] == [size, size, 3]
        assert (out / "videos" / f"observation.images.{camera}" / "chunk-000" / "file-000.mp4").stat().st_size > 0
    episodes_meta = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [row["dataset_to_index"] - row["dataset_from_index"] for row in episodes_meta] == [
        row["length"] for row in episodes_meta]
    assert episodes_meta[-1]["dataset_to_index"] == manifest["frames"]

    originals = list(iter_episodes(data_dir))
    stats = json.loads((out / "meta" / "stats.json").read_text())
    actions = np.concatenate([episode.actions for episode in originals])
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert stats["action"]["count"] == [manifest["frames"]]
    assert np.shape(stats[f"observation.images.{manifest['cameras'][0]}"]["mean"]) == (3, 1, 1)

    back = tmp_path / "back"
    assert main(["import", "lerobot", str(out), "--out", str(back)]) == 0
    returned = sorted(iter_episodes(back), key=lambda episode: episode.episode_id)
    assert len(returned) == len(originals)
    for original, again in zip(originals, returned, strict=True):
        assert again.instruction == original.instruction and again.fps == original.fps
        np.testing.assert_array_equal(again.state, original.state)
        np.testing.assert_array_equal(again.actions, original.actions)
        for camera in manifest["cameras"]:
            error = np.abs(again.frames[camera].astype(int) - original.frames[camera].astype(int)).mean()
            assert error < 6.0, (original.episode_id, camera, error)  # two more lossy encodes of rendered frames

    # An occupied --out is refused and left as it was.
    assert main(["export-data", "lerobot", str(data_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert json.loads((out / "meta" / "info.json").read_text()) == info


def test_a_corrupt_shard_exports_nothing(quickstart_run, tmp_path, capsys):
    _, data_dir, _ = quickstart_run
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = max(copy.glob("*.tar"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the manifest's sha256 can tell
    shard.write_bytes(bytes(raw))
    out = tmp_path / "lerobot"
    assert main(["export-data", "lerobot", str(copy), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "nothing exported" in err, err
    assert not out.exists() and not out.with_name("lerobot.partial").exists()
