"""What the simulator and a policy agree on: action and state spaces, cameras, tasks and their words.

The simulator (`sim/`) produces and consumes these, a dataset's manifest records them, a policy
(`models/`) is built for them and config validation checks names against them. Plain data, no
imports: every layer may read it, so none of them has to import another for it.
"""

from __future__ import annotations

ACTION_SPACE = {
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
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_INSTRUCTIONS)


def simulator_mismatch(cameras: list[str], action_dim: int, state_dim: int) -> str | None:
    """Why a policy (or dataset) of these cameras and dims cannot run in our Franka scene; None if it can.
    Data of another robot trains and is scored offline (eval.offline_data), never in this simulator."""
    if (action_dim, state_dim) == (ACTION_SPACE["dim"], STATE_SPACE["dim"]) and set(cameras) <= set(CAMERAS):
        return None
    return (f"cameras {list(cameras)}, action/state dims {action_dim}/{state_dim}: another embodiment than the "
            f"simulator's Franka (cameras {list(CAMERAS)}, dims {ACTION_SPACE['dim']}/{STATE_SPACE['dim']})")
