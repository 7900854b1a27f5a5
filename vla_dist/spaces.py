"""What the simulator and a policy agree on: action and state spaces, cameras, tasks and their words.

The simulator (`sim/`) produces and consumes these, a dataset's manifest records them, a policy
(`models/`) is built for them and config validation checks names against them. Plain data and
functions of it importing nothing of the project: every layer may read it, so none of them has to
import another for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EE_DELTA_POSE = {
    "type": "ee_delta_pose",
    "dim": 7,
    "names": ["dx", "dy", "dz", "drx", "dry", "drz", "gripper"],
    "description": (
        "Per control step: translation of the Franka hand link's commanded target in the robot base frame (m), "
        "rotation of that target as an axis-angle vector in the base frame (rad), gripper command (>0 close, "
        "<=0 open). The target starts at the measured hand pose and stays within 5 cm of it."
    ),
    "frame": "robot_base",
}
JOINT_POSITION = {
    "type": "joint_position",
    "dim": 8,
    "names": [f"joint{i}_target" for i in range(1, 8)] + ["gripper"],
    "description": (
        "Per control step: absolute position targets (rad) of the Franka's seven arm joints for their PD "
        "controllers, gripper command (>0 close, <=0 open)."
    ),
    "frame": "joint",
}
# Relative joint actions (ManiSkill's pd_joint_delta_pos; openpi trains joint-space pi0 on targets
# relative to the current joints): a policy reading its joints cannot reproduce the next target by
# copying them, which is how absolute targets let it ignore the images (docs/recipes.md).
JOINT_DELTA = {
    "type": "joint_delta",
    "dim": 8,
    "names": [f"joint{i}_delta" for i in range(1, 8)] + ["gripper"],
    "description": (
        "Per control step: position targets of the Franka's seven arm joints as offsets (rad) from the joints' "
        "measured positions at that step, gripper command (>0 close, <=0 open)."
    ),
    "frame": "joint",
}
# The action spaces the simulator takes (sim.action_space), by type. The scripted expert speaks
# end-effector deltas; in a joint scene its actions become the joint targets the scene's own inverse
# kinematics gives for them (sim/scene.py), or their offsets from the measured joints, so every space
# has the same expert.
ACTION_SPACES: dict[str, dict[str, object]] = {
    space["type"]: space for space in (EE_DELTA_POSE, JOINT_POSITION, JOINT_DELTA)}
ACTION_SPACE = EE_DELTA_POSE  # the default
STATE_SPACE = {
    "dim": 15,
    "names": [f"joint{i}" for i in range(1, 8)]
    + ["gripper_width", "hand_x", "hand_y", "hand_z", "hand_qw", "hand_qx", "hand_qy", "hand_qz"],
    "description": "Arm joint positions (rad), finger opening (m), hand link position (m) and quaternion (w, x, y, z).",
}

CAMERAS: tuple[str, ...] = ("front", "wrist")  # the scene's cameras; task.cameras picks among them

# Per task, the paraphrases of its instruction (one is drawn per episode; the tokenizer is trained on
# all of them). The order of the tasks is TASK_NAMES' order, which task ids index.
TASK_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "pick_cube": (
        "pick up the red cube",
        "lift the red block off the table",
        "grab the red cube and raise it",
        "pick the red block up",
    ),
    "push_cube": (
        "push the red cube onto the green target",
        "slide the red block to the green circle",
        "move the red cube to the green mark by pushing it",
        "shove the red block onto the green disk",
    ),
    "stack_cube": (
        "stack the red cube on the blue cube",
        "put the red block on top of the blue block",
        "place the red cube onto the blue one",
        "pick up the red block and set it on the blue block",
    ),
    # The blue cube as the object of the first two tasks' verbs, word for word the red cube's phrasings
    # with the colour changed: with both cubes on the table (sim.both_cubes) only the instruction says
    # which cube is meant, and a policy trained on three of the four (verb, cube) pairs can be evaluated
    # on the fourth, whose words it has all read in other pairs (held-out task combinations).
    "pick_blue_cube": (
        "pick up the blue cube",
        "lift the blue block off the table",
        "grab the blue cube and raise it",
        "pick the blue block up",
    ),
    "push_blue_cube": (
        "push the blue cube onto the green target",
        "slide the blue block to the green circle",
        "move the blue cube to the green mark by pushing it",
        "shove the blue block onto the green disk",
    ),
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_INSTRUCTIONS)
# task.name=all: the three tasks of the red cube. Every dataset, policy and figure made before the
# blue-cube tasks existed used these, and so do the tokenizer's corpus (models/processing.py) and "all".
CORE_TASKS: tuple[str, ...] = ("pick_cube", "push_cube", "stack_cube")


def action_space_type(space: Mapping[str, Any]) -> str | None:
    """Which of the simulator's action spaces a manifest's action_space is: the one of its type and dim,
    else the one whose action names it has (a LeRobot import of our data keeps the names but not the
    type); None: another robot's."""
    dim, names = space.get("dim"), list(space.get("names") or [])
    for kind, known in ACTION_SPACES.items():
        if dim == known["dim"] and (space.get("type") == kind or (names and names == known["names"])):
            return kind
    return None  # (another robot's "joint_position" of 10 dims is not ours)


def simulator_mismatch(cameras: list[str], action_dim: int, state_dim: int,
                       action_space: str | None = None, sim_action_space: str = "ee_delta_pose") -> str | None:
    """Why a policy (or dataset) of these cameras, dims and action space cannot run in our Franka scene
    taking `sim_action_space` (sim.action_space); None if it can. `action_space` None: not recorded, the
    dims decide. Data of another robot trains and is scored offline (eval.offline_data), never in this
    simulator."""
    sim = ACTION_SPACES[sim_action_space]
    if (action_dim, state_dim) == (sim["dim"], STATE_SPACE["dim"]) and set(cameras) <= set(CAMERAS) and \
            action_space in (None, sim_action_space):
        return None
    if action_space in ACTION_SPACES and action_space != sim_action_space:
        return (f"{action_space} actions, not the {sim_action_space} actions this simulator takes "
                f"(set sim.action_space={action_space})")
    return (f"cameras {list(cameras)}, action/state dims {action_dim}/{state_dim}: another embodiment than the "
            f"simulator's Franka (cameras {list(CAMERAS)}, dims {sim['dim']}/{STATE_SPACE['dim']} for "
            f"{sim_action_space} actions)")
