"""`vla-dist bench rollout`: real sim actors, JSON contract on the last line of stdout."""

from __future__ import annotations

import json

import pytest

from vla_dist.bench.common import bench_report, describe_device
from vla_dist.cli import main


def test_bench_rollout_prints_scaling_json(capsys: pytest.CaptureFixture[str], local_ray: None) -> None:
    assert main(["bench", "rollout", "bench.rollout_steps=4", "task.image_size=32", "collect.envs_per_actor=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"name", "value", "unit", "baseline", "ratio", "device"} <= set(report)
    assert report["name"] == "rollout" and report["num_actors"] == 2
    assert report["value"] > 0 and report["baseline"] > 0
    assert report["ratio"] == pytest.approx(report["value"] / (2 * report["baseline"]), rel=1e-2)
    assert report["env_steps_per_s_no_render"] > report["baseline"]  # rendering costs time
    assert report["render_ms_per_frame"] > 0


def test_bench_report_puts_the_contract_keys_first() -> None:
    report = bench_report("x", 2.0, "things/s", 4.0, 0.5, "value / baseline", details={"a": 1}, n=3)
    assert list(report) == ["name", "value", "unit", "baseline", "ratio", "ratio_definition", "device", "details", "n"]
    assert report["device"] == describe_device() and report["details"] == {"a": 1}
    assert bench_report("x", 1, "u", 1, 1.0, "d", device="cpu")["device"] == "cpu"
