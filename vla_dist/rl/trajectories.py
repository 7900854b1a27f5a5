"""One iteration's rollouts as the trainer ranks take them: `Trajectories`, E episodes x D decisions
(padded to the longest episode), raw uint8 frames (never a decoded mp4: RL must not learn from codec
noise), each decision's sampler record and sampling-time log-probability, and the outcome (rewards,
dones, success). Kept apart from shard encoding: nothing here is written to a dataset.

The sampler record a log-probability is recomputed from: pi0 (Flow-SDE) the stochastic steps' x
before and after each (`x_before`, `x_after` [E, D, K, chunk, max_action_dim], the steps `sde_steps`
[E, D, K]); action tokens the sampled bins (`bins` long [E, D, chunk, A]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_dist.models.policy import PolicyInputs
from vla_dist.rl.flow_sde import SDESample
from vla_dist.rl.rollout import RolloutBatch


@dataclass
class Trajectories:
    images: torch.Tensor  # uint8 [E, D, n_cam, H, W, 3]
    states: torch.Tensor  # float32 [E, D, S]
    instructions: list[str]  # [E]
    tasks: list[str]  # [E]
    seeds: list[int]  # [E] layout seeds
    groups: torch.Tensor  # long [E]: episodes rolled out from the same layout share a group (GRPO)
    sample_log_probs: torch.Tensor  # float32 [E, D], whole chunk, under weights `version`
    valid: torch.Tensor  # bool [E, D]
    executed: torch.Tensor  # bool [E, D, chunk]
    rewards: torch.Tensor  # float32 [E, D]: sparse success reward
    dones: torch.Tensor  # bool [E, D]
    success: torch.Tensor  # bool [E]
    lengths: torch.Tensor  # long [E]: control steps each episode ran
    reach: torch.Tensor | None  # float32 [E, D] or None
    version: int
    sde_steps: torch.Tensor | None = None  # long [E, D, K]: pi0, each decision's stochastic denoising steps
    x_before: torch.Tensor | None = None
    x_after: torch.Tensor | None = None
    bins: torch.Tensor | None = None

    @property
    def episodes(self) -> int:
        return int(self.valid.shape[0])

    def positions(self) -> torch.Tensor:
        """long [N, 2]: (episode, decision) of every decision that was taken, in order."""
        return self.valid.nonzero()

    def inputs(self, at: torch.Tensor) -> PolicyInputs:
        """The policy inputs of the decisions at `at` [n, 2] (rows of positions())."""
        e, d = at[:, 0], at[:, 1]
        return PolicyInputs(self.images[e, d], self.states[e, d], [self.instructions[int(i)] for i in e])

    def record(self, at: torch.Tensor) -> SDESample | torch.Tensor:
        """The sampler record of the decisions at `at`: an SDESample (pi0) or bins (action tokens)."""
        e, d = at[:, 0], at[:, 1]
        if self.bins is not None:
            return self.bins[e, d]
        assert self.x_before is not None and self.x_after is not None
        assert self.sde_steps is not None
        return SDESample(actions=self.x_after[e, d, -1], steps=self.sde_steps[e, d], x_before=self.x_before[e, d],
                         x_after=self.x_after[e, d], log_prob=self.sample_log_probs[e, d])

    def shaped_rewards(self, weight: float) -> torch.Tensor:
        """float32 [E, D]: the success reward plus `weight` times how much each decision brought the
        grasp point closer to the cube (potential-based shaping, Ng et al. 1999: it does not change
        which policy is optimal). Privileged state enters the reward only, never the policy."""
        if weight == 0 or self.reach is None:
            return self.rewards
        closer = torch.zeros_like(self.rewards)
        closer[:, :-1] = self.reach[:, :-1] - self.reach[:, 1:]
        closer = torch.where(self.valid & ~self.dones, closer, torch.zeros_like(closer))  # no next decision
        return self.rewards + weight * closer


def join_rollouts(batches: list[RolloutBatch], tasks: list[list[str]], seeds: list[list[int]],
                  groups: list[list[int]]) -> Trajectories:
    """Concatenate the actors' RolloutBatches (episode order = list order), padding decisions to the
    longest; `tasks`/`seeds`/`groups`: per batch, per episode."""
    length = max(len(b.records) for b in batches)

    def pad(tensor: torch.Tensor, value: float | bool = 0) -> torch.Tensor:
        missing = length - tensor.shape[1]
        if missing == 0:
            return tensor
        filler = torch.full((tensor.shape[0], missing, *tensor.shape[2:]), value, dtype=tensor.dtype)
        return torch.cat([tensor, filler], dim=1)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([pad(getattr(b, name)) for b in batches])

    pi0 = isinstance(batches[0].records[0], SDESample)
    per_decision: dict[str, torch.Tensor] = {}
    if pi0:
        for field, key in (("x_before", "x_before"), ("x_after", "x_after"), ("steps", "sde_steps")):
            per_decision[key] = torch.cat([pad(torch.stack([getattr(r, field) for r in b.records], dim=1))
                                            for b in batches])
    else:
        per_decision["bins"] = torch.cat([pad(torch.stack(list(b.records), dim=1)) for b in batches])  # type: ignore[arg-type]
    reach = cat("reach") if all(b.reach is not None for b in batches) else None
    versions = {b.version for b in batches}
    if len(versions) != 1:  # the pool sends each rollout the version it must run: a mix is a bug
        raise ValueError(f"rollouts of one iteration ran different weight versions: {sorted(versions)}")
    return Trajectories(
        images=cat("images"), states=cat("states"), instructions=[i for b in batches for i in b.instructions],
        tasks=[t for ts in tasks for t in ts], seeds=[s for ss in seeds for s in ss],
        groups=torch.tensor([g for gs in groups for g in gs], dtype=torch.long),
        sample_log_probs=cat("log_probs"), valid=cat("valid"), executed=cat("executed"), rewards=cat("rewards"),
        dones=cat("dones"), success=torch.cat([b.success for b in batches]),
        lengths=torch.cat([b.lengths for b in batches]), reach=reach, version=versions.pop(),
        **per_decision,
    )
