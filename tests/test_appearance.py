"""Scene appearance (vla_dist/sim/appearance.py) without a simulator: what each episode's draws are,
that they never move the task's objects, and the config and dataset checks around them. The
rendering and physics side runs on a real Genesis scene in tests/test_sim.py."""

from __future__ import annotations

import pytest
import torch

from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.errors import ConfigError
from vla_dist.sim.appearance import (
    DISTRACTOR_CLEARANCE,
    DISTRACTOR_PARKED,
    Appearance,
    appearance_of,
    sample_scene,
)
from vla_dist.sim.tasks import TASKS, sample_layout
from vla_dist.spaces import TASK_NAMES
from vla_dist.stages import _check_collected_alike

PERTURBED = Appearance(camera_offset=(0.0, 0.06, 0.03), camera_jitter=0.02, light_dir=(1.0, -1.0, -1.0),
                       light_intensity=3.0, ambient_light=0.15, distractor=True)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_appearance_never_moves_the_tasks_objects(task: str) -> None:
    for seed in range(40):
        layout = sample_layout(task, seed)
        for look in (Appearance(), PERTURBED):
            drawn = sample_scene(task, seed, look)
            for key, value in layout.items():
                assert torch.equal(drawn[key], value), (task, seed, key)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_distractor_keeps_clear_of_the_objects_the_task_uses(task: str) -> None:
    spec = TASKS[task]
    places = []
    for seed in range(200):
        drawn = sample_scene(task, seed, PERTURBED)
        spot = drawn["distractor_pos"]
        assert 0.40 <= float(spot[0]) <= 0.66 and -0.22 <= float(spot[1]) <= 0.22, spot  # on the workspace
        used = [drawn["cube_pos"]] + [drawn["base_pos"]] * spec.uses_base + [drawn["target_pos"]] * spec.uses_target
        for other in used:
            assert float((spot[:2] - other[:2]).norm()) >= DISTRACTOR_CLEARANCE - 1e-6, (seed, spot, other)
        places.append(spot)
    assert torch.stack(places).std(dim=0)[:2].min() > 0.03  # placed per episode, not in one spot
    # off: parked out of view in every episode
    assert torch.equal(sample_scene(task, 3, Appearance())["distractor_pos"], torch.tensor(DISTRACTOR_PARKED))


def test_camera_offset_and_jitter_per_episode() -> None:
    assert torch.equal(sample_scene("pick_cube", 5, Appearance())["camera_offset"], torch.zeros(3))
    fixed = Appearance(camera_offset=(0.0, 0.06, 0.03))
    assert torch.allclose(sample_scene("pick_cube", 5, fixed)["camera_offset"], torch.tensor([0.0, 0.06, 0.03]))
    jittered = Appearance(camera_offset=(0.0, 0.06, 0.03), camera_jitter=0.02)
    offsets = torch.stack([sample_scene("pick_cube", s, jittered)["camera_offset"] for s in range(300)])
    deviation = offsets - torch.tensor([0.0, 0.06, 0.03])
    assert deviation.abs().max() <= 0.02 + 1e-6
    assert deviation.abs().max() > 0.018 and deviation.std(dim=0).min() > 0.008  # spread over the whole range
    # a pure function of the seed: the same episode sees the same camera on any actor
    assert torch.equal(sample_scene("pick_cube", 7, jittered)["camera_offset"], offsets[7])


def test_bad_appearance_values_fail_with_their_key() -> None:
    for override, key in (
        ("sim.camera_offset=[0.0,0.1]", "sim.camera_offset"),
        ("sim.camera_offset=[0.0,0.5,0.0]", "sim.camera_offset"),
        ("sim.light_dir=[0,0,0]", "sim.light_dir"),
        ("sim.ambient_light=1.5", "sim.ambient_light"),
        ("collect.camera_jitter=0.3", "collect.camera_jitter"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(load_config("configs/quickstart.yaml", [override]))


def test_a_dataset_is_reused_only_in_the_appearance_it_was_collected_in() -> None:
    cfg = load_config("configs/quickstart.yaml", [])
    default = {"extra": {"appearance": appearance_of(cfg.sim).to_dict()}}
    _check_collected_alike(default, cfg)
    _check_collected_alike({"extra": {}}, cfg)  # recorded before appearances were: the default scene
    jittered = load_config("configs/quickstart.yaml", ["collect.camera_jitter=0.04"])
    with pytest.raises(ConfigError, match="collect.camera_jitter"):
        _check_collected_alike(default, jittered)
    with pytest.raises(ConfigError, match="collect.camera_jitter"):
        _check_collected_alike({"extra": {}}, jittered)
    distracted = load_config("configs/quickstart.yaml", ["sim.distractor=true"])
    with pytest.raises(ConfigError, match="sim.distractor"):
        _check_collected_alike(default, distracted)
