"""`vla-dist eval eval.offline_data=DIR`: a policy scored against recorded episodes without a
simulator (data from a real robot): the error arithmetic on known values, then the CLI end to end on
the quickstart dataset, then bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.data import iter_episodes
from vla_dist.errors import ConfigError
from vla_dist.offline_eval import action_errors


def test_action_errors_are_normalized_masked_and_compared_with_the_mean_action():
    rng = np.random.default_rng(0)
    recorded = rng.normal(size=(6, 3, 2)) * np.array([1.0, 10.0])  # dim 1 is 10x wider
    valid = np.ones((6, 3), bool)
    valid[5, 1:] = False  # past an episode's end
    q01, q99 = [-2.0, -20.0], [2.0, 20.0]  # normalized scale: 2 and 20
    exact = action_errors(recorded.copy(), recorded, valid, q01, q99, ["x", "y"], ["pick"] * 6)
    assert exact["mse"] == 0 and exact["mse_vs_mean_action"] == 0

    garbage = recorded.copy()
    garbage[5, 1:] = 1e6  # masked steps never count
    assert action_errors(garbage, recorded, valid, q01, q99, ["x", "y"], ["pick"] * 6)["mse"] == 0

    off = recorded + np.array([1.0, 10.0])  # off by half the normalized range's half-width in both dims
    report = action_errors(off, recorded, valid, q01, q99, ["x", "y"], ["pick"] * 3 + ["push"] * 3)
    assert report["mse"] == pytest.approx(0.25) and report["mse_per_dim"] == {"x": 0.25, "y": 0.25}
    assert report["raw_mse_per_dim"] == {"x": pytest.approx(1.0), "y": pytest.approx(100.0)}
    assert report["mse_per_chunk_step"] == [0.25, 0.25, 0.25] and set(report["mse_per_task"]) == {"pick", "push"}

    mean = (recorded * valid[..., None]).sum(axis=(0, 1)) / valid.sum()
    as_mean = np.broadcast_to(mean, recorded.shape).copy()
    baseline = action_errors(as_mean, recorded, valid, q01, q99, ["x", "y"], ["pick"] * 6)
    assert baseline["mse_vs_mean_action"] == pytest.approx(1.0) and baseline["mse"] == baseline["mean_action_mse"]


def test_cli_offline_eval_scores_every_chunk_of_the_held_out_episodes(quickstart_run, tmp_path, capsys):
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "offline"
    assert main(["eval", f"eval.offline_data={data_dir}", f"data.dir={data_dir}", f"run.dir={run_dir}"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert "eval done: " in capsys.readouterr().out
    episodes = list(iter_episodes(data_dir))
    chunk = report["chunk_size"]
    assert report["mode"] == "offline" and report["episodes"] == len(episodes)
    assert report["windows"] == sum(math.ceil(ep.num_frames / chunk) for ep in episodes)
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    assert list(report["mse_per_dim"]) == manifest["action_space"]["names"]
    assert set(report["mse_per_task"]) == {ep.task for ep in episodes}
    assert len(report["mse_per_chunk_step"]) == chunk
    # the untrained preset (eval.checkpoint null) predicts no better than the data's mean action
    assert math.isfinite(report["mse"]) and report["mse"] > 0.5 * report["mean_action_mse"] > 0


def test_offline_eval_input_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="has no manifest.json") as error:
        validate(load_config(None, [f"eval.offline_data={tmp_path}"]))
    assert error.value.key == "eval.offline_data"
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="needs the simulator") as error:
        validate(load_config(None, [f"eval.offline_data={tmp_path}", "eval.policy=expert"]))
    assert error.value.key == "eval.policy"
