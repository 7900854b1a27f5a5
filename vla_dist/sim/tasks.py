"""Franka table-top tasks: language instructions, randomized initial layouts and success checks.

Everything here is plain torch on simulator state, so a task can be unit-tested and reused by the
scripted expert without a Genesis scene. Coordinates are metres in the robot base frame; the table
top is the plane z = 0.

Every task shares one scene (see `scene.py`) holding a red cube (the object that is manipulated), a
blue cube (the base for stacking) and a green target disk (the goal for pushing); objects a task does
not use are parked out of the cameras' view. One scene layout keeps Genesis' compiled kernels the
same for all tasks, and lets one batch mix tasks env by env.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vla_dist.spaces import TASK_INSTRUCTIONS, TASK_NAMES

CUBE_SIZE = 0.04  # red cube edge, m
BASE_SIZE = 0.06  # blue cube edge, m
TARGET_RADIUS = 0.04  # green disk, m
PARKED = {"base": (0.0, 1.6, BASE_SIZE / 2), "target": (0.0, -1.6, 0.001)}  # out of every camera's view


@dataclass(frozen=True)
class TaskSpec:
    name: str
    instructions: tuple[str, ...]  # paraphrases (vla_dist/spaces.py); one is drawn per episode
    max_steps: int  # control steps before an episode counts as failed
    uses_base: bool
    uses_target: bool


TASKS: dict[str, TaskSpec] = {
    "pick_cube": TaskSpec("pick_cube", TASK_INSTRUCTIONS["pick_cube"], max_steps=60, uses_base=False,
                          uses_target=False),
    "push_cube": TaskSpec("push_cube", TASK_INSTRUCTIONS["push_cube"], max_steps=80, uses_base=False,
                          uses_target=True),
    "stack_cube": TaskSpec("stack_cube", TASK_INSTRUCTIONS["stack_cube"], max_steps=90, uses_base=True,
                           uses_target=False),
}
assert tuple(TASKS) == TASK_NAMES, "vla_dist/spaces.py must list the tasks defined here, in this order"

# Success thresholds.
LIFT_HEIGHT = 0.10  # pick: red cube centre above this height (it rests at CUBE_SIZE / 2)
PUSH_TOLERANCE = 0.03  # push: red cube centre within this xy distance of the target centre
STACK_XY_TOLERANCE = 0.02  # stack: red cube centred on the blue cube within this distance
STACK_Z_TOLERANCE = 0.01


@dataclass
class Layout:
    """Initial object poses for a batch of envs, each tensor with leading dimension B."""

    cube_pos: torch.Tensor  # [B, 3]
    cube_yaw: torch.Tensor  # [B]
    base_pos: torch.Tensor  # [B, 3]
    target_pos: torch.Tensor  # [B, 3]
    arm_noise: torch.Tensor  # [B, 7] perturbation of the home joint configuration, rad
    # appearance (vla_dist/sim/appearance.py; None: the default scene)
    camera_offset: torch.Tensor | None = None  # [B, 3] front camera position offset, m
    distractor_pos: torch.Tensor | None = None  # [B, 3]


def _uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def sample_layout(task: str, seed: int) -> dict[str, torch.Tensor]:
    """One env's randomized initial state; a pure function of (task, seed)."""
    spec = TASKS[task]
    gen = torch.Generator().manual_seed(seed)
    cube_xy = torch.cat((_uniform(gen, 0.45, 0.62), _uniform(gen, -0.15, 0.15)))
    cube_yaw = _uniform(gen, -0.6, 0.6)
    base = torch.tensor(PARKED["base"])
    target = torch.tensor(PARKED["target"])
    if spec.uses_base or spec.uses_target:
        # Second object at 12-18 cm from the cube, in a direction that keeps it on the workspace.
        for _ in range(100):
            angle = _uniform(gen, -3.14159, 3.14159)
            dist = _uniform(gen, 0.12, 0.18)
            other = cube_xy + dist * torch.cat((torch.cos(angle), torch.sin(angle)))
            if 0.40 <= other[0] <= 0.68 and -0.2 <= other[1] <= 0.2:
                break
        if spec.uses_base:
            base = torch.cat((other, torch.tensor([BASE_SIZE / 2])))
        else:
            target = torch.cat((other, torch.tensor([0.001])))
    return {
        "cube_pos": torch.cat((cube_xy, torch.tensor([CUBE_SIZE / 2]))),
        "cube_yaw": cube_yaw[0],
        "base_pos": base,
        "target_pos": target,
        "arm_noise": 0.05 * (2 * torch.rand(7, generator=gen) - 1),
    }


