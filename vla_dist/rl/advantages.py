"""Advantage estimators: GAE for PPO (a value head on the policy's features), group-relative
advantages for GRPO (several rollouts of the same seed, no critic).

Time runs along the last dimension; tensors are [..., T] float32. `dones[t]` is True when the episode
ended at step t (its reward is the last one); nothing is bootstrapped across it.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [..., T]: generalized advantage estimation (Schulman et al. 2016).

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t);  A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}.
    `last_value` [...] is V of the state after the last step (ignored where that step is done);
    returns = advantages + values (the value head's regression target)."""
    if not (rewards.shape == values.shape == dones.shape):
        raise ValueError(f"rewards/values/dones shapes differ: {rewards.shape} {values.shape} {dones.shape}")
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got {gamma}, {lam}")
    rewards, values = rewards.float(), values.float()
    alive = 1.0 - dones.float()
    next_values = torch.cat([values[..., 1:], last_value.float()[..., None]], dim=-1)
    deltas = rewards + gamma * next_values * alive - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = deltas[..., t] + gamma * lam * alive[..., t] * running
        advantages[..., t] = running
    return advantages, advantages + values


def group_relative_advantages(returns: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N] GRPO advantages: each episode's return minus its group's mean, over the group's standard
    deviation (Shao et al. 2024). `groups` [N] ids the seed an episode was rolled out from; a group
    whose rollouts all scored the same carries no signal and gets zeros (not 0/eps noise)."""
    if returns.shape != groups.shape or returns.ndim != 1:
        raise ValueError(f"returns and groups must be [N], got {tuple(returns.shape)} and {tuple(groups.shape)}")
    returns = returns.float()
    advantages = torch.zeros_like(returns)
    for group in torch.unique(groups):
        members = groups == group
        if int(members.sum()) < 2:
            raise ValueError(f"group {int(group)} has one rollout: GRPO needs several per seed")
        group_returns = returns[members]
        std = group_returns.std(unbiased=False)
        if std > eps:
            advantages[members] = (group_returns - group_returns.mean()) / (std + eps)
    return advantages


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the returns' spread the critic predicted
    before the update (1: all, 0: no better than their mean, < 0: worse). 0 when the returns do not vary."""
    spread = float(returns.var(unbiased=False))
    if spread < 1e-12:
        return 0.0
    return 1.0 - float((returns - values).var(unbiased=False)) / spread


def episode_weights(episodes: torch.Tensor) -> torch.Tensor:
    """[N] per-decision loss weights under which every episode counts equally (rl.loss_weighting=episode):
    the mean decisions per episode over the decisions of this one (mean weight 1). `episodes` [N] is
    each decision's episode. Without them a failed rollout, which runs to the step limit, holds more
    decisions than a success and outweighs it in a mean over decisions; GRPO's group-relative
    advantages sum to zero per group only when each episode counts once (Shao et al. 2024 average
    tokens within a sequence first)."""
    if episodes.ndim != 1:
        raise ValueError(f"episodes must be [N], got {tuple(episodes.shape)}")
    _, inverse, counts = torch.unique(episodes, return_inverse=True, return_counts=True)
    return (episodes.numel() / counts.numel()) / counts[inverse].float()
