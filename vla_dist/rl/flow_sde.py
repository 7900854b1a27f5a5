"""Flow-SDE: log-probabilities for pi0's flow-matching sampler (after pi-RL / Flow-GRPO).

pi0 samples actions by integrating an ODE from noise (t=1) to actions (t=0) with Euler steps
x <- x + dt * v(x, t), dt = -1/N: deterministic, so a sampled chunk has no likelihood to take a
ratio of. Flow-SDE replaces denoising steps k (1 <= k < N) by the Euler-Maruyama step of the
reverse SDE that has the same marginals as the ODE (Liu et al. 2025, Flow-GRPO, eq. 9; pi-RL's
"Flow-SDE"), with x_t = t * noise + (1 - t) * actions and v = noise - actions (transformers' PI0):

    mean = x_t + [v + sigma_t^2 / (2 t) * (x_t + (1 - t) v)] * dt,   std = sigma_t * sqrt(-dt),
    sigma_t = noise_level * sqrt(t / (1 - t)).

Given x_t the step is Gaussian: the log-probability PPO/GRPO take ratios of is that of the
stochastic transitions, the sum over them of log N(x_{t+dt}; mean, std^2), with the x each starts from
(reached from the initial noise) treated as part of the state, as pi-RL does when it casts denoising
as an MDP.

Which steps are stochastic: K per row (`steps` [B, K]). K = 1 (the default, `rl.sde_step`, or drawn
per decision with `rl.random_sde_step`): one model forward per decision recomputes the log-probability
(the cost of an SFT step). Its blind spot: the initial noise x_1 is a draw the log-probability does not
contain, and for a trained policy most of an action's spread comes from it (measured in
docs/recipes.md): the update credits a decision with a small part of what made its outcome.
K = N - 1 (`rl.sde_every_step`, Flow-GRPO's sampler): every step but the first (t = 1, infinite
sigma) is stochastic, so most of the spread is injected where the log-probability sees it, at N - 1
forwards per decision in the update.
Why Flow-SDE and not Flow-Noise (a learned noise head): it adds no parameters, so an SFT checkpoint
starts RL unchanged and an exported policy stays a plain PI0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vla_dist.models.pi0 import PI0Policy
    from vla_dist.models.policy import PolicyInputs


def step_time(step: int | torch.Tensor, num_steps: int) -> float | torch.Tensor:
    """t at the start of Euler step `step` (0-based; or one per row) of `num_steps`, as PI0 counts:
    1 - step / N."""
    return 1.0 - step / num_steps


def sde_transition(x: torch.Tensor, velocity: torch.Tensor, t: float | torch.Tensor, dt: float,
                   noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the reverse-SDE Euler-Maruyama step from time t to t + dt (dt < 0, 0 < t < 1).
    `t` one float, or one per row of x ([B]); std is then [B, 1, ..., 1] (broadcasts against x)."""
    times = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if not bool(((times > 0) & (times < 1)).all()) or dt >= 0:
        raise ValueError(f"a stochastic step needs 0 < t < 1 and dt < 0, got t={t}, dt={dt}")
    if times.ndim:
        times = times.reshape(-1, *([1] * (x.ndim - 1)))
    sigma = noise_level * torch.sqrt(times / (1.0 - times))
    mean = x + (velocity + sigma**2 / (2.0 * times) * (x + (1.0 - times) * velocity)) * dt
    return mean, sigma * math.sqrt(-dt)


def gaussian_step_log_probs(value: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor,
                            dims: int) -> torch.Tensor:
    """[B, chunk] log N(value; mean, std^2 I) of each chunk step over its first `dims` action dims
    (the padded dims are exact zeros on both sides and carry no probability mass). `std`: a scalar or
    one per row ([B, 1, 1], as sde_transition gives it)."""
    diff = (value[..., :dims] - mean[..., :dims]).float()
    std = torch.as_tensor(std, dtype=torch.float32, device=value.device)
    log_std = std.reshape(std.shape[0], 1).log() if std.ndim else std.log()
    return -0.5 * (diff / std).pow(2).sum(-1) - dims * (log_std + 0.5 * math.log(2 * math.pi))


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor, dims: int) -> torch.Tensor:
    """[B]: gaussian_step_log_probs summed over the chunk."""
    return gaussian_step_log_probs(value, mean, std, dims).sum(-1)


