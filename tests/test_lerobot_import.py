"""`vla-dist import lerobot SRC --out DATA_DIR`: a LeRobot v3.0 dataset (written here by the
exporter's LeRobotV3Writer in LeRobot's layout; tests/test_lerobot_client.py checks both directions
against LeRobot's own code) becomes vla-dist shards + manifest with the same
states, actions, tasks, fps and frames; vla-dist trains on it; broken sources are named and an
interrupted import leaves no manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.data import iter_episodes
from vla_dist.data.lerobot_export import LeRobotV3Writer
from vla_dist.data.lerobot_import import task_name
from vla_dist.data.manifest import read_manifest
from vla_dist.train.sft import run_train

TASKS = ["Pick up the red block.", "open the top drawer", "Pick up the red block."]
LENGTHS = [12, 17, 9]


def solid_frames(episode: int, camera: int, length: int) -> np.ndarray:
    """uint8 [T, 32, 32, 3]: each frame one solid colour that encodes (episode, camera, frame)."""
    t = np.arange(length, dtype=np.float32)[:, None]
    colour = np.concatenate([(40 + 7 * t + 50 * episode + 30 * camera) % 200 + 20, (90 + 11 * t) % 200 + 20,
                             np.full_like(t, 60 + 80 * camera)], axis=-1)
    return np.broadcast_to(colour[:, None, None, :].astype(np.uint8), (length, 32, 32, 3)).copy()


def recorded_episodes() -> list[dict]:
    """Deterministic and distinguishable: solid-colour frames (they compress almost losslessly),
    states and actions that encode (episode, frame)."""
    episodes = []
    for e, (task, length) in enumerate(zip(TASKS, LENGTHS, strict=True)):
        t = np.arange(length, dtype=np.float32)[:, None]
        episodes.append({"task": task,
                         "frames": {name: solid_frames(e, cam, length)
                                    for cam, name in enumerate(["front", "wrist"])},
                         "state": 100 * e + t + np.arange(15, dtype=np.float32) / 100,
                         "action": -100 * e - t + np.arange(7, dtype=np.float32) / 10})
    return episodes


def write_lerobot(root: Path, episodes: list[dict], fps: int) -> Path:
    writer = LeRobotV3Writer(root, fps=fps, robot_type="test_arm")
    for episode in episodes:
        writer.add_episode(episode["task"], episode["state"], episode["action"], episode["frames"])
    writer.close()
    return root


@pytest.fixture
def lerobot_dir(tmp_path: Path) -> Path:
    return write_lerobot(tmp_path / "lerobot-src", recorded_episodes(), fps=10)


def test_import_keeps_states_actions_tasks_fps_and_frames(lerobot_dir, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(out)]) == 0
    assert "import done: " in capsys.readouterr().out
    manifest = read_manifest(out)
    assert (manifest["episodes"], manifest["frames"], manifest["fps"]) == (3, sum(LENGTHS), 10.0)
    assert manifest["cameras"] == ["front", "wrist"] and manifest["image_size"] == 32
    assert (manifest["action_space"]["dim"], manifest["state_space"]["dim"]) == (7, 15)
    assert manifest["tasks"] == {task_name(TASKS[0]): 2, task_name(TASKS[1]): 1}
    assert manifest["extra"]["source"]["format"] == "lerobot"

    imported = sorted(iter_episodes(out), key=lambda ep: ep.episode_id)
    want = recorded_episodes()
    all_actions = np.concatenate([w["action"] for w in want])
    np.testing.assert_allclose(manifest["action_stats"]["mean"], all_actions.mean(axis=0), rtol=1e-6)
    for ep, w in zip(imported, want, strict=True):
        assert ep.instruction == w["task"] and ep.task == task_name(w["task"]) and ep.fps == 10.0
        np.testing.assert_array_equal(ep.state, w["state"])
        np.testing.assert_array_equal(ep.actions, w["action"])
        for name in ("front", "wrist"):
            error = np.abs(ep.frames[name].astype(int) - w["frames"][name].astype(int))
            assert error.mean() < 3.0, (ep.episode_id, name, error.mean())  # two lossy encodes, solid colours


def test_a_resized_import_trains(lerobot_dir, local_ray, tmp_path):
    out = tmp_path / "imported64"
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(out), "--image-size", "64"]) == 0
    assert read_manifest(out)["image_size"] == 64
    cfg = validate(load_config(None, [f"data.dir={out}", f"run.dir={tmp_path / 'run'}", "cluster.num_cpus=2",
                                      "train.world_size=2", "train.micro_batch_size=2", "train.steps=2",
                                      "train.save_every=0", "data.num_workers=0"]))
    report = run_train(cfg)
    assert report["last_step"] == 2 and np.isfinite(report["final_loss"])


def test_broken_sources_are_named_and_leave_no_manifest(lerobot_dir, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", "lerobot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "meta/info.json is missing" in capsys.readouterr().err

    info_path = lerobot_dir / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(out)]) == 2
    assert "only v3.x is read" in capsys.readouterr().err
    info_path.write_text(json.dumps(info))

    data_file = next((lerobot_dir / "data").rglob("*.parquet"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # every episode's states and actions: nothing to import
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no episode could be read" in err and str(data_file) in err, err
    assert not (out / "manifest.json").exists()  # nothing reads a half import


def test_episodes_with_broken_files_are_skipped_counted_and_named(tmp_path, capsys):
    # one file per episode (as LeRobot does past its file sizes): a broken one costs its episode only
    source = tmp_path / "src"
    writer = LeRobotV3Writer(source, fps=10, data_file_mb=1e-6, video_file_mb=1e-6)
    for episode in recorded_episodes():
        writer.add_episode(episode["task"], episode["state"], episode["action"], episode["frames"])
    writer.close()
    video = source / "videos" / "observation.images.wrist" / "chunk-000" / "file-001.mp4"  # episode 1's
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    out = tmp_path / "imported"
    assert main(["import", "lerobot", str(source), "--out", str(out), "--strict"]) == 2
    assert str(video) in capsys.readouterr().err and not (out / "manifest.json").exists()

    assert main(["import", "lerobot", str(source), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "episodes=2" in captured.out and "skipped_episodes=1" in captured.out, captured.out
    assert f"skipped episode 1: {video}" in captured.err, captured.err
    manifest = read_manifest(out)
    assert manifest["episodes"] == 2 and manifest["frames"] == LENGTHS[0] + LENGTHS[2]
    assert [skip["episode"] for skip in manifest["extra"]["source"]["skipped"]] == [1]
    assert [ep.episode_id for ep in iter_episodes(out)] == ["lerobot000000", "lerobot000002"]


def test_parallel_import_on_ray_equals_the_serial_one_and_a_rerun_keeps_finished_groups(lerobot_dir, local_ray,
                                                                                         tmp_path, capsys):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(serial), "data.shard_max_episodes=1"]) == 0
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(parallel), "--workers", "2",
                 "data.shard_max_episodes=1", "cluster.num_cpus=2"]) == 0
    assert "shards=3" in capsys.readouterr().out
    assert read_manifest(serial)["shards"] == read_manifest(parallel)["shards"]  # same bytes, same order

    # An import interrupted after its first group: the rerun keeps that group and imports the rest.
    from vla_dist.data.lerobot_import import PARTS_DIR, import_group

    rerun = tmp_path / "rerun"
    settings = {"src": str(lerobot_dir.resolve()), "image_size": 0, "codec": "mp4", "strict": False}
    import_group(str(lerobot_dir), str(rerun / PARTS_DIR / "g000000"), [0], settings)
    assert main(["import", "lerobot", str(lerobot_dir), "--out", str(rerun), "data.shard_max_episodes=1"]) == 0
    assert "groups_kept=1" in capsys.readouterr().out
    assert read_manifest(rerun)["shards"] == read_manifest(serial)["shards"]
    assert not (rerun / PARTS_DIR).exists()
