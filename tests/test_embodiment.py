"""Any embodiment (issue 13): a dataset of another robot (three cameras named otherwise, 10-dim
joint-position actions, 12-dim state, 30 fps), written through the dataset API like an import would,
trains both families on 2 DeepSpeed ranks, exports, and is scored offline; the simulator refuses the
policy up front (its Franka has other cameras and dims) and says how to evaluate it instead."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.data.codec import encode_episode
from vla_dist.data.episode import Episode
from vla_dist.data.manifest import write_manifest
from vla_dist.data.shards import EpisodeShardWriter
from vla_dist.data.stats import compute_stats
from vla_dist.train.sft import run_train

CAMERAS = ["left", "right", "top"]
ACTION_DIM, STATE_DIM, FPS = 10, 12, 30.0


def write_other_robot(out: Path, episodes: int = 6) -> Path:
    rng = np.random.default_rng(0)
    eps = []
    for i in range(episodes):
        frames = 20 + i
        state = np.cumsum(rng.normal(size=(frames, STATE_DIM)), axis=0).astype(np.float32)
        eps.append(Episode(episode_id=f"towel{i:03d}", task="fold_towel", instruction="fold the towel in half", seed=i,
                           success=True, fps=FPS,
                           frames={c: rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8) for c in CAMERAS},
                           state=state, actions=(0.5 * state[:, :ACTION_DIM]).astype(np.float32)))
    with EpisodeShardWriter(out, max_episodes=3) as writer:
        for ep in eps:
            writer.write(encode_episode(ep, "mp4"))
    write_manifest(out, shards=writer.records, episodes=len(eps), frames=sum(ep.num_frames for ep in eps),
                   tasks={"fold_towel": len(eps)},
                   action_space={"type": "joint_position", "dim": ACTION_DIM, "names": [f"j{i}" for i in range(10)]},
                   state_space={"dim": STATE_DIM, "names": [f"q{i}" for i in range(STATE_DIM)]},
                   action_stats=compute_stats([ep.actions for ep in eps]),
                   state_stats=compute_stats([ep.state for ep in eps]),
                   cameras=CAMERAS, image_size=32, image_codec="mp4", fps=FPS)
    return out


# tiny-pi0 trains ~5x longer here than tiny-openvla (~80-110 s on 2 cores): heavy, by hand; the token
# family keeps the path in CI's heavy part (the main suite stays under 20 minutes)
@pytest.mark.parametrize("preset", [pytest.param("tiny-pi0", marks=pytest.mark.heavy),
                                    pytest.param("tiny-openvla", marks=[pytest.mark.heavy, pytest.mark.ci])])
def test_another_robot_trains_exports_and_is_scored_offline(preset, local_ray, tmp_path, capsys):
    data = write_other_robot(tmp_path / "towels")
    run_dir = tmp_path / "run"
    cfg = validate(load_config(None, [f"model.preset={preset}", f"data.dir={data}", f"run.dir={run_dir}",
                                      "cluster.num_cpus=2", "train.world_size=2", "train.micro_batch_size=4",
                                      "train.steps=3", "train.save_every=3"]))
    report = run_train(cfg)
    assert report["last_step"] == 3 and math.isfinite(report["final_loss"])

    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(export)]) == 0
    spec = json.loads((export / "vla_dist.json").read_text())
    assert (spec["cameras"], spec["action_dim"], spec["state_dim"]) == (CAMERAS, ACTION_DIM, STATE_DIM)

    scored = tmp_path / "offline"
    assert main(["eval", f"eval.checkpoint={export}", f"eval.offline_data={data}", f"data.dir={data}",
                 f"run.dir={scored}", f"model.preset={preset}"]) == 0
    offline = json.loads((scored / "report.json").read_text())
    assert list(offline["mse_per_dim"]) == [f"j{i}" for i in range(10)] and offline["episodes"] == 6
    assert offline["windows"] == sum(math.ceil((20 + i) / spec["chunk_size"]) for i in range(6))
    assert math.isfinite(offline["mse"]) and offline["mean_action_mse"] > 0

    capsys.readouterr()
    assert main(["eval", f"eval.checkpoint={export}", f"data.dir={data}", f"run.dir={tmp_path / 'sim'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.checkpoint" in err and "another embodiment" in err and "eval.offline_data" in err, err
    # training-time evals would run in that simulator too: refused before any rank starts
    assert main(["train", f"data.dir={data}", f"run.dir={tmp_path / 'evals'}", "train.eval_every=2"]) == 2
    err = capsys.readouterr().err
    assert "train.eval_every" in err and "another embodiment" in err and not (tmp_path / "evals").exists(), err