def stack_layouts(layouts: list[dict[str, torch.Tensor]]) -> Layout:
    return Layout(**{key: torch.stack([lay[key] for lay in layouts]) for key in layouts[0]})


def pick_instruction(task: str, seed: int, paraphrases: Sequence[int] = ()) -> str:
    """The episode's instruction: one of the task's paraphrases, drawn by the seed; `paraphrases`
    (task.paraphrases) restricts the draw to those indices, so a policy can be trained on some phrasings
    and evaluated on one it never read (the task-comprehension recipes)."""
    options = TASKS[task].instructions
    if paraphrases:
        options = tuple(options[i] for i in paraphrases)
    return options[seed % len(options)]


def _resting_on_base(base_pos: torch.Tensor) -> torch.Tensor:
    """[B, 3] where the red cube's centre rests when stacked on the blue cube."""
    return base_pos + torch.tensor([0.0, 0.0, BASE_SIZE / 2 + CUBE_SIZE / 2])


def _for_each_task(task_ids: torch.Tensor, pick: torch.Tensor, push: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """[B] each env's value of its own task (columns in TASK_NAMES order)."""
    return torch.stack((pick, push, stack), dim=-1).gather(1, task_ids[:, None]).squeeze(1)


def check_success(
    task_ids: torch.Tensor, cube_pos: torch.Tensor, base_pos: torch.Tensor, target_pos: torch.Tensor,
    gripper_open: torch.Tensor,
) -> torch.Tensor:
    """Per-env success from simulator state. `task_ids` index TASK_NAMES; returns bool [B]."""
    lifted = cube_pos[:, 2] > LIFT_HEIGHT
    on_target = (cube_pos[:, :2] - target_pos[:, :2]).norm(dim=-1) < PUSH_TOLERANCE
    resting = _resting_on_base(base_pos)
    stacked = (
        ((cube_pos[:, :2] - resting[:, :2]).norm(dim=-1) < STACK_XY_TOLERANCE)
        & ((cube_pos[:, 2] - resting[:, 2]).abs() < STACK_Z_TOLERANCE)
        & gripper_open  # released: the blue cube holds it, not the hand
    )
    return _for_each_task(task_ids, lifted, on_target, stacked)


def goal_distance(
    task_ids: torch.Tensor, cube_pos: torch.Tensor, base_pos: torch.Tensor, target_pos: torch.Tensor
) -> torch.Tensor:
    """[B] how far (m) the red cube is from its task's success region: pick, the height still to lift
    (0 once above LIFT_HEIGHT); push, the cube centre to the target centre in xy; stack, the cube
    centre to its resting point on the blue cube. A progress measure for evaluation that tells a push
    that stopped 4 cm short from one that never touched the cube; success also needs the tolerance,
    the hold, and (stack) the release, which `check_success` checks."""
    below_lift = (LIFT_HEIGHT - cube_pos[:, 2]).clamp_min(0.0)
    to_target = (cube_pos[:, :2] - target_pos[:, :2]).norm(dim=-1)
    to_resting = (cube_pos - _resting_on_base(base_pos)).norm(dim=-1)
    return _for_each_task(task_ids, below_lift, to_target, to_resting)
