"""The in-memory episode: what a sim actor produces and what the shard reader gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Episode:
    episode_id: str  # unique within a dataset; the WebDataset sample key (no dots)
    task: str
    instruction: str
    seed: int
    success: bool
    fps: float  # control rate the frames/actions were recorded at
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> uint8 [T, H, W, 3]
    state: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # float32 [T, S]
    actions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # float32 [T, A]
    # Closest the grasp point (between the finger pads) came to the task cube's centre (m), from simulator
    # state: a dense progress measure for eval (a policy that never succeeds can still learn to reach).
    # In-memory only, not in shards.
    closest_approach_m: float = float("nan")
    # Closest the task's cube came to its success region (m; `vla_dist.sim.tasks.goal_distance`):
    # tells a push that stopped short of the target from one that never moved the cube. In-memory only.
    closest_goal_m: float = float("nan")
    # The cube the task does not use (with both cubes on the table) went above a pick's lift height:
    # the policy picked the cube the instruction did not name. In-memory only.
    other_cube_lifted: bool = False
    # What the cameras saw apart from the task (vla_dist/sim/appearance.py): the front camera's offset and
    # the lights, e.g. drawn by collection's camera and light randomization. In meta.json when set.
    look: dict[str, Any] = field(default_factory=dict)
    # The task cube's centre (m, world frame; the blue cube's in a blue-cube task) at each recorded
    # step, from simulator state: privileged, never a policy input; the target of training's auxiliary
    # object head (train.object_target). float32 [T, 3], or [0, 0] when not recorded (datasets from
    # before it was, imports).
    object_pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def num_frames(self) -> int:
        return int(self.actions.shape[0])
