"""Embodiment awareness (issue 14): the simulator's two action spaces (end-effector deltas, joint
position targets) recorded end to end, and re-targeting a policy trained on one to the other.

The Genesis half (the joint-space expert succeeds, replays, executes the same physics) is in
test_sim.py; a real collection in the joint space is in test_collect.py. Here: what a manifest, a
saved policy and a config say about the action space, and what `model.retarget` keeps and changes,
on real tiny pi0 policies and a dataset written through the dataset API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.data.codec import encode_episode
from vla_dist.data.episode import Episode
from vla_dist.data.manifest import read_manifest, write_manifest
from vla_dist.data.shards import EpisodeShardWriter
from vla_dist.data.stats import compute_stats
from vla_dist.errors import ConfigError
from vla_dist.models.build import build_policy, load_policy, placeholder_manifest
from vla_dist.models.policy import PolicyInputs
from vla_dist.spaces import (
    CAMERAS,
    EE_DELTA_POSE,
    JOINT_DELTA,
    JOINT_POSITION,
    STATE_SPACE,
    action_space_type,
    simulator_mismatch,
)


def write_joint_dataset(out: Path, episodes: int = 4) -> Path:
    """Our Franka's cameras and state with joint-position actions, as `vla-dist collect
    sim.action_space=joint_position` writes them (random content: only the format matters here)."""
    rng = np.random.default_rng(0)
    eps = []
    for i in range(episodes):
        frames = 12 + i
        state = rng.normal(size=(frames, STATE_SPACE["dim"])).astype(np.float32)
        actions = np.concatenate((state[:, :7] + 0.01, np.sign(rng.normal(size=(frames, 1)))), axis=1)
        eps.append(Episode(episode_id=f"pick_cube-{i:07d}", task="pick_cube", instruction="pick up the red cube",
                           seed=i, success=True, fps=10.0,
                           frames={c: rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8) for c in CAMERAS},
                           state=state, actions=actions.astype(np.float32)))
    with EpisodeShardWriter(out, max_episodes=2) as writer:
        for ep in eps:
            writer.write(encode_episode(ep, "npz"))
    write_manifest(out, shards=writer.records, episodes=len(eps), frames=sum(ep.num_frames for ep in eps),
                   tasks={"pick_cube": len(eps)}, action_space=JOINT_POSITION, state_space=STATE_SPACE,
                   action_stats=compute_stats([ep.actions for ep in eps]),
                   state_stats=compute_stats([ep.state for ep in eps]),
                   cameras=list(CAMERAS), image_size=32, image_codec="npz", fps=10.0)
    return out


@pytest.fixture(scope="module")
def ee_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pi0 acting in end-effector deltas, saved as vla-dist saves policies."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.preset=tiny-pi0", "model.state_inputs=[gripper_width]"])
    out = tmp_path_factory.mktemp("ee") / "policy"
    build_policy(cfg.model, placeholder_manifest()).save_pretrained(out)
    return out


def test_manifests_say_which_action_space() -> None:
    assert action_space_type(EE_DELTA_POSE) == "ee_delta_pose"
    assert action_space_type(JOINT_POSITION) == "joint_position"
    # a LeRobot import of our data keeps the names, not the type
    assert action_space_type({"type": "lerobot", "dim": 8, "names": JOINT_POSITION["names"]}) == "joint_position"
    # another robot's joint positions are not ours
    assert action_space_type({"type": "joint_position", "dim": 10, "names": [f"j{i}" for i in range(10)]}) is None
    assert simulator_mismatch(list(CAMERAS), 8, 15, "joint_position", "joint_position") is None
    assert "set sim.action_space=joint_position" in simulator_mismatch(list(CAMERAS), 8, 15, "joint_position",
                                                                        "ee_delta_pose")
    assert "another embodiment" in simulator_mismatch(list(CAMERAS), 8, 15, None, "ee_delta_pose")
    # the two joint spaces have the same dims: the type or the names tell them apart, and a policy of
    # one is refused by a scene of the other
    assert action_space_type(JOINT_DELTA) == "joint_delta"
    assert action_space_type({"type": "lerobot", "dim": 8, "names": JOINT_DELTA["names"]}) == "joint_delta"
    assert simulator_mismatch(list(CAMERAS), 8, 15, "joint_delta", "joint_delta") is None
    assert "set sim.action_space=joint_position" in simulator_mismatch(list(CAMERAS), 8, 15, "joint_position",
                                                                        "joint_delta")


def test_a_recipe_does_not_reuse_a_dataset_of_the_other_space(tmp_path: Path) -> None:
    from vla_dist.stages import _check_collected_alike

    joint = read_manifest(write_joint_dataset(tmp_path / "joint", episodes=1))
    _check_collected_alike(joint, load_config(None, ["sim.action_space=joint_position", "task.name=pick_cube"]))
    with pytest.raises(ConfigError, match="sim.action_space=joint_position") as refused:
        _check_collected_alike(joint, load_config(None, ["task.name=pick_cube"]))
    assert refused.value.key == "sim.action_space"


def test_retarget_keeps_the_networks_and_takes_the_new_space(ee_policy: Path, tmp_path: Path) -> None:
    data = write_joint_dataset(tmp_path / "joint")
    manifest = read_manifest(data)
    cfg = load_config(None, ["model.preset=tiny-pi0", f"model.pretrained={ee_policy}", f"data.dir={data}"])
    with pytest.raises(ConfigError, match="model.retarget=true") as refused:
        build_policy(cfg.model, manifest)
    assert refused.value.key == "model.pretrained" and "ee_delta_pose actions of 7 dims" in str(refused.value)

    cfg = load_config(None, ["model.preset=tiny-pi0", f"model.pretrained={ee_policy}", f"data.dir={data}",
                             "model.retarget=true"])
    source = load_policy(ee_policy)
    policy = build_policy(cfg.model, manifest)
    assert (policy.action_dim, policy.spec.action_space) == (8, "joint_position")
    assert policy.spec.state_inputs == source.spec.state_inputs == [STATE_SPACE["names"].index("gripper_width")]
    before, after = source.hf_model.state_dict(), policy.hf_model.state_dict()
    out_proj = "action_out_proj"
    for name, value in before.items():
        if out_proj not in name:
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)  # every network kept
    torch.testing.assert_close(after[f"{out_proj}.weight"][:7], before[f"{out_proj}.weight"][:7], rtol=0, atol=0)
    assert after[f"{out_proj}.weight"][8:].abs().sum() == 0 and after[f"{out_proj}.bias"][8:].abs().sum() == 0
    # the new space's statistics: unnormalized predictions are joint targets of the dataset's scale
    np.testing.assert_allclose(policy.normalization.action_q99, manifest["action_stats"]["q99"], rtol=1e-6)
    inputs = PolicyInputs(images=torch.zeros(2, 2, 32, 32, 3, dtype=torch.uint8), state=torch.zeros(2, 15),
                          instructions=["pick up the red cube"] * 2)
    chunk = policy.eval().predict_chunk(inputs)
    assert chunk.shape == (2, policy.chunk_size, 8) and torch.isfinite(chunk).all()

    saved = tmp_path / "retargeted"
    policy.save_pretrained(saved)
    spec = json.loads((saved / "vla_dist.json").read_text())
    assert (spec["action_dim"], spec["action_space"]) == (8, "joint_position")
    assert load_policy(saved).spec.action_space == "joint_position"


def test_action_space_config_errors_name_their_keys(ee_policy: Path, tmp_path: Path, capsys) -> None:
    assert main(["collect", "sim.action_space=joint", f"run.dir={tmp_path / 'a'}"]) == 2
    assert "sim.action_space" in capsys.readouterr().err
    assert main(["collect", "sim.action_space=joint_position", "collect.action_noise=0.01",
                 f"run.dir={tmp_path / 'b'}"]) == 2
    assert "collect.action_noise" in capsys.readouterr().err
    data = write_joint_dataset(tmp_path / "joint")
    # a policy of the other space: refused before Ray or a rank starts, with the way out
    assert main(["train", f"data.dir={data}", f"model.pretrained={ee_policy}", f"run.dir={tmp_path / 'c'}",
                 "train.eval_every=0"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and "model.retarget=true" in err and not (tmp_path / "c").exists(), err
    assert main(["train", f"data.dir={data}", "model.retarget=true", f"run.dir={tmp_path / 'd'}",
                 "train.eval_every=0"]) == 2
    assert "model.retarget" in capsys.readouterr().err
    # training-time evals in a scene of the other space
    assert main(["train", f"data.dir={data}", f"run.dir={tmp_path / 'e'}", "train.eval_every=2"]) == 2
    err = capsys.readouterr().err
    assert "train.eval_every" in err and "sim.action_space=joint_position" in err, err
    # an end-effector policy evaluated in a joint scene
    assert main(["eval", f"eval.checkpoint={ee_policy}", "sim.action_space=joint_position",
                 f"run.dir={tmp_path / 'f'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.checkpoint" in err and "sim.action_space=ee_delta_pose" in err, err


@pytest.mark.heavy  # collect, replay, train, export and evaluate in the joint space: ~3 min
@pytest.mark.ci
def test_joint_space_collects_replays_retargets_and_evaluates(ee_policy: Path, tmp_path: Path, local_ray: None,
                                                               capsys) -> None:
    """From the CLI: the expert's demonstrations recorded as joint targets (the manifest says so), their
    replay in a joint scene succeeds as recorded and is refused in an end-effector scene, an
    end-effector policy re-targeted on them trains and exports as a joint policy, which evaluates in
    the joint scene."""
    data, joint = tmp_path / "data", "sim.action_space=joint_position"
    common = ["task.name=pick_cube", "cluster.num_cpus=2", "collect.num_actors=1", "collect.envs_per_actor=2"]
    assert main(["collect", joint, *common, "collect.episodes=4", "collect.num_videos=0", f"data.dir={data}",
                 f"run.dir={tmp_path / 'collect'}"]) == 0
    manifest = read_manifest(data)
    assert manifest["action_space"] == JOINT_POSITION and manifest["extra"]["sim"]["action_space"] == "joint_position"

    assert main(["replay", joint, *common, f"data.dir={data}", f"run.dir={tmp_path / 'replay'}"]) == 0
    replayed = json.loads((tmp_path / "replay" / "report.json").read_text())["per_task"]["pick_cube"]
    assert replayed["replay_successes"] == replayed["recorded_successes"] == 4, replayed
    capsys.readouterr()
    assert main(["replay", *common, f"data.dir={data}", f"run.dir={tmp_path / 'replay-ee'}"]) == 2
    assert "sim.action_space=joint_position" in capsys.readouterr().err

    train = tmp_path / "train"
    assert main(["train", joint, *common, f"data.dir={data}", f"run.dir={train}", f"model.pretrained={ee_policy}",
                 "model.retarget=true", "train.steps=2", "train.save_every=2", "train.micro_batch_size=4",
                 "train.world_size=1", "train.eval_every=0"]) == 0
    assert main(["eval", joint, *common, f"data.dir={data}", f"eval.checkpoint={train}", "eval.episodes=2",
                 f"run.dir={tmp_path / 'eval'}"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["episodes"] == 2 and len(report["outcomes"]) == 2
    spec = json.loads((tmp_path / "eval" / "policy" / "vla_dist.json").read_text())
    assert (spec["action_dim"], spec["action_space"]) == (8, "joint_position")
