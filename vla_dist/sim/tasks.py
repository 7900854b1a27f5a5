"""Franka table-top tasks: language instructions, randomized initial layouts and success checks.

Everything here is plain torch on simulator state, so a task can be unit-tested and reused by the
scripted expert without a Genesis scene. Coordinates are metres in the robot base frame; the table
top is the plane z = 0.

Every task shares one scene (see `scene.py`) holding a red cube (the object the core tasks
manipulate), a blue cube (the base for stacking) and a green target disk (the goal for pushing);
objects a task does not use are parked out of the cameras' view. One scene layout keeps Genesis'
compiled kernels the same for all tasks, and lets one batch mix tasks env by env.

A task is a verb applied to a subject cube: pick_blue_cube and push_blue_cube pick and push the blue
cube instead of the red one (held-out task combinations). Their layouts draw exactly what the red
cube's task draws from the same seed, with the blue cube where the red one would be; the scene reports
the task's cube as `cube_pos` (scene.object_state), so the success checks and the scripted expert
here are written once, for "the task's cube", whichever it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vla_dist.spaces import TASK_INSTRUCTIONS, TASK_NAMES

CUBE_SIZE = 0.04  # red cube edge, m
BASE_SIZE = 0.06  # blue cube edge, m
TARGET_RADIUS = 0.04  # green disk, m
# out of every camera's view
PARKED = {"base": (0.0, 1.6, BASE_SIZE / 2), "target": (0.0, -1.6, 0.001), "cube": (0.0, 1.8, CUBE_SIZE / 2)}
VERBS = ("pick", "push", "stack")  # what a task does to its cube: the success check and the expert's phases
SUBJECT_SIZE = {"red": CUBE_SIZE, "blue": BASE_SIZE}  # edge of each cube a task can manipulate, m


@dataclass(frozen=True)
class TaskSpec:
    name: str
    instructions: tuple[str, ...]  # paraphrases (vla_dist/spaces.py); one is drawn per episode
    max_steps: int  # control steps before an episode counts as failed
    uses_base: bool  # the blue cube is stacked on (stack)
    uses_target: bool
    verb: str  # one of VERBS
    subject: str = "red"  # the cube the verb applies to: "red" or "blue"


TASKS: dict[str, TaskSpec] = {
    "pick_cube": TaskSpec("pick_cube", TASK_INSTRUCTIONS["pick_cube"], max_steps=60, uses_base=False,
                          uses_target=False, verb="pick"),
    "push_cube": TaskSpec("push_cube", TASK_INSTRUCTIONS["push_cube"], max_steps=80, uses_base=False,
                          uses_target=True, verb="push"),
    "stack_cube": TaskSpec("stack_cube", TASK_INSTRUCTIONS["stack_cube"], max_steps=90, uses_base=True,
                           uses_target=False, verb="stack"),
    "pick_blue_cube": TaskSpec("pick_blue_cube", TASK_INSTRUCTIONS["pick_blue_cube"], max_steps=60,
                               uses_base=False, uses_target=False, verb="pick", subject="blue"),
    "push_blue_cube": TaskSpec("push_blue_cube", TASK_INSTRUCTIONS["push_blue_cube"], max_steps=80,
                               uses_base=False, uses_target=True, verb="push", subject="blue"),
}
assert tuple(TASKS) == TASK_NAMES, "vla_dist/spaces.py must list the tasks defined here, in this order"
# task id (index into TASK_NAMES) -> verb id (index into VERBS)
VERB_OF_TASK = torch.tensor([VERBS.index(TASKS[name].verb) for name in TASK_NAMES])

# Success thresholds.
LIFT_HEIGHT = 0.10  # pick: red cube centre above this height (it rests at CUBE_SIZE / 2)
PUSH_TOLERANCE = 0.03  # push: red cube centre within this xy distance of the target centre
STACK_XY_TOLERANCE = 0.02  # stack: red cube centred on the blue cube within this distance
STACK_Z_TOLERANCE = 0.01


@dataclass
class Layout:
    """Initial object poses for a batch of envs, each tensor with leading dimension B."""

    cube_pos: torch.Tensor  # [B, 3] the red cube
    cube_yaw: torch.Tensor  # [B]
    base_pos: torch.Tensor  # [B, 3] the blue cube
    target_pos: torch.Tensor  # [B, 3]
    arm_noise: torch.Tensor  # [B, 7] perturbation of the home joint configuration, rad
    blue_subject: torch.Tensor | None = None  # [B] bool: the task's cube is the blue one (None: red everywhere)
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
    arm_noise = 0.05 * (2 * torch.rand(7, generator=gen) - 1)
    cube = torch.cat((cube_xy, torch.tensor([CUBE_SIZE / 2])))
    blue = spec.subject == "blue"
    if blue:  # the blue cube where the red task's cube would be; the red one parked (or placed: sim.both_cubes)
        base, cube = torch.cat((cube_xy, torch.tensor([BASE_SIZE / 2]))), torch.tensor(PARKED["cube"])
    return {
        "cube_pos": cube,
        "cube_yaw": cube_yaw[0],
        "base_pos": base,
        "target_pos": target,
        "arm_noise": arm_noise,
        "blue_subject": torch.tensor(blue),
    }


def subject_pos(layout: dict[str, torch.Tensor]) -> torch.Tensor:
    """[3] where one env's task cube starts (`sample_layout`'s output)."""
    return layout["base_pos"] if bool(layout["blue_subject"]) else layout["cube_pos"]


OTHER_CUBE_STREAM = 1 << 42  # offset of the other cube's generator seed from the layout's
OTHER_CUBE_CLEARANCE = 0.10  # m from the task's objects and the push's path (centre to centre)


def objects_in_use(task: str, layout: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[2] table positions of the objects one env's task uses: its cube, the base or the target."""
    spec = TASKS[task]
    used = [subject_pos(layout)[:2]]
    if spec.uses_base:
        used.append(layout["base_pos"][:2])
    if spec.uses_target:
        used.append(layout["target_pos"][:2])
    return used


