"""Run a batch of episodes in one `TabletopScene` with any policy, recording what a dataset needs.

The same loop serves demonstration collection (scripted expert) and closed-loop evaluation (a
model policy): the policy sees an `Observation` and returns one action per env.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vla_dist.data.episode import Episode
from vla_dist.rollout.episodes import draw_seed
from vla_dist.sim.appearance import lighting_of, sample_scene
from vla_dist.sim.expert import TCP_OFFSET, ScriptedExpert
from vla_dist.sim.geometry import quat_rotate
from vla_dist.sim.scene import STATE_SPACE, TabletopScene
from vla_dist.sim.tasks import (
    LIFT_HEIGHT,
    TASKS,
    check_success,
    goal_distance,
    pick_instruction,
    sample_layout,
    stack_layouts,
)
from vla_dist.spaces import TASK_NAMES

SUCCESS_HOLD_STEPS = 3  # an episode ends once its success condition has held this many control steps


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera -> uint8 [B, H, W, 3] (empty when not rendering)
    proprio: torch.Tensor  # [B, STATE_SPACE.dim]
    privileged: dict[str, torch.Tensor]  # simulator state: for scripted experts, never for models
    instructions: list[str]


_HAND_X = STATE_SPACE["names"].index("hand_x")
HAND_POS = slice(_HAND_X, _HAND_X + 3)  # hand position (m, world frame) within the proprio state
HAND_QUAT = slice(_HAND_X + 3, _HAND_X + 7)


def grasp_point(proprio: torch.Tensor) -> torch.Tensor:
    """[B, 3] the point between the finger pads (TCP), from the hand pose in the proprio state."""
    offset = torch.tensor([0.0, 0.0, TCP_OFFSET]).expand(proprio.shape[0], 3)
    return proprio[:, HAND_POS] + quat_rotate(proprio[:, HAND_QUAT], offset)


def reach_distance(obs: Observation) -> torch.Tensor:
    """[B] distance (m) from the grasp point to the task cube's centre (privileged: for measures and
    rewards, never a model's input)."""
    return torch.linalg.vector_norm(grasp_point(obs.proprio) - obs.privileged["cube_pos"], dim=1)


class Policy(Protocol):
    # seeds: each env's episode seed, so a stochastic policy (flow-matching noise) can draw per-episode
    # randomness: the same episode then gets the same actions whatever batch or actor it runs in.
    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None: ...

    def act(self, obs: Observation) -> torch.Tensor: ...  # [B, dim of the scene's action space]


def speaks(policy: Policy, scene: TabletopScene) -> str:
    """The action space a policy's actions are in: its `action_space` attribute (the expert's is
    end-effector deltas, a model's its training data's), else the scene's (recorded actions)."""
    return getattr(policy, "action_space", None) or scene.action_space


def in_scene_space(action: torch.Tensor, space: str, scene: TabletopScene) -> torch.Tensor:
    """`action` (in `space`) as the scene takes it: end-effector deltas in a joint scene become the joint
    targets of the scene's inverse kinematics (what an end-effector scene executes), or their offsets
    from the measured joints."""
    if space == scene.action_space:
        return action
    if space == "ee_delta_pose" and scene.action_space in ("joint_position", "joint_delta"):
        return scene.joint_command(action)
    raise ValueError(f"a policy acting in {space} cannot drive a scene taking {scene.action_space} actions")


class ExpertPolicy:
    """The scripted expert behind the `Policy` interface (`follow_state`: labelling another policy's
    states, vla_dist/sim/expert.py). It speaks end-effector deltas in either scene (`in_scene_space`)."""

    action_space = "ee_delta_pose"

    def __init__(self, follow_state: bool = False) -> None:
        self.follow_state = follow_state

    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None:
        self.expert = ScriptedExpert(task_ids, follow_state=self.follow_state)

    def act(self, obs: Observation) -> torch.Tensor:
        return self.expert.act(obs.privileged)


NOISE_SEED_OFFSET = 0x0DA7_0000  # keeps the noise stream apart from other uses of the episode seed


