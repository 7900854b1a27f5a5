"""Policies a sim actor can run, described by a `PolicySource` that Ray ships to each actor.

`expert`: the scripted expert on privileged state. `model`: a VLA loaded from an HF-format
directory (`VLAPolicy.save_pretrained` output: an export, or an untrained preset the driver saved),
run with action chunking: one `predict_chunk` per `action_horizon` control steps, batched over
every env of the actor's scene (`relabel`: its episodes record the expert's labels, DAgger).
`replay`: a dataset's recorded actions played back open loop
(rollout/replay.py), looked up by episode seed.

A policy whose `needs_images` is False runs without rendering (SimActor.run_chunk): rendering is
most of a CPU step and does not touch the physics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vla_dist.rollout.runner import ExpertPolicy, Observation, Policy
from vla_dist.spaces import CAMERAS

if TYPE_CHECKING:
    from vla_dist.config.schema import RunConfig
    from vla_dist.models import PolicyInputs, VLAPolicy


@dataclass(frozen=True)
class PolicySource:
    """Which policy a sim actor runs; small and picklable so Ray ships it to every actor."""

    kind: str = "expert"  # "expert" | "model" | "replay"
    path: str | None = None  # model: directory with the saved policy
    action_horizon: int = 0  # model: actions executed per predicted chunk; 0 = the whole chunk
    temporal_ensemble: float = 0.0  # model: > 0 re-plans every step and averages overlapping chunks (ACT)
    noise_level: float = 0.0  # model (pi0): > 0 samples chunks with Flow-SDE exploration (eval.noise_level)
    cameras: tuple[str, ...] = CAMERAS
    torch_threads: int = 1  # per actor: actors already run in parallel, one per core
    compile: bool = False  # model: decode through the torch.compile'd kernels (model.compile)
    # model: the scripted expert, following the state, labels every step the model's actions reach
    # (DAgger, collect.relabel_policy): the episodes record its actions, the model's execute
    relabel: bool = False
    # replay: episode seed -> recorded actions float32 [T, A]; shipped whole to each actor (7 floats
    # per step: ~3 MB per 100k steps), so actors need no access to the shards
    recorded: dict[int, np.ndarray] | None = None


def temporal_ensemble(history: list[tuple[int, torch.Tensor]], step: int,
                      k: float) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
    """ACT's temporal ensemble at control step `step`: every chunk [B, chunk, A] made at a step
    `made` in `history` (oldest first) that still covers `step` proposes its action for it; they are
    averaged with weights exp(-k * i), i = 0 for the oldest. Returns (the chunks that still cover
    `step`, the action [B, A]). Evaluation and RL rollouts (rl.temporal_ensemble) share it, so a
    policy is rolled out exactly as it is scored."""
    history = [(made, chunk) for made, chunk in history if step - made < chunk.shape[1]]
    proposals = torch.stack([chunk[:, step - made] for made, chunk in history])  # [n, B, A], oldest first
    weights = torch.exp(-k * torch.arange(len(history), dtype=torch.float32))
    return history, (weights[:, None, None] * proposals).sum(dim=0) / weights.sum()


class ModelPolicy:
    """A `VLAPolicy` behind the runner's `Policy` interface, timing every decode."""

    def __init__(self, source: PolicySource, model: VLAPolicy | None = None) -> None:
        """`model`: run this already loaded policy (RL's sim actors, whose weights the trainer
        replaces) instead of loading `source.path`."""
        from vla_dist.models import load_policy

        torch.set_num_threads(source.torch_threads)
        self.model = (model if model is not None else load_policy(source.path)).eval()
        if source.compile and model is None:
            self.model.enable_compiled_decoding()
        self.cameras = source.cameras
        self.action_space = self.model.spec.action_space  # None (recorded before it was): the scene's
        self.horizon = source.action_horizon or self.model.chunk_size
        if not 1 <= self.horizon <= self.model.chunk_size:
            raise ValueError(f"action_horizon {self.horizon} must be in 1..{self.model.chunk_size}")
        self.ensemble = source.temporal_ensemble
        self.noise_level = source.noise_level
        if self.noise_level > 0 and not hasattr(self.model, "make_noise"):
            raise ValueError(f"eval.noise_level: Flow-SDE sampling is pi0's; this policy is {self.model.family}")
        if self.ensemble > 0:
            self.horizon = 1  # a prediction every step; the executed action averages the overlapping ones
        self.decode_seconds = 0.0  # inside predict_chunk, compilation excluded
        self.decode_calls = 0
        self.compile_seconds = 0.0  # first call per batch bucket of a compiled decoder

    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None:
        self.instructions = instructions
        # One noise stream per env, seeded by its episode: flow-matching samples (and so the whole
        # closed-loop episode) are reproducible and independent of batching and of compiled vs eager.
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.queue: torch.Tensor | None = None
        self.history: list[tuple[int, torch.Tensor]] = []  # temporal ensembling: (step made, chunk)
        self.step = 0

    @torch.no_grad()
    def act(self, obs: Observation) -> torch.Tensor:
        from vla_dist.models import PolicyInputs

        if self.step % self.horizon == 0:
            images = torch.from_numpy(np.stack([obs.images[cam] for cam in self.cameras], axis=1))
            inputs = PolicyInputs(images=images, state=obs.proprio.to(torch.float32), instructions=self.instructions)
            compiled_before = self._decoder_compile_seconds()
            started = time.perf_counter()
            if self.noise_level > 0:
                chunk = self._sde_chunk(inputs)
            else:
                chunk = self.model.predict_chunk(inputs, noise=self._noise())
            # A compile (once per actor and batch bucket) would swamp the per-chunk latency: report apart.
            compiled = self._decoder_compile_seconds() - compiled_before
            self.compile_seconds += compiled
            self.decode_seconds += time.perf_counter() - started - compiled
            self.decode_calls += 1
            if self.ensemble > 0:
                self.history.append((self.step, chunk.to(torch.float32)))
            else:
                self.queue = chunk[:, : self.horizon].to(torch.float32)
        action = self._ensembled() if self.ensemble > 0 else self.queue[:, self.step % self.horizon]
        self.step += 1
        return action


    def _ensembled(self) -> torch.Tensor:
        self.history, action = temporal_ensemble(self.history, self.step, self.ensemble)
        return action

    def _sde_chunk(self, inputs: PolicyInputs) -> torch.Tensor:
        """Raw actions [B, chunk, A] from the Flow-SDE sampler as RL's rollouts draw them (a stochastic
        step per decision and env, noise eval.noise_level), each env from its own stream."""
        from vla_dist.rl.flow_sde import sample_env_chunks

        actions, _ = sample_env_chunks(self.model, inputs, self.generators, self.noise_level)  # type: ignore[arg-type]
        return actions

    def _noise(self) -> torch.Tensor | None:
        make_noise = getattr(self.model, "make_noise", None)  # flow matching only; token decoding is greedy
        if make_noise is None:
            return None
        return torch.cat([make_noise(1, generator) for generator in self.generators])

    def _decoder_compile_seconds(self) -> float:
        return float(getattr(self.model.decoder, "compile_seconds", 0.0))


