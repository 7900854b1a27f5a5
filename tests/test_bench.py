"""`vla-dist bench rollout` and `bench rl`: real sim actors, JSON contract on the last line of stdout."""

from __future__ import annotations

import json
import math

import pytest

from vla_dist.bench.common import bench_report, describe_device
from vla_dist.cli import main


@pytest.mark.heavy  # two actors build a scene and load a policy: ~80 s
def test_bench_rollout_prints_scaling_json(capsys: pytest.CaptureFixture[str], local_ray: None) -> None:
    assert main(["bench", "rollout", "bench.rollout_steps=4", "task.image_size=32", "collect.envs_per_actor=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"name", "value", "unit", "baseline", "ratio", "device"} <= set(report)
    assert report["name"] == "rollout" and report["num_actors"] == 2
    assert report["steps_measured"] == 4 and report["envs_per_actor"] == 2 and report["image_size"] == 32
    # Figures only: which path is faster is the bench's claim to print, not a test's (4 steps on
    # shared cores time the neighbours as much as the sim).
    figures = ("value", "baseline", "ratio", "env_steps_per_s_no_render", "render_ms_per_frame", "render_share")
    for key in figures:
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]) and report[key] > 0, (key, report)
    assert report["ratio"] == pytest.approx(report["value"] / (2 * report["baseline"]), rel=1e-2)
    assert report["render_share"] <= 1  # the rendering part of the rendered steps' time


@pytest.mark.heavy  # two actors build a scene and load a policy: about a minute
def test_bench_rl_prints_rollout_and_sync_json(capsys: pytest.CaptureFixture[str], local_ray: None, tmp_path) -> None:
    assert main(["bench", "rl", f"run.dir={tmp_path}", "task.image_size=32", "task.max_steps=6", "task.name=pick_cube",
                 "collect.num_actors=2", "collect.envs_per_actor=1", "collect.cpus_per_actor=1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["name"] == "rl" and report["family"] == "pi0" and report["steps_per_episode"] == 6
    for key in ("value", "baseline", "ratio", "sync_gb_per_s", "plain_put_get_gb_per_s", "sync_ratio"):
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]) and report[key] > 0, (key, report)
    assert report["ratio"] == pytest.approx(report["value"] / report["baseline"], rel=1e-2)
    # the bytes synced are the policy's parameters (tiny-pi0: about half a million floats)
    assert 1e6 < report["sync_bytes"] < 1e7
    assert report["sampling"]["envs"] == 1 and report["sampling"]["batched_ms"] > 0


@pytest.mark.parametrize("preset", ["tiny-pi0", "tiny-openvla"])
def test_exploration_sampling_times_the_batched_draw_against_one_env_at_a_time(preset: str) -> None:
    """bench rl's sampling figure: both ways draw the same decisions (each env from its own stream), so
    the figure compares two ways of doing one thing; both timed, the ratio theirs."""
    import torch

    from vla_dist.bench.rl import exploration_sampling
    from vla_dist.config import load_config
    from vla_dist.models.build import build_policy, placeholder_manifest
    from vla_dist.rl.rollout import Exploration

    cfg = load_config(None, [f"model.preset={preset}", "task.image_size=32"])
    torch.manual_seed(0)
    policy = build_policy(cfg.model, placeholder_manifest())
    figure = exploration_sampling(policy, Exploration(horizon=4, noise_level=0.5, sde_step=5), 3,
                                  tuple(cfg.task.cameras))
    assert figure["envs"] == 3 and figure["batched_ms"] > 0 and figure["one_env_at_a_time_ms"] > 0
    assert figure["speedup"] == pytest.approx(figure["one_env_at_a_time_ms"] / figure["batched_ms"], rel=1e-2)


def test_bench_report_puts_the_contract_keys_first() -> None:
    report = bench_report("x", 2.0, "things/s", 4.0, 0.5, "value / baseline", details={"a": 1}, n=3)
    assert list(report) == ["name", "value", "unit", "baseline", "ratio", "ratio_definition", "device", "details", "n"]
    assert report["device"] == describe_device() and report["details"] == {"a": 1}
    assert bench_report("x", 1, "u", 1, 1.0, "d", device="cpu")["device"] == "cpu"