@dataclass
class SDESample:
    """One stochastic chunk per batch row: the normalized, padded actions [B, chunk, max_action_dim]
    and what recomputing its log-probability needs: each row's K stochastic denoising steps (`steps`
    long [B, K], ascending) and x before and after each ([B, K, chunk, max_action_dim])."""

    actions: torch.Tensor
    steps: torch.Tensor
    x_before: torch.Tensor
    x_after: torch.Tensor
    log_prob: torch.Tensor  # [B] float32, under the sampling weights

    @classmethod
    def cat(cls, samples: list[SDESample]) -> SDESample:
        """Their rows concatenated."""
        return cls(actions=torch.cat([s.actions for s in samples]), steps=torch.cat([s.steps for s in samples]),
                   x_before=torch.cat([s.x_before for s in samples]), x_after=torch.cat([s.x_after for s in samples]),
                   log_prob=torch.cat([s.log_prob for s in samples]))

    def rows(self, count: int) -> SDESample:
        """The first `count` rows."""
        return SDESample(actions=self.actions[:count], steps=self.steps[:count], x_before=self.x_before[:count],
                         x_after=self.x_after[:count], log_prob=self.log_prob[:count])


def stochastic_steps(step: int | torch.Tensor, batch: int, num_steps: int) -> torch.Tensor:
    """long [B, K]: `step` as each row's stochastic steps. An int: that step for every row (K = 1); long
    [B]: one per row; long [B, K]: K per row, distinct. Every step must lie in 1..N-1 (t=1 has infinite sigma)."""
    steps = torch.as_tensor(step, dtype=torch.long)
    steps = steps.reshape(1, 1).expand(batch, 1) if steps.ndim == 0 else steps
    steps = steps[:, None] if steps.ndim == 1 else steps
    if steps.ndim != 2 or steps.shape[0] != batch:
        raise ValueError(f"stochastic steps must be an int, [B] or [B, K] with B={batch}, got {tuple(steps.shape)}")
    if not bool(((steps >= 1) & (steps < num_steps)).all()):
        raise ValueError(f"the stochastic step must lie in [1, {num_steps - 1}] (t=1 has infinite sigma), got {step}")
    steps = steps.sort(dim=1).values
    if steps.shape[1] > 1 and bool((steps[:, 1:] == steps[:, :-1]).any()):
        raise ValueError(f"a row's stochastic steps must be distinct, got {step}")
    return steps.clone()


def every_step(batch: int, num_steps: int) -> torch.Tensor:
    """long [B, N-1]: Flow-GRPO's sampler, every denoising step but the first stochastic."""
    return torch.arange(1, num_steps).expand(batch, num_steps - 1).clone()


def _velocity(policy: PI0Policy, prefix: dict[str, torch.Tensor], x: torch.Tensor,
              t: float | torch.Tensor) -> torch.Tensor:
    time = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
    return policy.hf_model(**prefix, noise=x.to(policy.dtype), timestep=time).logits.float()