class ReplayPolicy:
    """Recorded actions, open loop: each env plays the actions of the dataset episode with its seed
    (the runner rebuilds that episode's scene from its (task, seed)). The runner stops an env at its
    request's max_steps (the recorded length); until the whole batch is done, a finished env keeps
    getting its last action, which the runner ignores."""

    needs_images = False

    def __init__(self, source: PolicySource) -> None:
        if not source.recorded:
            raise ValueError("a replay PolicySource needs recorded actions (seed -> [T, A])")
        self.recorded = {int(seed): torch.tensor(np.asarray(a, np.float32)) for seed, a in source.recorded.items()}

    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None:
        unknown = [seed for seed in seeds if int(seed) not in self.recorded]
        if unknown:
            raise ValueError(f"no recorded actions for episode seed(s) {unknown[:3]}")
        self.actions = [self.recorded[int(seed)] for seed in seeds]
        self.step = 0

    def act(self, obs: Observation) -> torch.Tensor:
        rows = [actions[min(self.step, len(actions) - 1)] for actions in self.actions]
        self.step += 1
        return torch.stack(rows)


def model_source(cfg: RunConfig, path: str, relabel: bool = False) -> PolicySource:
    """A saved policy as the sim actors run it, for `vla-dist eval` and relabelling collection alike:
    eval.action_horizon, eval.temporal_ensemble, model.compile, the task's cameras."""
    return PolicySource(kind="model", path=str(path), action_horizon=cfg.eval.action_horizon,
                        temporal_ensemble=cfg.eval.temporal_ensemble, noise_level=cfg.eval.noise_level,
                        cameras=tuple(cfg.task.cameras),
                        compile=cfg.model.compile, relabel=relabel)


def simulator_mismatch_of(path: str | Path, sim_action_space: str) -> str | None:
    """Why the saved policy at `path` (its vla_dist.json) cannot run in the simulator taking
    `sim_action_space` actions (sim.action_space), or None. Raises PretrainedError (not a policy)."""
    from vla_dist.models.files import check_pretrained_dir
    from vla_dist.spaces import simulator_mismatch

    spec = check_pretrained_dir(path)  # its vla_dist.json, the directory checked (PretrainedError if not a policy)
    return simulator_mismatch(spec["cameras"], spec["action_dim"], spec["state_dim"], spec.get("action_space"),
                              sim_action_space)


def make_labeller(source: PolicySource) -> Policy | None:
    """The policy whose actions the episodes record instead of the executed ones (None: the executed)."""
    if not source.relabel:
        return None
    if source.kind != "model":
        raise ValueError(f"relabelling needs a model policy to execute, got kind {source.kind!r}")
    return ExpertPolicy(follow_state=True)


def make_policy(source: PolicySource) -> Policy:
    if source.kind == "expert":
        return ExpertPolicy()
    if source.kind == "model":
        return ModelPolicy(source)
    if source.kind == "replay":
        return ReplayPolicy(source)
    raise ValueError(f"unknown policy kind {source.kind!r}")
