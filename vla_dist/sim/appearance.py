"""What the cameras see apart from the task: where the front camera stands, the lighting, and a
distractor object. None of it changes the physics or the task's success, so one layout seed gives
the same episode to the expert in every appearance, and a policy's success in a perturbed scene is
paired layout by layout with its success in the default one.

Two uses (the perception recipes, docs/recipes.md):
- a perturbed evaluation scene (`sim.camera_offset`, `sim.light_*`, `sim.ambient_light`,
  `sim.distractor`): how much of a policy's success survives what should not matter;
- camera randomization in collection (`collect.camera_jitter`): every demonstration episode sees the
  scene from its own camera position, so the policy cannot rely on one viewpoint;
- lighting randomization in collection (`collect.light_jitter`): the light's direction, its intensity
  and the ambient light are drawn anew for every batch of episodes, so the policy cannot rely on one
  shading of the cube. Per batch, not per episode: Genesis' rasterizer lights all envs of a scene
  alike in one render pass. The draw is seeded by the batch's first episode seed and recorded in every
  episode of the batch (its meta.json "look").

The per-episode draws (camera jitter, distractor place) come from their own generator seeded by the
episode seed, never from the layout's: a scene with a distractor keeps every object where the
default scene puts it.

One setting here is not only looks: `sim.both_cubes` puts the cube a task does not use on the table
(tasks.with_other_cube), a real body the hand can bump. It rides with the appearance because it is
scene content a config asks for and a dataset records, like the distractor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from vla_dist.sim.tasks import CUBE_SIZE, objects_in_use, sample_layout, with_other_cube

FRONT_CAMERA_POS = (0.95, 0.0, 0.42)
FRONT_CAMERA_LOOKAT = (0.5, 0.0, 0.05)
DISTRACTOR_SIZE = CUBE_SIZE  # the red cube's size in another colour: the sharpest visual confusion
DISTRACTOR_COLOR = (0.9, 0.75, 0.1)  # yellow
DISTRACTOR_PARKED = (0.0, -1.8, CUBE_SIZE / 2)  # out of every camera's view, like the unused objects
# clearance (m, centre to centre) the distractor keeps from the red cube and any object the task uses,
# so it never hides them from the front camera or sits where the hand must go
DISTRACTOR_CLEARANCE = 0.10
LOOK_STREAM = 1 << 40  # offset of the appearance generator's seed from the layout's
LIGHT_STREAM = 1 << 41  # offset of the lighting generator's seed (one draw per batch of episodes)


@dataclass(frozen=True)
class Appearance:
    camera_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # m added to the front camera's position
    camera_jitter: float = 0.0  # m: each episode adds a uniform draw in +-this per axis to the position
    light_dir: tuple[float, float, float] = (-1.0, -1.0, -1.0)  # the directional light (Genesis' default)
    light_intensity: float = 5.0
    ambient_light: float = 0.3  # grey level of the ambient light
    distractor: bool = False  # a yellow cube on the table, placed per episode away from the task's objects
    # lighting randomization, per batch of episodes (`lighting_of`): intensity and ambient scaled by
    # U[1 - j, 1 + j], the light's direction turned about the vertical by U[-j, j] x 180 degrees
    light_jitter: float = 0.0
    both_cubes: bool = False  # the cube a pick or push does not use on the table too (tasks.with_other_cube)

    @property
    def moves_camera(self) -> bool:
        return self.camera_jitter > 0 or any(v != 0 for v in self.camera_offset)

    def to_dict(self) -> dict[str, object]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


class SceneSettings(Protocol):
    """What `appearance_of` reads: the config's `sim` section has these keys (the simulator knows
    nothing of configs)."""

    camera_offset: Sequence[float]
    light_dir: Sequence[float]
    light_intensity: float
    ambient_light: float
    distractor: bool
    both_cubes: bool


@dataclass(frozen=True)
class Lighting:
    """The lights one render pass uses: a directional light and the ambient grey level."""

    light_dir: tuple[float, float, float]
    light_intensity: float
    ambient_light: float

    def to_dict(self) -> dict[str, object]:
        return {"light_dir": list(self.light_dir), "light_intensity": self.light_intensity,
                "ambient_light": self.ambient_light}


def lighting_of(appearance: Appearance, seed: int) -> Lighting:
    """The lights of a batch of episodes whose first episode seed is `seed`: the appearance's own,
    or with `light_jitter` a draw from a generator of its own (never the layout's), so the draw is a
    pure function of (appearance, seed) and a re-collected batch is lit the same."""
    base = Lighting(appearance.light_dir, appearance.light_intensity, appearance.ambient_light)
    jitter = appearance.light_jitter
    if jitter <= 0:
        return base
    gen = torch.Generator().manual_seed(seed + LIGHT_STREAM)
    scale_light, scale_ambient, turn = (2 * torch.rand(3, generator=gen, dtype=torch.float64) - 1).tolist()
    angle = math.pi * jitter * turn
    dx, dy, dz = base.light_dir
    cos, sin = math.cos(angle), math.sin(angle)
    return Lighting(
        light_dir=(round(cos * dx - sin * dy, 6), round(sin * dx + cos * dy, 6), dz),
        light_intensity=round(base.light_intensity * (1 + jitter * scale_light), 6),
        ambient_light=round(min(1.0, base.ambient_light * (1 + jitter * scale_ambient)), 6),
    )


def appearance_of(sim: SceneSettings, camera_jitter: float = 0.0, light_jitter: float = 0.0) -> Appearance:
    """The Appearance a config asks for: `sim.*` (the scene) and collection's camera and light jitter."""
    x, y, z = (float(v) for v in sim.camera_offset)
    dx, dy, dz = (float(v) for v in sim.light_dir)
    return Appearance(
        camera_offset=(x, y, z), camera_jitter=float(camera_jitter), light_dir=(dx, dy, dz),
        light_intensity=float(sim.light_intensity), ambient_light=float(sim.ambient_light),
        distractor=bool(sim.distractor), light_jitter=float(light_jitter), both_cubes=bool(sim.both_cubes),
    )


def sample_scene(task: str, seed: int, appearance: Appearance) -> dict[str, torch.Tensor]:
    """One env's episode start: its layout (`sample_layout`, the same in every appearance; with
    both_cubes the unused cube placed too) and its appearance draws {camera_offset [3], distractor_pos
    [3]}; a pure function of its arguments."""
    layout = sample_layout(task, seed)
    if appearance.both_cubes:
        layout = with_other_cube(task, seed, layout)
    return {**layout, **_sample_look(appearance, seed, layout, task)}


def _sample_look(appearance: Appearance, seed: int, layout: dict[str, torch.Tensor], task: str
                 ) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + LOOK_STREAM)
    offset = torch.tensor(appearance.camera_offset, dtype=torch.float32)
    if appearance.camera_jitter > 0:
        offset = offset + appearance.camera_jitter * (2 * torch.rand(3, generator=gen) - 1)
    distractor = torch.tensor(DISTRACTOR_PARKED, dtype=torch.float32)
    if appearance.distractor:
        keep_clear = objects_in_use(task, layout)
        if appearance.both_cubes:  # (stacking's base is in use already: listed twice, harmless)
            other = layout["cube_pos"] if bool(layout["blue_subject"]) else layout["base_pos"]
            keep_clear.append(other[:2])
        distractor = _distractor_place(gen, keep_clear)
    return {"camera_offset": offset, "distractor_pos": distractor}


def _distractor_place(gen: torch.Generator, keep_clear: list[torch.Tensor]) -> torch.Tensor:
    """A free spot on the workspace in front of the camera (the cube's sampling box, widened), at
    least DISTRACTOR_CLEARANCE from every object on the table (`keep_clear`, xy)."""
    for _ in range(200):  # three 10 cm discs leave most of a 26 x 44 cm area free: a few draws suffice
        xy = torch.stack((0.40 + 0.26 * torch.rand((), generator=gen), -0.22 + 0.44 * torch.rand((), generator=gen)))
        if all(float((xy - other).norm()) >= DISTRACTOR_CLEARANCE for other in keep_clear):
            return torch.cat((xy, torch.tensor([DISTRACTOR_SIZE / 2])))
    raise RuntimeError("no free spot for the distractor on the workspace")
