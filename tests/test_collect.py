"""Collection end to end: real Ray sim actors running real Genesis, writing real WebDataset shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_dist.config import load_config, validate
from vla_dist.data import compute_stats, iter_episodes, read_manifest
from vla_dist.rollout.collect import CollectProgress, run_collect

from .conftest import QUICKSTART_EPISODES, REPO_ROOT

EPISODES = QUICKSTART_EPISODES


def test_collect_writes_exact_valid_dataset(quickstart_run: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    run_dir, data_dir, _ = quickstart_run
    manifest = read_manifest(data_dir)
    episodes = list(iter_episodes(data_dir, verify="sha256"))
    assert len(episodes) == EPISODES == manifest["episodes"]
    ids = [ep.episode_id for ep in episodes]
    assert len(set(ids)) == len(ids)
    assert all(ep.success for ep in episodes)
    # All three tasks, each episode labelled with one of its task's instructions.
    assert {ep.task for ep in episodes} == {"pick_cube", "push_cube", "stack_cube"}
    assert sum(manifest["tasks"].values()) == EPISODES
    # Shards rolled over at 3 episodes; no partial files left; sizes and checksums recorded.
    shards = sorted(p.name for p in data_dir.glob("*.tar"))
    assert shards == sorted(s["name"] for s in manifest["shards"]) and len(shards) == 3
    assert not list(data_dir.glob("*.partial"))
    # Statistics in the manifest match a recomputation from what was read back.
    stats_arrays = (("action_stats", [ep.actions for ep in episodes]), ("state_stats", [ep.state for ep in episodes]))
    for key, arrays in stats_arrays:
        expected = compute_stats(arrays)
        for stat in ("mean", "std", "min", "max", "q01", "q99"):
            np.testing.assert_allclose(manifest[key][stat], expected[stat], rtol=1e-5, atol=1e-6)
    assert manifest["frames"] == sum(ep.num_frames for ep in episodes)
    assert manifest["action_space"]["dim"] == 7 and len(manifest["action_space"]["names"]) == 7
    assert manifest["extra"]["appearance"]["camera_jitter"] == 0.0 and not manifest["extra"]["appearance"]["distractor"]
    # Frames decode to the configured size for both cameras.
    assert episodes[0].frames["front"].shape[1:] == (64, 64, 3)
    assert episodes[0].frames["wrist"].shape[0] == episodes[0].num_frames
    # Run outputs: resolved config, report, videos.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["episodes_written"] == EPISODES
    assert set(report["per_task"]) == {"pick_cube", "push_cube", "stack_cube"}
    assert report["episodes_per_second"] > 0
    assert load_config(run_dir / "config.yaml", []).collect.episodes == EPISODES
    videos = sorted((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 3 and all(v.stat().st_size > 1000 for v in videos)


def test_truncated_shard_is_reported_and_skipped(
    quickstart_run: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    _, data_dir, _ = quickstart_run
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    victim = copy / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    errors: list[tuple[str, str]] = []
    episodes = list(iter_episodes(copy, on_error=lambda shard, message: errors.append((shard, message))))
    assert [shard for shard, _ in errors] == ["shard-000001.tar"]
    manifest = read_manifest(copy)
    lost = next(s["episodes"] for s in manifest["shards"] if s["name"] == "shard-000001.tar")
    assert len(episodes) == EPISODES - lost


@pytest.mark.heavy  # a sim actor killed mid-collection and restarted: ~80 s
def test_killed_actor_still_gives_exact_dataset(
    quickstart_run: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path, local_ray: None
) -> None:
    """kill -9 of a sim actor mid-collection: Ray restarts it, its chunk is redone, and the dataset
    is exactly the one an undisturbed run writes (same episode ids, same actions)."""
    _, reference_dir, _ = quickstart_run
    cfg = validate(load_config(None, [
        f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", f"collect.episodes={EPISODES}",
        "data.shard_max_episodes=3", "collect.num_videos=0",
    ]))
    killed: list[int] = []

    def kill_first_actor(progress: CollectProgress) -> None:
        if not killed and progress.chunks_done >= 1:
            pid = int(progress.actors[0]["pid"])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    report = run_collect(cfg, on_progress=kill_first_actor)
    assert killed, "the kill hook never ran"
    assert report["actor_failures"] >= 1 and report["chunks_retried"] >= 1
    got = {ep.episode_id: ep for ep in iter_episodes(tmp_path / "data", decode_images=False)}
    want = {ep.episode_id: ep for ep in iter_episodes(reference_dir, decode_images=False)}
    assert len(got) == EPISODES and sorted(got) == sorted(want)
    for key, ep in got.items():
        np.testing.assert_allclose(ep.actions, want[key].actions, atol=1e-5)


def test_collect_refuses_to_overwrite_a_dataset(quickstart_run: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    _, data_dir, _ = quickstart_run
    proc = subprocess.run(
        [sys.executable, "-m", "vla_dist", "collect", f"data.dir={data_dir}", "collect.episodes=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "data.dir" in proc.stderr and "collect.overwrite" in proc.stderr


@pytest.mark.heavy  # a second collection: ~50 s
def test_expert_failures_are_counted_kept_on_request_and_reported(tmp_path: Path, local_ray: None) -> None:
    """With a 3-step limit no episode can succeed: the run fails with exit 1 semantics, keeps the
    failed episodes it was asked to keep (marked success=false) and says what it kept. With
    task.paraphrases=[2] every episode reads its task's third phrasing (the task-comprehension recipe)."""
    from vla_dist.errors import VlaDistError

    cfg = validate(load_config(None, [
        f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", "collect.episodes=2",
        "task.max_steps=3", "collect.keep_failures=true", "collect.max_attempts_factor=2", "task.image_size=32",
        "task.paraphrases=[2]",
    ]))
    with pytest.raises(VlaDistError, match=r"only 0 of 2 episodes succeeded.*kept"):
        run_collect(cfg)
    kept = list(iter_episodes(tmp_path / "data", decode_images=False))
    assert len(kept) == 4 and not any(ep.success for ep in kept)
    assert all(ep.num_frames == 3 for ep in kept)
    from vla_dist.spaces import TASK_INSTRUCTIONS

    assert all(ep.instruction == TASK_INSTRUCTIONS[ep.task][2] for ep in kept)
    partial = json.loads((tmp_path / "data" / "manifest.partial.json").read_text())
    assert partial["complete"] is False and partial["episodes"] == 4


