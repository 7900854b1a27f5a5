"""`SimActor`: a Ray actor owning one Genesis scene with `envs_per_actor` parallel envs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vla_dist.config.schema import LoraSection, SimSection, TaskSection
from vla_dist.rollout.policies import PolicySource, make_labeller, make_policy
from vla_dist.rollout.runner import EpisodeRequest, measure_throughput, run_batch

if TYPE_CHECKING:
    from vla_dist.rl.rollout import Exploration, RolloutBatch


@dataclass
class EpisodeOutcome:
    """One finished episode as the driver needs it: summary, arrays for statistics, encoded sample."""

    index: int
    episode_id: str
    task: str
    seed: int
    success: bool
    num_frames: int
    state: np.ndarray
    actions: np.ndarray
    sample: dict[str, object]  # WebDataset sample from `encode_episode`
    closest_approach_m: float = float("nan")  # grasp point to the task cube's centre, closest over the episode
    closest_goal_m: float = float("nan")  # task's cube to its success region, closest over the episode
    other_cube_lifted: bool = False  # the cube the instruction did not name went above lift height


@dataclass
class ChunkResult:
    outcomes: list[EpisodeOutcome]
    env_steps: int  # control steps stepped by the scene, padding envs included
    seconds: float
    actor: dict[str, object] = field(default_factory=dict)
    decode_seconds: float = 0.0  # model policies: time inside predict_chunk
    decode_calls: int = 0
    compile_seconds: float = 0.0  # model policies with model.compile: compiling the decoder

@dataclass
class RolloutResult:
    """One chunk of RL rollouts: the decisions (vla_dist/rl/rollout.py) and per-episode outcomes."""

    batch: RolloutBatch
    tasks: list[str]
    seeds: list[int]
    env_steps: int  # control steps the scene stepped, padding envs included (bench rl's rate)


class SimActor:
    """Wrapped by `ray.remote` in the pool; plain class so it can also run in-process (benchmarks)."""

    def __init__(
        self, task: TaskSection, sim: SimSection, n_envs: int, image_codec: str, policy: PolicySource | None = None,
        camera_jitter: float = 0.0, light_jitter: float = 0.0,
    ) -> None:
        from vla_dist.sim.appearance import appearance_of
        from vla_dist.sim.scene import TabletopScene

        started = time.perf_counter()
        self.task, self.codec = task, image_codec
        self.policy_source = policy or PolicySource()
        self.policy = make_policy(self.policy_source)
        self.labeller = make_labeller(self.policy_source)  # DAgger: the expert labels the policy's states
        self.scene = TabletopScene(
            n_envs=n_envs,
            image_size=task.image_size,
            cameras=tuple(task.cameras),
            dt=sim.dt,
            substeps=sim.substeps,
            control_hz=task.control_hz,
            backend=sim.backend,
            # collection's camera and light randomization ride on sim.*
            appearance=appearance_of(sim, camera_jitter, light_jitter),
            action_space=sim.action_space,
        )
        self.build_seconds = time.perf_counter() - started
        self.rl_model: Any = None  # RL: the policy whose weights set_weights replaces
        self.version = -1  # RL: the weight version it holds (-1: none sent yet)

    def info(self) -> dict[str, object]:
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id() if context else None,
            "build_seconds": round(self.build_seconds, 2),
        }

    def reload_policy(self) -> None:
        """Load the policy again from its source: training-time evals (train/evals.py) rewrite the
        same directory with each eval's weights, so the scene is built once per run, not per eval
        (and an actor Ray restarts also loads the current weights)."""
        self.policy = make_policy(self.policy_source)

    def run_chunk(self, requests: list[EpisodeRequest]) -> ChunkResult:
        from vla_dist.data.codec import encode_episode

        started = time.perf_counter()
        counters = ("decode_seconds", "decode_calls", "compile_seconds")
        decode_before = [getattr(self.policy, name, 0) for name in counters]
        render = getattr(self.policy, "needs_images", True)  # replay: physics only (rendering is most of a step)
        episodes = run_batch(
            self.scene, requests, self.policy, fps=float(self.task.control_hz), render=render,
            max_steps=self.task.max_steps, labeller=self.labeller,
        )
        steps = max(ep.num_frames for ep in episodes) * self.scene.n_envs
        outcomes = [
            EpisodeOutcome(
                index=req.index,
                episode_id=ep.episode_id,
                task=ep.task,
                seed=ep.seed,
                success=ep.success,
                num_frames=ep.num_frames,
                state=ep.state,
                actions=ep.actions,
                sample=encode_episode(ep, self.codec) if render else {},  # no frames: nothing to encode
                closest_approach_m=ep.closest_approach_m,
                closest_goal_m=ep.closest_goal_m,
                other_cube_lifted=ep.other_cube_lifted,
            )
            for req, ep in zip(requests, episodes, strict=True)
        ]
        return ChunkResult(
            outcomes,
            steps,
            time.perf_counter() - started,
            {"pid": os.getpid()},
            decode_seconds=getattr(self.policy, "decode_seconds", 0.0) - decode_before[0],
            decode_calls=getattr(self.policy, "decode_calls", 0) - decode_before[1],
            compile_seconds=getattr(self.policy, "compile_seconds", 0.0) - decode_before[2],
        )

    # ------------------------------------------------------------------ RL (vla_dist/rl/loop.py)

    def set_weights(self, version: int, weights: dict[str, Any], lora: LoraSection | None = None) -> int:
        """Load the trainer's trainable weights (`weights`: name -> tensor, as the ranks' policy
        names them; LoRA: the adapter's) as weight version `version`; evals (run_chunk) and
        rollouts then run them. The first call wraps the loaded policy in LoRA like the ranks'."""
        import torch

        from vla_dist.rollout.policies import ModelPolicy

        if self.rl_model is None:
            model = self.policy.model if isinstance(self.policy, ModelPolicy) else None
            if model is None:
                raise ValueError("set_weights needs a model policy (PolicySource kind 'model')")
            if lora is not None:
                from vla_dist.train.lora import apply_lora

                apply_lora(model, lora)
            self.rl_model = model.eval()
        with torch.no_grad():
            loaded = self.rl_model.load_state_dict(weights, strict=False)
        if loaded.unexpected_keys:
            raise ValueError(f"weights this policy does not have: {loaded.unexpected_keys[:3]}")
        self.policy = ModelPolicy(self.policy_source, model=self.rl_model)
        self.version = version
        return version

    def run_rollouts(self, requests: list[EpisodeRequest], exploration: Exploration, version: int) -> RolloutResult:
        """Episodes of the current weights with exploration (vla_dist/rl/rollout.py), refusing to run
        any weights but `version`: a rollout never mixes or mistakes versions."""
        from vla_dist.rl.rollout import ExplorationPolicy, rollout_batch

        if self.version != version or self.rl_model is None:
            raise RuntimeError(f"rollout of weight version {version} asked of an actor holding version {self.version}")
        policy = ExplorationPolicy(self.rl_model, exploration, version, tuple(self.policy_source.cameras),
                                   streams=[r.index for r in requests])
        episodes = run_batch(self.scene, requests, policy, fps=float(self.task.control_hz), render=True,
                             max_steps=self.task.max_steps)
        batch = rollout_batch(policy, episodes, self.rl_model.chunk_size)
        return RolloutResult(batch=batch, tasks=[ep.task for ep in episodes], seeds=[ep.seed for ep in episodes],
                             env_steps=max(ep.num_frames for ep in episodes) * self.scene.n_envs)

    def measure(self, steps: int, render: bool) -> dict[str, float]:
        return measure_throughput(self.scene, steps, render)