class ExecutionNoise:
    """DART-style noise injection (Laskey et al. 2017): the executed hand translation is perturbed,
    the recorded action is not. The closed-loop expert then demonstrates how to come back from where
    the noise pushed the hand, which is where a learned policy's own errors take it; plain
    demonstrations only show the expert's ideal path. Translation only (dims 0-2): rotation and
    the gripper command are executed as asked."""

    def __init__(self, stds: list[float], seeds: list[int]) -> None:
        self.stds = torch.tensor(stds, dtype=torch.float32)[:, None]
        self.generators = ([torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed) for seed in seeds]
                           if any(stds) else [])

    def apply(self, action: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            return action
        draws = torch.stack([torch.randn(3, generator=g) for g in self.generators])
        executed = action.clone()
        executed[:, :3] += self.stds * draws
        return executed


@dataclass
class EpisodeRequest:
    index: int  # position in the collection; makes the episode id unique
    task: str
    seed: int
    max_steps: int = 0  # this episode's step limit; 0: run_batch's max_steps, else the task's (replay: recorded length)
    # DART (collect.action_noise): std (m) of Gaussian noise added to the hand translation that is
    # executed; the recorded action stays the policy's. Drawn from a generator seeded by the episode
    # seed alone, so a replay with the same setting executes exactly the same noisy actions.
    action_noise: float = 0.0
    paraphrases: tuple[int, ...] = ()  # task.paraphrases: the instruction indices to draw from; (): all
    # before the id: datasets trained on together need distinct ids (readers skip a repeated one), e.g.
    # DAgger's rounds beside the demonstrations ("dagger1-pick_cube-0000000")
    id_prefix: str = ""
    # Which play of a repeated layout this is (eval.seeds=rl with more episodes than the pool has layouts):
    # draw 0 gives a stochastic policy the episode seed itself, draw k > 0 a seed of its own, so episodes of
    # one layout sample different noise instead of replaying the first one's.
    draw: int = 0

    @property
    def episode_id(self) -> str:
        return f"{self.id_prefix}{self.task}-{self.index:07d}"

    @property
    def policy_seed(self) -> int:
        """The seed a policy's noise stream gets (Policy.reset): the layout seed on draw 0."""
        return draw_seed(self.seed, self.draw)


def run_batch(
    scene: TabletopScene,
    requests: list[EpisodeRequest],
    policy: Policy,
    fps: float,
    render: bool = True,
    max_steps: int = 0,
    labeller: Policy | None = None,
) -> list[Episode]:
    """Run up to `scene.n_envs` episodes side by side; returns them in request order.

    `labeller` (DAgger): the recorded action of every step is the labeller's on the state `policy`
    reached (the scripted expert, following the state); `policy`'s own action is what executes.
    A short batch is padded with copies of its last request (their results are dropped) because a
    Genesis scene always steps all of its envs.
    """
    if not 0 < len(requests) <= scene.n_envs:
        raise ValueError(f"a batch holds 1..{scene.n_envs} episodes, got {len(requests)}")
    padded = requests + [requests[-1]] * (scene.n_envs - len(requests))
    task_ids = torch.tensor([TASK_NAMES.index(r.task) for r in padded])
    instructions = [pick_instruction(r.task, r.seed, r.paraphrases) for r in padded]
    limits = torch.tensor([r.max_steps or max_steps or TASKS[r.task].max_steps for r in padded])

    starts = [sample_scene(r.task, r.seed, scene.appearance) for r in padded]
    scene.reset(stack_layouts(starts))
    scene.set_lighting(lighting_of(scene.appearance, padded[0].seed))  # one light per render pass: per batch
    policy.reset(task_ids, instructions, [r.policy_seed for r in padded])
    if labeller is not None:
        labeller.reset(task_ids, instructions, [r.policy_seed for r in padded])

    n = scene.n_envs
    frames: list[dict[str, np.ndarray]] = []
    states: list[torch.Tensor] = []
    cube_positions: list[torch.Tensor] = []  # privileged, for training's object head (Episode.object_pos)
    actions: list[torch.Tensor] = []
    length = torch.zeros(n, dtype=torch.long)  # steps recorded per env
    held = torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    success = torch.zeros(n, dtype=torch.bool)
    closest = torch.full((n,), float("inf"))
    closest_goal = torch.full((n,), float("inf"))
    other_top = torch.zeros(n)  # highest the cube the task does not use got (picked the wrong cube?)
    noise = ExecutionNoise([r.action_noise for r in padded], [r.seed for r in padded])
    if noise.generators and speaks(policy, scene) != "ee_delta_pose":
        raise ValueError("DART noise (action_noise) perturbs end-effector translations: the policy acts in "
                         f"{speaks(policy, scene)}")
    spaces = (speaks(policy, scene), speaks(labeller, scene) if labeller is not None else None)
    while not bool(done.all()):
        privileged = scene.object_state()
        obs = Observation(scene.render() if render else {}, scene.proprio(), privileged, instructions)
        closest = torch.where(done, closest, torch.minimum(closest, reach_distance(obs)))
        action = policy.act(obs).to(torch.float32)
        frames.append(obs.images)
        states.append(obs.proprio)
        cube_positions.append(privileged["cube_pos"].to(torch.float32))
        executed = noise.apply(action)
        if spaces[0] != scene.action_space:  # (never with noise: checked above)
            action = executed = in_scene_space(action, spaces[0], scene)
        # the label: what the policy (the expert) asked for, or what the labeller says at this state,
        # in the scene's action space (what the dataset records)
        actions.append(action if labeller is None else
                       in_scene_space(labeller.act(obs).to(torch.float32), spaces[1], scene))
        scene.step(executed)
        length += (~done).long()

        after = scene.object_state()
        ok = check_success(
            task_ids, after["cube_pos"], after["base_pos"], after["target_pos"], ~after["gripper_closed"]
        )
        held = torch.where(ok, held + 1, torch.zeros_like(held))
        to_goal = goal_distance(task_ids, after["cube_pos"], after["base_pos"], after["target_pos"])
        closest_goal = torch.where(done, closest_goal, torch.minimum(closest_goal, to_goal))
        other_top = torch.where(done, other_top, torch.maximum(other_top, after["base_pos"][:, 2]))
        finished = ~done & ((held >= SUCCESS_HOLD_STEPS) | (length >= limits))
        success |= finished & (held >= SUCCESS_HOLD_STEPS)
        done |= finished

    state_arr = torch.stack(states, dim=1).numpy()  # [B, T, S]
    action_arr = torch.stack(actions, dim=1).numpy()
    cube_arr = torch.stack(cube_positions, dim=1).numpy()  # [B, T, 3]
    episodes = []
    for i, request in enumerate(requests):
        t = int(length[i])
        images = {cam: np.stack([f[cam][i] for f in frames[:t]]) for cam in (frames[0] if render else {})}
        episodes.append(
            Episode(
                episode_id=request.episode_id,
                task=request.task,
                instruction=instructions[i],
                seed=request.seed,
                success=bool(success[i]),
                fps=fps,
                frames=images,
                state=np.ascontiguousarray(state_arr[i, :t]),
                actions=np.ascontiguousarray(action_arr[i, :t]),
                object_pos=np.ascontiguousarray(cube_arr[i, :t]),
                closest_approach_m=float(closest[i]),
                closest_goal_m=float(closest_goal[i]),
                other_cube_lifted=bool(other_top[i] > LIFT_HEIGHT),
                look={"camera_offset": [round(float(v), 6) for v in starts[i]["camera_offset"]],
                      **scene.lighting.to_dict()},
            )
        )
    return episodes


def measure_throughput(scene: TabletopScene, steps: int, render: bool) -> dict[str, float]:
    """Step every env of `scene` for `steps` control steps under the expert, timing physics and
    rendering separately (for `vla-dist bench rollout`)."""
    import time

    requests = [EpisodeRequest(i, TASK_NAMES[i % len(TASK_NAMES)], 1000 + i) for i in range(scene.n_envs)]
    scene.reset(stack_layouts([sample_layout(r.task, r.seed) for r in requests]))
    policy = ExpertPolicy()
    policy.reset(torch.tensor([TASK_NAMES.index(r.task) for r in requests]), [""] * scene.n_envs,
                 [r.seed for r in requests])
    render_seconds = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        before_render = time.perf_counter()
        images = scene.render() if render else {}
        render_seconds += time.perf_counter() - before_render
        obs = Observation(images, scene.proprio(), scene.object_state(), [])
        scene.step(in_scene_space(policy.act(obs), policy.action_space, scene))
    seconds = time.perf_counter() - started
    return {
        "env_steps": float(steps * scene.n_envs),
        "seconds": seconds,
        "render_seconds": render_seconds,
        "frames": float(steps * scene.n_envs * len(scene.cameras)) if render else 0.0,
    }
