"""Data fidelity: a collected dataset's recorded actions, replayed open loop in fresh Genesis scenes
rebuilt from each episode's (task, seed), reproduce the recorded successes. Real collection (the
session's quickstart_run: 8 episodes over all three tasks, 2 actors x 2 envs), real sim actors on
the session's Ray; no mocks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.rollout.replay import replay_dataset
from vla_dist.spaces import CORE_TASKS

Quickstart = tuple[Path, Path, subprocess.CompletedProcess]
MIN_REPLAY_SUCCESS = 0.95


def test_replay_reproduces_every_task(tmp_path: Path, quickstart_run: Quickstart, local_ray: None) -> None:
    _, data_dir, _ = quickstart_run
    # 3 envs per actor where collection had 2: episodes replay in other env slots, next to other episodes
    args = ["replay", f"data.dir={data_dir}", f"run.dir={tmp_path}", "collect.envs_per_actor=3",
            "cluster.num_cpus=2"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == "replay" and report["perturb"] == "none" and not report["shard_errors"]
    assert set(report["per_task"]) == set(CORE_TASKS)  # task.name=all
    for task, stats in report["per_task"].items():
        print(f"{task}: replay success {stats['replay_successes']}/{stats['recorded_successes']}, "
              f"state drift max {stats['max_state_drift']:.3g} mean {stats['mean_state_drift']:.3g}")
        assert stats["recorded_successes"] >= 2, task
        assert stats["success_rate"] >= MIN_REPLAY_SUCCESS, (task, stats)
    details = report["episode_results"]
    assert len(details) == report["episodes"] == json.loads((data_dir / "manifest.json").read_text())["episodes"]
    for episode in details:  # never replayed past its recorded length
        assert 1 <= episode["replay_steps"] <= episode["recorded_steps"], episode
        assert episode["state_drift"] >= 0.0


@pytest.mark.heavy  # a second replay of the dataset: ~45 s
def test_perturbed_actions_do_not_replay_to_success(tmp_path: Path, quickstart_run: Quickstart,
                                                    local_ray: None) -> None:
    """The negative control: the same episodes with their actions in reverse order must fail, so the
    success above comes from the recorded actions, not from a check every scene passes."""
    _, data_dir, _ = quickstart_run
    cfg = validate(load_config(None, [f"data.dir={data_dir}", f"run.dir={tmp_path}", "collect.envs_per_actor=4",
                                      "cluster.num_cpus=2"]))
    report = replay_dataset(cfg, perturb="reverse")
    assert report["perturb"] == "reverse" and report["recorded_successes"] == report["episodes"]
    assert report["replay_successes"] == 0, report["per_task"]
    assert report["max_state_drift"] > 0.05  # the arm went elsewhere (rad / m)


def test_replay_refuses_other_physics(tmp_path: Path, quickstart_run: Quickstart, capsys) -> None:
    """The manifest records the collection's physics; replaying under others is refused by key."""
    _, data_dir, _ = quickstart_run
    assert main(["replay", f"data.dir={data_dir}", f"run.dir={tmp_path}", "sim.dt=0.005"]) == 2
    assert "sim.dt" in capsys.readouterr().err
    assert main(["replay", f"data.dir={data_dir}", f"run.dir={tmp_path}", "task.control_hz=20", "sim.dt=0.005"]) == 2
    assert "task.control_hz" in capsys.readouterr().err