@pytest.mark.heavy  # ~2 min of three tasks' scenes; in CI's heavy part (the main suite stays under 20 minutes)
@pytest.mark.ci
def test_kept_failures_beside_a_reached_target_are_counted_in_the_manifest(tmp_path: Path, local_ray: None) -> None:
    """collect.keep_failures with the target reached: the manifest counts every episode it lists
    per task, the kept failures too (it once counted successes only and refused to be written).
    35 steps: the expert's pick takes 28-31, its stack 41-45, so every stack episode fails (episode
    2 of the round-robin pick, push, stack is always attempted before 3 successes)."""
    cfg = validate(load_config(None, [
        f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", "task.name=all", "collect.episodes=3",
        "task.max_steps=35", "collect.keep_failures=true", "collect.num_actors=1", "task.image_size=32",
        "collect.num_videos=0",
    ]))
    report = run_collect(cfg)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    kept = list(iter_episodes(tmp_path / "data", decode_images=False))
    assert report["episodes_written"] == 3 and report["failures_written"] >= 1
    assert manifest["episodes"] == len(kept) == 3 + report["failures_written"] == sum(manifest["tasks"].values())
    assert manifest["tasks"]["stack_cube"] >= 1 and not any(ep.success for ep in kept if ep.task == "stack_cube")
    assert manifest["extra"]["successful_episodes"] == 3 == sum(ep.success for ep in kept)


def test_paraphrase_subset_reaches_evaluated_episodes() -> None:
    """task.paraphrases=[2]: every evaluated episode reads its task's third phrasing (collection: the
    test above); without the key every phrasing is drawn somewhere."""
    from vla_dist.rollout.evaluate import eval_requests
    from vla_dist.sim.tasks import pick_instruction
    from vla_dist.spaces import CORE_TASKS, TASK_INSTRUCTIONS

    cfg = validate(load_config(None, ["task.name=all", "task.paraphrases=[2]"]))
    _, requests = eval_requests(cfg, episodes_per_task=4)
    drawn = {pick_instruction(r.task, r.seed, r.paraphrases) for r in requests}
    assert drawn == {TASK_INSTRUCTIONS[task][2] for task in CORE_TASKS}  # task.name=all: the red cube's tasks
    everything = eval_requests(validate(load_config(None, ["task.name=all"])), episodes_per_task=40)[1]
    assert {pick_instruction(r.task, r.seed, r.paraphrases) for r in everything} == {
        text for task in CORE_TASKS for text in TASK_INSTRUCTIONS[task]}


@pytest.mark.parametrize("value", ["[4]", "[0,0]", "[-1]"])
def test_bad_paraphrases_exit_2_naming_key(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from vla_dist.cli import main

    assert main(["config", f"task.paraphrases={value}"]) == 2
    assert "task.paraphrases" in capsys.readouterr().err


def test_a_dataset_collected_otherwise_is_not_reused(quickstart_run: tuple[Path, Path, subprocess.CompletedProcess],
                                                     tmp_path: Path) -> None:
    """A plan's collect stage (quickstart, recipes) reuses a data.dir holding enough episodes only when
    they were collected the way the stage asks: other phrasings or DART noise fail naming the key."""
    from vla_dist.config import ConfigError
    from vla_dist.stages import run_stage

    _, data_dir, _ = quickstart_run
    base = [f"run.dir={tmp_path / 'run'}", f"data.dir={data_dir}", f"collect.episodes={EPISODES}"]
    report, _ = run_stage("collect", validate(load_config(None, base)), lambda line: None)
    assert report["reused"] and report["episodes"] == EPISODES
    for key, value in (("task.paraphrases", "[3]"), ("collect.action_noise", "0.01")):
        extra = f"{key}={value}"
        with pytest.raises(ConfigError, match=key):
            run_stage("collect", validate(load_config(None, [*base, extra])), lambda line: None)