@torch.no_grad()
def sample_chunk(policy: PI0Policy, inputs: PolicyInputs, *, step: int | torch.Tensor, noise_level: float,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 generators: list[torch.Generator] | None = None) -> SDESample:
    """pi0's Euler sampler with the denoising steps `step` made stochastic (module docstring; an int for
    all rows, long [B] one per row, or long [B, K] several per row: `stochastic_steps`). `noise` (the
    initial x, [B, chunk, A or max_action_dim]) and the SDE's noise come from `generator` when not given,
    so a seeded generator reproduces the sample. `generators` (one per row) instead: row i draws from
    generators[i] exactly what it would draw alone, so one batched call gives each row the sample a
    batch of one would (up to the rounding of batched matmuls) at the cost of about one."""
    num_steps = policy.spec.num_inference_steps
    batch = policy.check_inputs(inputs)
    if generators is not None and len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}: give one per row")
    if generators is not None and generator is not None:  # which would draw is not obvious: refuse
        raise ValueError("give generator (the batch's stream) or generators (one per row), not both")
    steps = stochastic_steps(step, batch, num_steps)
    prefix = policy.prepare_prefix(inputs)
    if noise is None:
        noise = (torch.cat([policy.make_noise(1, g) for g in generators]) if generators is not None
                 else policy.make_noise(batch, generator))
    x = policy.full_noise(noise, batch).float()
    x_before = torch.zeros(batch, steps.shape[1], *x.shape[1:], device=x.device)
    x_after = torch.zeros_like(x_before)
    log_prob = torch.zeros(batch, dtype=torch.float32, device=x.device)
    dt = -1.0 / num_steps
    for k in range(num_steps):
        t = step_time(k, num_steps)
        velocity = _velocity(policy, prefix, x, t)
        slots = steps == k  # [B, K]: which of a row's stochastic steps this is
        here = slots.any(1)
        if not bool(here.any()):
            x = x + dt * velocity
            continue
        mean, std = sde_transition(x, velocity, t, dt, noise_level)
        if generators is None:
            eps = torch.randn(x.shape, generator=generator).to(x.device)
        else:  # only the rows stochastic here draw, as each would alone
            eps = torch.zeros(x.shape)
            for row in here.nonzero()[:, 0].tolist():
                eps[row] = torch.randn(x.shape[1:], generator=generators[row])
            eps = eps.to(x.device)
        eps[..., policy.action_dim :] = 0
        stochastic = mean + std * eps
        rows, slot = slots.to(x.device).nonzero(as_tuple=True)
        x_before[rows, slot], x_after[rows, slot] = x[rows], stochastic[rows]
        log_prob[rows] += gaussian_log_prob(stochastic, mean, std, policy.action_dim)[rows]
        x = torch.where(here.to(x.device)[:, None, None], stochastic, x + dt * velocity)
    return SDESample(actions=x, steps=steps, x_before=x_before, x_after=x_after, log_prob=log_prob)


def sample_env_chunks(policy: PI0Policy, inputs: PolicyInputs, generators: list[torch.Generator],
                      noise_level: float, sde_step: int | str | None = None) -> tuple[torch.Tensor, SDESample]:
    """(raw actions [B, chunk, A], the sample) for B envs, each drawing from its own stream: the
    stochastic step is `sde_step`, "every" (every step 1..N-1), or (None) drawn per env from 1..N-1 on
    its stream first, then the sampler's noise (`sample_chunk(generators=...)`). RL's rollouts and
    `eval.noise_level` share it."""
    num_steps = policy.spec.num_inference_steps
    steps: int | torch.Tensor
    if sde_step is None:
        steps = torch.tensor([int(torch.randint(1, num_steps, (1,), generator=g)) for g in generators])
    elif sde_step == "every":
        steps = every_step(len(generators), num_steps)
    else:
        steps = torch.tensor([int(sde_step)] * len(generators))
    sample = sample_chunk(policy, inputs, step=steps, noise_level=noise_level, generators=generators)
    return policy.unnormalize_actions(sample.actions[..., : policy.action_dim]), sample


def step_log_probs(policy: PI0Policy, inputs: PolicyInputs, sample: SDESample, noise_level: float) -> torch.Tensor:
    """[B, chunk] log-probability of `sample`'s stochastic steps per chunk step (summed over a row's K
    steps), under the policy's current weights, with gradients: K forwards of the model per row, in
    one batch of B * K rows, each at its own step's t (one forward per row is the cost of a
    flow-matching loss). RL sums it over the chunk steps that ran (rl/objective.py)."""
    prefix = policy.prepare_prefix(inputs)
    num_steps = policy.spec.num_inference_steps
    batch, k = sample.steps.shape
    if k > 1:  # every row's prefix once per stochastic step: one forward for all B * K transitions
        prefix = {name: value.repeat_interleave(k, dim=0) for name, value in prefix.items()}
    x_before = sample.x_before.to(policy.device).float().flatten(0, 1)
    x_after = sample.x_after.to(policy.device).float().flatten(0, 1)
    t = step_time(sample.steps.to(device=x_before.device, dtype=torch.float32).flatten(), num_steps)
    dt = -1.0 / num_steps
    velocity = _velocity(policy, prefix, x_before, t)
    mean, std = sde_transition(x_before, velocity, t, dt, noise_level)
    return gaussian_step_log_probs(x_after, mean, std, policy.action_dim).reshape(batch, k, -1).sum(1)


def chunk_log_prob(policy: PI0Policy, inputs: PolicyInputs, sample: SDESample, noise_level: float) -> torch.Tensor:
    """[B] log-probability of the whole sampled chunk (what sample_chunk returns as log_prob)."""
    return step_log_probs(policy, inputs, sample, noise_level).sum(-1)
