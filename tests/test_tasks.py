"""The success checks of the three tasks, at their thresholds, on constructed simulator states.

`check_success` is plain torch on positions (no Genesis scene): each threshold is probed a millimetre
or so on both sides, with the numbers written out here rather than read from the module's constants,
so a changed threshold fails a test instead of moving it along.
"""

from __future__ import annotations

import math

import torch

from vla_dist.sim.task_names import TASK_NAMES
from vla_dist.sim.tasks import check_success, goal_distance

PICK, PUSH, STACK = (TASK_NAMES.index(name) for name in ("pick_cube", "push_cube", "stack_cube"))
RESTING_CUBE_Z = 0.02  # the red cube (4 cm) resting on the table
PARKED_BASE, PARKED_TARGET = (0.0, 1.6, 0.03), (0.0, -1.6, 0.001)


def success(task: int, cubes: list[tuple[float, float, float]], base: tuple[float, float, float] = PARKED_BASE,
            target: tuple[float, float, float] = PARKED_TARGET, gripper_open: bool = True) -> list[bool]:
    """check_success for one task over a batch of red-cube positions (the other objects fixed)."""
    n = len(cubes)
    return check_success(
        torch.full((n,), task, dtype=torch.long), torch.tensor(cubes), torch.tensor([base] * n),
        torch.tensor([target] * n), torch.full((n,), gripper_open),
    ).tolist()


def test_pick_succeeds_above_10_cm_only() -> None:
    heights = [RESTING_CUBE_Z, 0.09, 0.099, 0.101, 0.11, 0.30]
    assert success(PICK, [(0.5, 0.0, z) for z in heights]) == [False, False, False, True, True, True]
    # Lifting is all pick asks: where the cube is in xy and what the gripper does do not matter.
    assert success(PICK, [(0.62, -0.15, 0.11)], gripper_open=False) == [True]


def test_push_succeeds_within_3_cm_of_the_target_centre() -> None:
    target = (0.55, 0.05, 0.001)
    cubes = []
    for angle in (0.0, 1.0, 2.5, -2.0):  # the tolerance is a disc around the target, whatever the direction
        for distance in (0.0, 0.029, 0.031, 0.05):
            cubes.append((target[0] + distance * math.cos(angle), target[1] + distance * math.sin(angle),
                          RESTING_CUBE_Z))
    assert success(PUSH, cubes, target=target) == [True, True, False, False] * 4
    # 2.9 cm off in x and 0.9 cm in y is 3.04 cm away: the distance, not each axis, is checked.
    assert success(PUSH, [(target[0] + 0.029, target[1] + 0.009, RESTING_CUBE_Z)], target=target) == [False]


def test_stack_needs_the_cube_centred_resting_on_the_base_and_released() -> None:
    base = (0.50, -0.10, 0.03)  # the 6 cm blue cube on the table: its top at 6 cm
    on_top = 0.06 + 0.02  # the red cube resting on it
    x, y = base[0], base[1]
    centred = [(x, y, on_top), (x + 0.019, y, on_top), (x, y - 0.019, on_top), (x + 0.013, y + 0.013, on_top)]
    assert success(STACK, centred, base=base) == [True, True, True, True]
    off_centre = [(x + 0.021, y, on_top), (x, y - 0.021, on_top), (x + 0.015, y + 0.015, on_top)]  # 2.1 cm off
    assert success(STACK, off_centre, base=base) == [False, False, False]
    heights = [on_top - 0.011, on_top - 0.009, on_top + 0.009, on_top + 0.011, 0.11]  # 0.11: held up high
    assert success(STACK, [(x, y, z) for z in heights], base=base) == [False, True, True, False, False]
    # Still in the closed hand: not stacked, even where a released cube would count.
    assert success(STACK, centred, base=base, gripper_open=False) == [False] * 4


def test_each_env_is_judged_by_its_own_task() -> None:
    """One batch mixing tasks: the same states give each env its own task's verdict."""
    base, target = (0.50, -0.10, 0.03), (0.55, 0.05, 0.001)
    lifted, on_target, stacked = (0.45, 0.10, 0.12), (0.55, 0.05, RESTING_CUBE_Z), (0.50, -0.10, 0.08)
    cubes = [lifted, on_target, stacked] * 3
    tasks = [PICK] * 3 + [PUSH] * 3 + [STACK] * 3
    got = check_success(
        torch.tensor(tasks), torch.tensor(cubes), torch.tensor([base] * 9), torch.tensor([target] * 9),
        torch.ones(9, dtype=torch.bool),
    )
    assert got.tolist() == [True, False, False, False, True, False, False, False, True]


def test_goal_distance_is_each_tasks_distance_to_its_success_region() -> None:
    """The progress measure agrees with check_success: zero (pick) or within tolerance exactly where a
    task's position condition holds, and it grows with the distance the task cares about."""
    base, target = (0.50, -0.10, 0.03), (0.55, 0.05, 0.001)
    cubes = [
        (0.45, 0.10, RESTING_CUBE_Z), (0.45, 0.10, 0.06), (0.45, 0.10, 0.12),  # pick: 8, 4, 0 cm to lift
        (0.55, 0.05, RESTING_CUBE_Z), (0.55 + 0.04, 0.05 - 0.03, RESTING_CUBE_Z), (0.55, 0.05, 0.30),  # push
        (0.50, -0.10, 0.08), (0.50 + 0.03, -0.10, 0.08 + 0.04), (0.50, -0.10, RESTING_CUBE_Z),  # stack
    ]
    tasks = [PICK] * 3 + [PUSH] * 3 + [STACK] * 3
    got = goal_distance(torch.tensor(tasks), torch.tensor(cubes), torch.tensor([base] * 9),
                        torch.tensor([target] * 9))
    # push ignores height (a cube held over the target is 0 away in xy); stack measures 3-D, 5 cm and 6 cm.
    expected = [0.08, 0.04, 0.0, 0.0, 0.05, 0.0, 0.0, 0.05, 0.06]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6), got.tolist()
