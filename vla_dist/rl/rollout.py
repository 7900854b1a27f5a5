"""Policy rollouts for RL: the current policy acts with exploration in a Genesis scene, and every
decision it takes is kept with what a policy-gradient update needs.

A decision is one sampled chunk executed for `horizon` control steps (the unit PPO/GRPO take ratios
of, as in pi-RL and RL4VLA). `ExplorationPolicy` sits behind the runner's `Policy` interface, so
rollouts use the same loop as collection and evaluation (`run_batch`); it records the raw uint8
frames it decided from (never a decoded mp4: RL must not learn from codec noise), the sampler's
record (pi0: the stochastic step's x before and after; action tokens: the sampled bins) and the
log-probability under the weights that sampled it, tagged with their version. `RolloutBatch` then
joins those decisions with the episodes' outcomes: reward, done and which steps of each chunk ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vla_dist.config.rl_checks import rl_exploration_steps
from vla_dist.config.schema import RunConfig
from vla_dist.data.episode import Episode
from vla_dist.models.policy import PolicyInputs, VLAPolicy
from vla_dist.rl.flow_sde import SDESample, sample_env_chunks
from vla_dist.rl.token_sampling import sample_bins
from vla_dist.rollout.policies import temporal_ensemble
from vla_dist.rollout.runner import Observation, reach_distance


def _stream_seed(seed: int, stream: int, version: int) -> int:
    return int(np.random.SeedSequence([seed, stream, version, 0x5EED]).generate_state(1)[0])


@dataclass(frozen=True)
class Exploration:
    """How the policy explores: pi0 through Flow-SDE (`sde_step`, `noise_level`; `random_sde_step`:
    each decision draws its stochastic step from 1..N-1 with its env's generator instead;
    `sde_every_step`: every step 1..N-1 stochastic, Flow-GRPO's sampler), action
    tokens by sampling at `temperature`. `horizon`: control steps between decisions; without
    `temporal_ensemble` each sampled chunk's first `horizon` actions are executed as they are. With
    `temporal_ensemble` > 0 every control step executes ACT's average (weights exp(-k i)) of what each
    chunk sampled in the last chunk_size steps proposes for it, as evaluation with
    eval.temporal_ensemble does (horizon 1: the same execution, exploration noise aside)."""

    horizon: int = 4
    noise_level: float = 0.5
    sde_step: int = 5
    temperature: float = 1.0
    random_sde_step: bool = False
    temporal_ensemble: float = 0.0
    sde_every_step: bool = False


def exploration_from(cfg: RunConfig) -> Exploration:
    """The `rl` section's exploration, its 0 defaults resolved (the whole chunk, the middle step)."""
    horizon, sde_step = rl_exploration_steps(cfg)
    return Exploration(horizon=horizon, noise_level=cfg.rl.noise_level, sde_step=sde_step,
                       temperature=cfg.rl.temperature, random_sde_step=cfg.rl.random_sde_step,
                       temporal_ensemble=cfg.rl.temporal_ensemble, sde_every_step=cfg.rl.sde_every_step)


class ExplorationPolicy:
    """A VLAPolicy sampling with exploration behind the runner's Policy interface (see module docstring)."""

    def __init__(self, model: VLAPolicy, exploration: Exploration, version: int, cameras: tuple[str, ...],
                 streams: list[int] | None = None) -> None:
        """`streams`: per request, a number that sets its exploration noise apart from other rollouts
        of the same seed (GRPO rolls one layout out several times); None: 0 for every request."""
        if not 1 <= exploration.horizon <= model.chunk_size:
            raise ValueError(f"horizon {exploration.horizon} must be in 1..{model.chunk_size}")
        self.model, self.exploration, self.version, self.cameras = model.eval(), exploration, version, cameras
        self.action_space = model.spec.action_space  # None: the scene's
        self.streams = streams

    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None:
        self.instructions = instructions
        # One stream per env, seeded by its episode seed, its stream and the weight version: a rollout
        # is reproducible, and the next version explores differently on the same seed.
        streams = list(self.streams or [0])
        streams += [streams[-1]] * (len(seeds) - len(streams))  # the runner pads a short batch
        self.generators = [torch.Generator().manual_seed(_stream_seed(int(seed), stream, self.version))
                           for seed, stream in zip(seeds, streams, strict=False)]
        self.step = 0
        self.images: list[torch.Tensor] = []  # per decision: uint8 [B, n_cam, H, W, 3]
        self.states: list[torch.Tensor] = []
        self.log_probs: list[torch.Tensor] = []
        self.records: list[torch.Tensor | SDESample] = []
        self.reach: list[torch.Tensor] = []  # per decision: grasp point to cube (m), for a shaped reward only
        self.queue = torch.zeros(0)
        self.history: list[tuple[int, torch.Tensor]] = []  # temporal ensembling: (step sampled, chunk)

    @torch.no_grad()
    def act(self, obs: Observation) -> torch.Tensor:
        horizon, ensemble = self.exploration.horizon, self.exploration.temporal_ensemble
        if self.step % horizon == 0:
            images = torch.from_numpy(np.stack([obs.images[cam] for cam in self.cameras], axis=1))
            inputs = PolicyInputs(images=images, state=obs.proprio.to(torch.float32), instructions=self.instructions)
            chunk, log_prob, record = self.sample_decision(inputs)
            self.images.append(images)
            self.states.append(inputs.state)
            self.log_probs.append(log_prob)
            self.records.append(record)
            if "cube_pos" in obs.privileged:  # the reward's, never the model's input
                self.reach.append(reach_distance(obs))
            if ensemble > 0:
                self.history.append((self.step, chunk.to(torch.float32)))
            else:
                self.queue = chunk[:, :horizon].to(torch.float32)
        if ensemble > 0:
            self.history, action = temporal_ensemble(self.history, self.step, ensemble)
        else:
            action = self.queue[:, self.step % horizon]
        self.step += 1
        return action

    def sample_decision(self, inputs: PolicyInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | SDESample]:
        """(raw actions [B, chunk, A], log_prob [B], the sampler's record), one stream per env: a row's
        sample does not depend on the envs beside it."""
        model, exploration = self.model, self.exploration
        if model.family == "pi0":  # one batched call, each row drawing from its own env's stream
            # a random step is drawn from the env's stream: reproducible like the noise
            sde_step: int | str | None = exploration.sde_step
            if exploration.sde_every_step:
                sde_step = "every"
            elif exploration.random_sde_step:
                sde_step = None
            actions, sample = sample_env_chunks(model, inputs, self.generators,  # type: ignore[arg-type]
                                                exploration.noise_level, sde_step)
            return actions, sample.log_prob, sample
        bins, log_prob = sample_bins(model, inputs, temperature=exploration.temperature,  # type: ignore[arg-type]
                                     generators=self.generators)  # one batched forward per token
        return model.bins_to_actions(bins), log_prob, bins  # type: ignore[attr-defined]


@dataclass
class RolloutBatch:
    """B envs x D decisions. `valid` [B, D]: the env was still running when decision d was taken;
    `executed` [B, D, chunk]: chunk steps whose action reached the simulator (under temporal
    ensembling every step of the chunk that ran, each as one of the averaged proposals);
    `rewards`/`dones` [B, D]: sparse success reward on the decision during which the episode
    succeeded, done on the one during which it ended; `lengths` [B]: control steps each episode ran."""

    images: torch.Tensor  # uint8 [B, D, n_cam, H, W, 3]
    states: torch.Tensor  # float32 [B, D, S]
    instructions: list[str]  # [B]
    log_probs: torch.Tensor  # float32 [B, D], under weights `version`
    records: list[torch.Tensor | SDESample]  # per decision, batched over B
    valid: torch.Tensor
    executed: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    success: torch.Tensor  # bool [B]
    lengths: torch.Tensor  # long [B]
    version: int
    reach: torch.Tensor | None = None  # float32 [B, D]: grasp point to cube (m) at each decision (shaped reward)

    def inputs(self, decision: int) -> PolicyInputs:
        return PolicyInputs(self.images[:, decision], self.states[:, decision], self.instructions)


def rollout_batch(policy: ExplorationPolicy, episodes: list[Episode], chunk_size: int) -> RolloutBatch:
    """Join the decisions `policy` recorded during run_batch with the episodes it ran (request order)."""
    horizon = policy.exploration.horizon
    count = len(policy.records)
    batch = len(episodes)
    lengths = torch.tensor([ep.num_frames for ep in episodes])
    success = torch.tensor([ep.success for ep in episodes])
    first_step = torch.arange(count) * horizon  # [D]
    valid = first_step[None, :] < lengths[:, None]
    steps = first_step[:, None] + torch.arange(chunk_size)[None, :]  # [D, chunk]
    executed = steps[None] < lengths[:, None, None]
    if policy.exploration.temporal_ensemble == 0:  # only the first `horizon` actions of a chunk run
        executed &= (torch.arange(chunk_size) < horizon)[None, None, :]
    last = (lengths - 1).clamp(min=0) // horizon  # the decision during which each episode ended
    dones = torch.zeros(batch, count, dtype=torch.bool)
    dones[torch.arange(batch), last] = True
    rewards = (dones & success[:, None]).float()
    return RolloutBatch(
        images=torch.stack(policy.images, dim=1)[:batch], states=torch.stack(policy.states, dim=1)[:batch],
        instructions=policy.instructions[:batch], log_probs=torch.stack(policy.log_probs, dim=1)[:batch],
        records=[record[:batch] if isinstance(record, torch.Tensor) else record.rows(batch)
                 for record in policy.records], valid=valid, executed=executed,
        rewards=rewards, dones=dones & valid,
        success=success, lengths=lengths, version=policy.version,
        reach=torch.stack(policy.reach, dim=1)[:batch] if len(policy.reach) == count else None,
    )