def with_other_cube(task: str, seed: int, layout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`layout` with the cube its task does not use on the table too (sim.both_cubes): the blue cube
    beside a red-cube pick or push, the red cube beside a blue-cube task; stacking uses both already.
    Then only the instruction tells which cube a pick or push means. The spot keeps
    OTHER_CUBE_CLEARANCE from the task's objects and from the line a push travels (from behind the
    cube to the target), drawn from its own generator: the task's layout is the one sample_layout
    gives, so an episode with both cubes is paired layout by layout with its one-cube twin."""
    if TASKS[task].uses_base:
        return layout
    gen = torch.Generator().manual_seed(seed + OTHER_CUBE_STREAM)
    keep_clear = objects_in_use(task, layout)
    if TASKS[task].uses_target:  # the push's path, every 2 cm from 6 cm behind the cube to the target
        start, end = keep_clear[0], keep_clear[-1]
        direction = (end - start) / (end - start).norm().clamp_min(1e-6)
        path_start = start - 0.06 * direction
        steps = int(float((end - path_start).norm()) / 0.02) + 1
        keep_clear += [path_start + (end - path_start) * (i / steps) for i in range(steps + 1)]
    for _ in range(500):
        xy = torch.stack((0.40 + 0.26 * torch.rand((), generator=gen), -0.22 + 0.44 * torch.rand((), generator=gen)))
        if all(float((xy - other).norm()) >= OTHER_CUBE_CLEARANCE for other in keep_clear):
            break
    else:
        raise RuntimeError(f"no free spot for the other cube on the workspace ({task}, seed {seed})")
    if bool(layout["blue_subject"]):
        return {**layout, "cube_pos": torch.cat((xy, torch.tensor([CUBE_SIZE / 2])))}
    return {**layout, "base_pos": torch.cat((xy, torch.tensor([BASE_SIZE / 2])))}


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
    """[B] each env's value for its own task's verb (columns in VERBS order)."""
    return torch.stack((pick, push, stack), dim=-1).gather(1, VERB_OF_TASK[task_ids][:, None]).squeeze(1)


def check_success(
    task_ids: torch.Tensor, cube_pos: torch.Tensor, base_pos: torch.Tensor, target_pos: torch.Tensor,
    gripper_open: torch.Tensor,
) -> torch.Tensor:
    """Per-env success from simulator state. `task_ids` index TASK_NAMES; `cube_pos` is each env's task
    cube (scene.object_state); returns bool [B]."""
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
