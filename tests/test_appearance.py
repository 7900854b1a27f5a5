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
    Lighting,
    appearance_of,
    lighting_of,
    sample_scene,
)
from vla_dist.sim.tasks import TASKS, sample_layout, subject_pos
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
        used = [subject_pos(drawn)] + [drawn["base_pos"]] * spec.uses_base + [drawn["target_pos"]] * spec.uses_target
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


def test_lights_drawn_per_batch_seed_within_the_asked_range() -> None:
    """collect.light_jitter: intensity and ambient scaled by U[1-j, 1+j], the light turned about the
    vertical by up to j x 180 degrees (its elevation kept); none of it without jitter."""
    fixed = Appearance()
    assert lighting_of(fixed, 3) == Lighting(fixed.light_dir, fixed.light_intensity, fixed.ambient_light)
    jitter = 0.6
    look = Appearance(light_jitter=jitter)
    draws = [lighting_of(look, seed) for seed in range(400)]
    intensity = torch.tensor([d.light_intensity for d in draws]) / fixed.light_intensity
    ambient = torch.tensor([d.ambient_light for d in draws]) / fixed.ambient_light
    dirs = torch.tensor([d.light_dir for d in draws])
    base = torch.tensor(fixed.light_dir)
    turn = torch.atan2(dirs[:, 1], dirs[:, 0]) - torch.atan2(base[1], base[0])
    turn = torch.remainder(turn + torch.pi, 2 * torch.pi) - torch.pi  # wrapped to [-pi, pi)
    for scale in (intensity, ambient):
        assert scale.min() >= 1 - jitter - 1e-5 and scale.max() <= 1 + jitter + 1e-5
        assert scale.min() < 1 - 0.9 * jitter and scale.max() > 1 + 0.9 * jitter  # the whole range is drawn
    assert turn.abs().max() <= jitter * torch.pi + 1e-4 and turn.abs().max() > 0.9 * jitter * torch.pi
    assert torch.allclose(dirs[:, :2].norm(dim=1), base[:2].norm().expand(len(draws)), atol=1e-5)  # turned only
    assert torch.all(dirs[:, 2] == base[2])
    # a pure function of the batch's first seed, and independent of its layout stream
    assert lighting_of(look, 17) == draws[17] and lighting_of(look, 18) != draws[17]
    assert torch.equal(sample_scene("pick_cube", 17, look)["cube_pos"], sample_layout("pick_cube", 17)["cube_pos"])


def test_bad_appearance_values_fail_with_their_key() -> None:
    for override, key in (
        ("sim.camera_offset=[0.0,0.1]", "sim.camera_offset"),
        ("sim.camera_offset=[0.0,0.5,0.0]", "sim.camera_offset"),
        ("sim.light_dir=[0,0,0]", "sim.light_dir"),
        ("sim.ambient_light=1.5", "sim.ambient_light"),
        ("collect.camera_jitter=0.3", "collect.camera_jitter"),
        ("collect.light_jitter=1.0", "collect.light_jitter"),
        ("collect.light_jitter=-0.1", "collect.light_jitter"),
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
    relit = load_config("configs/quickstart.yaml", ["collect.light_jitter=0.5"])
    with pytest.raises(ConfigError, match="collect.light_jitter"):
        _check_collected_alike(default, relit)
    with pytest.raises(ConfigError, match="collect.light_jitter"):
        _check_collected_alike({"extra": {"appearance": {"camera_jitter": 0.0}}}, relit)  # before it was recorded
    _check_collected_alike({"extra": {"appearance": {"camera_jitter": 0.0}}}, cfg)
    distracted = load_config("configs/quickstart.yaml", ["sim.distractor=true"])
    with pytest.raises(ConfigError, match="sim.distractor"):
        _check_collected_alike(default, distracted)
