"""RL building blocks against independent references: GAE and GRPO advantages computed by hand,
PPO's clipped surrogate and its gradient, and pi0's Flow-SDE sampler (marginals of the SDE step on
an exactly known flow, log-probabilities recomputed under the same and under changed weights)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.test_models import build, make_batch
from vla_dist.models.pi0 import PI0Policy
from vla_dist.models.policy import PolicyInputs
from vla_dist.rl.advantages import episode_weights, explained_variance, gae, group_relative_advantages
from vla_dist.rl.flow_sde import SDESample, chunk_log_prob, sample_chunk, sde_transition
from vla_dist.rl.losses import ppo_policy_loss, reference_kl, value_loss


def test_gae_matches_a_hand_computation() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 0.1, 0.3]])
    dones = torch.tensor([[False, False, True, False, False]])  # episode 1 ends at t=2, episode 2 is cut at t=4
    last_value = torch.tensor([0.7])
    gamma, lam = 0.9, 0.8
    # By hand: deltas, then A_t = delta_t + gamma*lam*A_{t+1} within an episode.
    d4 = 0.0 + gamma * 0.7 - 0.3
    d3 = 0.5 + gamma * 0.3 - 0.1
    d2 = 1.0 - 0.6  # done: no bootstrap
    d1 = 0.0 + gamma * 0.6 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a4 = d4
    a3 = d3 + gamma * lam * a4
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, dones, last_value, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, a3, a4], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6, a3 + 0.1, a4 + 0.3], abs=1e-6)
    # lam = gamma = 1 without dones: advantages are the reward-to-go plus the bootstrap, minus V.
    advantages, _ = gae(rewards, values, torch.zeros_like(dones), last_value, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) + 0.7
    torch.testing.assert_close(advantages, to_go - values)


def test_group_relative_advantages() -> None:
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    advantages = group_relative_advantages(returns, groups)
    # group 0: mean 0.5, population std 0.5 -> +-1; group 1 all succeeded: no signal; group 2: -1, +1
    assert advantages.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, -1, 1], abs=1e-4)
    with pytest.raises(ValueError, match="group 3 has one rollout"):
        group_relative_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 3]))


def test_explained_variance() -> None:
    returns = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert explained_variance(returns.clone(), returns) == 1.0  # a critic that predicted every return
    assert explained_variance(torch.full((4,), 0.5), returns) == 0.0  # only their mean
    assert explained_variance(1.0 - returns, returns) == -3.0  # the opposite: worse than the mean
    residual_var = 0.0375 - 0.025**2  # residuals -0.3, 0.1, 0.2, -0.1 about their mean -0.025
    assert explained_variance(torch.tensor([0.3, 0.9, 0.8, 0.1]), returns) == pytest.approx(1 - residual_var / 0.25)
    assert explained_variance(torch.rand(4), torch.ones(4)) == 0.0  # returns without spread


def test_ppo_clipped_surrogate_and_its_gradient() -> None:
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.5, 0.8, 0.8, 0.2])).requires_grad_()  # ratios 1, 1.6, 1.6, 0.4
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = ppo_policy_loss(new, old, advantages, clip=0.2)
    # min(r A, clip(r) A): 1*1, min(1.6, 1.2) = 1.2, min(-1.6, -1.2) = -1.6, min(-0.4, -0.8) = -0.8
    assert float(loss) == pytest.approx(-(1.0 + 1.2 - 1.6 - 0.8) / 4, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.75)
    ratios = torch.tensor([1.0, 1.6, 1.6, 0.4])
    assert stats["approx_kl"] == pytest.approx(float(((ratios - 1) - ratios.log()).mean()), abs=1e-6)
    loss.backward()
    # Clipped samples (2nd: r A above the band, 4th: below) pass no gradient; d(-rA/4)/dlogp = -rA/4.
    assert new.grad.tolist() == pytest.approx([-0.25, 0.0, 1.6 / 4, 0.0], abs=1e-6)


def test_episode_weighting_counts_every_episode_once() -> None:
    """rl.loss_weighting=episode: a failure of 6 decisions and a success of 2 (GRPO advantages -1, +1)
    weigh the same in the loss; over decisions the failure's 6 outweigh (mean advantage -0.5)."""
    episodes = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    weights = episode_weights(episodes)
    assert weights.tolist() == pytest.approx([4 / 6] * 6 + [2.0] * 2) and float(weights.mean()) == pytest.approx(1.0)
    advantages = torch.tensor([-1.0] * 6 + [1.0] * 2)
    assert float(advantages.mean()) == pytest.approx(-0.5) and float((weights * advantages).mean()) == pytest.approx(0)
    logp = torch.zeros(8, requires_grad=True)  # ratio 1 everywhere: the loss is -mean(w A)
    loss, _ = ppo_policy_loss(logp, torch.zeros(8), advantages, clip=0.2, weights=weights)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # each decision's gradient is its weighted advantage: per episode, they sum to -/+1
    assert float(logp.grad[:6].sum()) == pytest.approx(0.5) and float(logp.grad[6:].sum()) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="weights"):
        ppo_policy_loss(logp, torch.zeros(8), advantages, clip=0.2, weights=torch.ones(3))


def test_value_loss_clipping() -> None:
    values = torch.tensor([1.0, 3.0])
    returns = torch.tensor([0.0, 0.0])
    assert float(value_loss(values, returns)) == pytest.approx(0.5 * (1 + 9) / 2)
    # clipped to old +- 0.5: sample 2 moved from 2.0 to 3.0, clipped 2.5 -> max(9, 6.25) = 9; sample 1 unchanged
    old = torch.tensor([1.0, 2.0])
    assert float(value_loss(values, returns, old, clip=0.5)) == pytest.approx(0.5 * (1 + 9) / 2)
    # a value moved towards the target beyond the band is penalized as if clipped: max(0.25, 2.25)
    assert float(value_loss(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([2.0]), clip=0.5)) \
        == pytest.approx(0.5 * 2.25)


def test_sde_step_keeps_the_flow_marginals() -> None:
    """For data that is one point a, the exact velocity at x_t = (1-t) a + t z is z - a and x_t is
    N((1-t) a, t^2). One reverse-SDE step must land on N((1-t-|dt|) a, (t-|dt|)^2) up to O(dt^2)."""
    gen = torch.Generator().manual_seed(0)
    a, t, dt, noise_level, n = 0.7, 0.6, -0.05, 0.5, 400_000
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    x = (1 - t) * a + t * z
    mean, std = sde_transition(x, z - a, t, dt, noise_level)
    x_next = mean + std * torch.randn(n, generator=gen, dtype=torch.float64)
    sigma2 = noise_level**2 * t / (1 - t)
    assert float(x_next.mean()) == pytest.approx((1 - (t + dt)) * a, abs=4e-3)
    assert float(x_next.std()) == pytest.approx(t + dt, abs=sigma2 * dt**2 / t + 4e-3)
    # Without the drift correction (the ODE step plus noise) the spread grows: the check can fail.
    naive = x + (z - a) * dt + std * torch.randn(n, generator=gen, dtype=torch.float64)
    assert float(naive.std()) > t + dt + 0.01  # sqrt((t+dt)^2 + sigma^2 |dt|) = 0.567
    with pytest.raises(ValueError, match="0 < t < 1"):
        sde_transition(x, z - a, 1.0, dt, noise_level)


@pytest.fixture(scope="module")
def pi0() -> PI0Policy:
    policy = build("pi0")
    assert isinstance(policy, PI0Policy)
    return policy


def test_flow_sde_log_prob_is_recomputed_exactly_and_tracks_the_weights(pi0: PI0Policy) -> None:
    batch = make_batch(pi0, size=3)
    sample = sample_chunk(pi0, batch, step=4, noise_level=0.5, generator=torch.Generator().manual_seed(3))
    # Reproducible from the seed, finite, and zero in the padded action dims.
    again = sample_chunk(pi0, batch, step=4, noise_level=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample.actions, again.actions)
    assert torch.isfinite(sample.log_prob).all() and not sample.actions[..., pi0.action_dim :].any()
    # The same weights give the sampling-time log-probability back (PPO's ratio starts at 1).
    recomputed = chunk_log_prob(pi0, batch, sample, noise_level=0.5)
    torch.testing.assert_close(recomputed, sample.log_prob, rtol=1e-5, atol=1e-3)
    # ... with a gradient, and a changed policy changes it.
    recomputed.sum().backward()
    assert pi0.hf_model.action_out_proj.weight.grad is not None
    assert pi0.hf_model.action_out_proj.weight.grad[: pi0.action_dim].abs().sum() > 0
    pi0.hf_model.zero_grad()
    with torch.no_grad():
        saved = pi0.hf_model.action_out_proj.bias.clone()
        pi0.hf_model.action_out_proj.bias[: pi0.action_dim] += 0.05
        moved = chunk_log_prob(pi0, batch, sample, noise_level=0.5)
        pi0.hf_model.action_out_proj.bias.copy_(saved)
    assert (moved - sample.log_prob).abs().min() > 1e-3


def test_flow_sde_with_vanishing_noise_is_the_ode_sampler(pi0: PI0Policy) -> None:
    """noise_level -> 0 turns the stochastic step back into an Euler step: pi0's own sample_actions."""
    batch = make_batch(pi0, size=2)
    noise = torch.randn(2, pi0.chunk_size, pi0.action_dim, generator=torch.Generator().manual_seed(5))
    sample = sample_chunk(pi0, batch, step=3, noise_level=1e-6, noise=noise)
    with torch.no_grad():
        ode = pi0.hf_model.sample_actions(**pi0.prepare_prefix(batch), noise=pi0.full_noise(noise, 2),
                                          num_steps=pi0.spec.num_inference_steps)
    torch.testing.assert_close(sample.actions, ode.float(), rtol=1e-4, atol=1e-4)
    # A real noise level moves it: the sampler explores.
    noisy = sample_chunk(pi0, batch, step=3, noise_level=0.5, noise=noise,
                         generator=torch.Generator().manual_seed(0))
    assert (noisy.actions - ode).abs().max() > 1e-3
    with pytest.raises(ValueError, match="stochastic step"):
        sample_chunk(pi0, batch, step=0, noise_level=0.5)


def test_flow_sde_with_a_stochastic_step_per_row(pi0: PI0Policy) -> None:
    """rl.random_sde_step: rows of one batch make different denoising steps stochastic. Each row is
    the sample it would be alone with that step, and its log-probability is recomputed at that step."""
    from vla_dist.rl.rollout import Exploration, ExplorationPolicy

    batch = make_batch(pi0, size=3)
    noise = torch.randn(3, pi0.chunk_size, pi0.action_dim, generator=torch.Generator().manual_seed(7))
    steps = torch.tensor([2, 7, 4])
    mixed = sample_chunk(pi0, batch, step=steps, noise_level=1e-6, noise=noise)
    for row, step in enumerate(steps.tolist()):  # vanishing noise: every row is the ODE sample
        alone = sample_chunk(pi0, batch, step=step, noise_level=1e-6, noise=noise)
        torch.testing.assert_close(mixed.actions[row], alone.actions[row], rtol=1e-4, atol=1e-4)
        # x before the stochastic step is the ODE's x at that row's step, not another row's
        torch.testing.assert_close(mixed.x_before[row], alone.x_before[row], rtol=1e-5, atol=1e-5)
    assert (mixed.x_before[0] - mixed.x_before[1]).abs().max() > 1e-3
    sample = sample_chunk(pi0, batch, step=steps, noise_level=0.5, generator=torch.Generator().manual_seed(3))
    assert sample.steps.tolist() == [[2], [7], [4]]
    torch.testing.assert_close(chunk_log_prob(pi0, batch, sample, noise_level=0.5), sample.log_prob,
                               rtol=1e-5, atol=1e-3)
    # Recomputed at another step, the same x before/after is another transition: a wrong step shows.
    shifted = dataclasses.replace(sample, steps=torch.tensor([[3], [6], [5]]))
    assert (chunk_log_prob(pi0, batch, shifted, noise_level=0.5) - sample.log_prob).abs().min() > 1e-2
    with pytest.raises(ValueError, match="stochastic step"):
        sample_chunk(pi0, batch, step=torch.tensor([1, 10, 4]), noise_level=0.5)
    # The rollout policy draws each decision's step from its env's stream: 1..N-1, reproducible.
    explore = Exploration(horizon=4, noise_level=0.5, sde_step=5, random_sde_step=True)
    drawn = []
    for _ in range(2):
        policy = ExplorationPolicy(pi0, explore, version=1, cameras=("front", "wrist"))
        policy.reset(torch.zeros(3, dtype=torch.long), batch.instructions, [11, 12, 13])
        _, log_prob, record = policy.sample_decision(batch)
        assert isinstance(record, SDESample) and torch.isfinite(log_prob).all()
        drawn.append(record.steps[:, 0].tolist())
    num_steps = pi0.spec.num_inference_steps
    assert drawn[0] == drawn[1] and all(1 <= s < num_steps for s in drawn[0]), drawn
    assert len(set(drawn[0])) > 1, drawn  # per env, not one draw for the batch
    # One batched call gives each env the sample (step, noise, SDE noise) it would draw alone.
    policy = ExplorationPolicy(pi0, explore, version=1, cameras=("front", "wrist"))
    policy.reset(torch.zeros(3, dtype=torch.long), batch.instructions, [11, 12, 13])
    actions, log_prob, record = policy.sample_decision(batch)
    assert isinstance(record, SDESample)
    for row, seed in enumerate([11, 12, 13]):
        alone = ExplorationPolicy(pi0, explore, version=1, cameras=("front", "wrist"))
        alone.reset(torch.zeros(1, dtype=torch.long), batch.instructions[row : row + 1], [seed])
        one = PolicyInputs(batch.images[row : row + 1], batch.state[row : row + 1], batch.instructions[row : row + 1])
        actions_alone, log_prob_alone, record_alone = alone.sample_decision(one)
        assert record_alone.steps.tolist() == [[int(record.steps[row, 0])]]  # type: ignore[union-attr]
        torch.testing.assert_close(actions_alone[0], actions[row], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(log_prob_alone[0], log_prob[row], rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="not both"):  # two streams for one draw: refused, not guessed
        sample_chunk(pi0, batch, step=1, noise_level=0.5, generator=torch.Generator(),
                     generators=[torch.Generator() for _ in range(3)])


def test_flow_sde_at_every_step_credits_the_exploration_the_one_step_sampler_leaves_out(pi0: PI0Policy) -> None:
    """rl.sde_every_step (Flow-GRPO's sampler): steps 1..N-1 all stochastic, their log-probabilities
    summed and recomputed exactly from the stored x before/after each; a wrong x at any one step shows.
    With the initial noise held fixed, the one-step sampler's actions spread little and the every-step
    sampler's far more: what the every-step log-probability sees and the one-step one cannot."""
    from vla_dist.rl.flow_sde import every_step, sample_env_chunks, step_log_probs

    batch = make_batch(pi0, size=2)
    num_steps = pi0.spec.num_inference_steps
    steps = every_step(2, num_steps)
    assert steps.tolist() == [list(range(1, num_steps))] * 2
    sample = sample_chunk(pi0, batch, step=steps, noise_level=0.5, generator=torch.Generator().manual_seed(4))
    assert sample.x_before.shape == (2, num_steps - 1, pi0.chunk_size, pi0.max_action_dim)
    # chained: each stochastic step starts where the one before ended
    torch.testing.assert_close(sample.x_before[:, 1:], sample.x_after[:, :-1])
    torch.testing.assert_close(sample.x_after[:, -1], sample.actions.cpu())
    recomputed = chunk_log_prob(pi0, batch, sample, noise_level=0.5)
    torch.testing.assert_close(recomputed, sample.log_prob, rtol=1e-5, atol=1e-3)
    # the sum over the steps: each step's own log-probability, one step at a time
    one_at_a_time = sum(step_log_probs(pi0, batch, dataclasses.replace(
        sample, steps=sample.steps[:, j : j + 1], x_before=sample.x_before[:, j : j + 1],
        x_after=sample.x_after[:, j : j + 1]), noise_level=0.5).sum(-1) for j in range(num_steps - 1))
    torch.testing.assert_close(one_at_a_time, recomputed, rtol=1e-4, atol=1e-3)
    tampered = sample.x_after.clone()
    tampered[:, 3] += 0.05
    moved = chunk_log_prob(pi0, batch, dataclasses.replace(sample, x_after=tampered), noise_level=0.5)
    assert (moved - sample.log_prob).abs().min() > 1e-2
    with pytest.raises(ValueError, match="distinct"):
        sample_chunk(pi0, batch, step=torch.tensor([[2, 2], [3, 4]]), noise_level=0.5)
    # Same initial noise, 16 draws of the stochastic steps: the spread each sampler's log-probability sees.
    noise = torch.randn(1, pi0.chunk_size, pi0.action_dim, generator=torch.Generator().manual_seed(6))
    noise = noise.expand(16, -1, -1)
    many = make_batch(pi0, size=16)
    one = sample_chunk(pi0, many, step=num_steps // 2, noise_level=0.5, noise=noise,
                       generator=torch.Generator().manual_seed(1)).actions[..., : pi0.action_dim]
    every = sample_chunk(pi0, many, step=every_step(16, num_steps), noise_level=0.5, noise=noise,
                         generator=torch.Generator().manual_seed(1)).actions[..., : pi0.action_dim]
    assert float(every.var(0).mean()) > 3 * float(one.var(0).mean()) > 0
    # The rollout policy's "every" mode draws from each env's stream, reproducibly.
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    actions, drawn = sample_env_chunks(pi0, batch, generators, 0.5, "every")
    again, _ = sample_env_chunks(pi0, batch, [torch.Generator().manual_seed(s) for s in (1, 2)], 0.5, "every")
    torch.testing.assert_close(actions, again)
    assert drawn.steps.shape == (2, num_steps - 1)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_flow_sde_policy_gradient_moves_the_actions_where_the_reward_points(direction: float) -> None:
    """A bandit that can fail: one observation, 16 chunks per iteration, reward -(chunk mean of action
    dim 0 - target)^2, group-relative advantages and the PPO surrogate on the every-step Flow-SDE
    log-probability. The ODE sampler's action (the deployed policy) must move toward the target, up or
    down as the reward says: a sign error, a log-probability that ignores the weights or credit given to
    the wrong samples would leave it or send it the other way."""
    from vla_dist.rl.advantages import group_relative_advantages
    from vla_dist.rl.flow_sde import every_step

    torch.manual_seed(0)
    policy = build("pi0")
    num_steps, group = policy.spec.num_inference_steps, 16
    one = make_batch(policy, size=1)
    inputs = PolicyInputs(one.images.expand(group, -1, -1, -1, -1), one.state.expand(group, -1),
                          one.instructions * group)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    draws = torch.Generator().manual_seed(0)

    def deployed() -> float:  # the ODE sampler's chunk mean of dim 0, the same initial noise each time
        sample = sample_chunk(policy, inputs, step=1, noise_level=1e-6, generator=torch.Generator().manual_seed(9))
        return float(sample.actions[..., 0].mean())

    start = deployed()
    target = start + 0.3 * direction
    for _ in range(8):
        sample = sample_chunk(policy, inputs, step=every_step(group, num_steps), noise_level=0.5, generator=draws)
        reward = -(sample.actions[..., 0].mean(-1) - target) ** 2
        advantages = group_relative_advantages(reward, torch.zeros(group, dtype=torch.long))
        loss, _ = ppo_policy_loss(chunk_log_prob(policy, inputs, sample, 0.5), sample.log_prob, advantages, clip=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    progress = (deployed() - start) / (target - start)
    assert progress > 0.3, progress


def test_reference_kl_and_its_gradient() -> None:
    logp = torch.tensor([0.0, -1.0, -3.0]).requires_grad_()
    ref = torch.tensor([0.0, -2.0, -1.0])
    kl = reference_kl(logp, ref)  # 0.5 * (0, 1, 4) averaged
    assert kl.item() == pytest.approx(5 / 6)
    kl.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 1 / 3, -2 / 3])  # (log pi - log ref) / n: toward ref
    weighted = reference_kl(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([2.0, 0.0]))
    assert float(weighted) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes"):
        reference_kl(logp, torch.zeros(2))


@pytest.mark.parametrize("coef", [1.0, 0.0])
def test_reference_kl_pulls_a_policy_back_where_the_advantages_say_nothing(coef: float) -> None:
    """What rl.kl_coef is for: a GRPO group every rollout of which succeeded has advantage 0, so the
    policy loss leaves its states to whatever the other groups' updates do. With the reference penalty
    on the every-step Flow-SDE log-probabilities, steps on such samples bring a drifted policy's sampling
    back toward the start policy's (KL on fresh samples down >3x, the deployed ODE chunk closer); without
    it they move nothing."""
    import copy

    from vla_dist.rl.flow_sde import every_step

    torch.manual_seed(0)
    reference = build("pi0").eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # the drift: what updates for other layouts did to these states
        for p in policy.parameters():
            p.add_(0.005 * torch.randn_like(p))
    num_steps, group = policy.spec.num_inference_steps, 16
    one = make_batch(policy, size=1)
    inputs = PolicyInputs(one.images.expand(group, -1, -1, -1, -1), one.state.expand(group, -1),
                          one.instructions * group)
    steps = every_step(group, num_steps)

    @torch.no_grad()
    def distance() -> tuple[float, float]:  # (KL on the same fresh draws, deployed chunk gap)
        sample = sample_chunk(policy, inputs, step=steps, noise_level=0.5, generator=torch.Generator().manual_seed(7))
        kl = reference_kl(chunk_log_prob(policy, inputs, sample, 0.5), chunk_log_prob(reference, inputs, sample, 0.5))
        ode = [sample_chunk(m, inputs, step=1, noise_level=1e-6, generator=torch.Generator().manual_seed(9)).actions
               for m in (policy, reference)]
        return float(kl), float((ode[0] - ode[1]).norm())

    kl_before, gap_before = distance()
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-5)
    draws = torch.Generator().manual_seed(0)
    for _ in range(12):
        with torch.no_grad():
            sample = sample_chunk(policy, inputs, step=steps, noise_level=0.5, generator=draws)
            anchored = chunk_log_prob(reference, inputs, sample, 0.5)
        logp = chunk_log_prob(policy, inputs, sample, 0.5)
        loss, _ = ppo_policy_loss(logp, sample.log_prob, torch.zeros(group), clip=0.2)  # all solved: A = 0
        loss = loss + coef * reference_kl(logp, anchored)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kl_after, gap_after = distance()
    if coef:
        assert kl_after < kl_before / 3 and gap_after < 0.95 * gap_before, (kl_before, kl_after, gap_before, gap_after)
    else:
        assert (kl_after, gap_after) == pytest.approx((kl_before, gap_before), rel=1e-4)


def test_gaussian_log_prob_matches_torch_distributions(pi0: PI0Policy) -> None:
    from vla_dist.rl.flow_sde import gaussian_log_prob

    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 6, generator=gen)
    value = mean + 0.3 * torch.randn(2, 4, 6, generator=gen)
    expected = torch.distributions.Normal(mean[..., :5], 0.3).log_prob(value[..., :5]).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(value, mean, 0.3, dims=5), expected)
    assert math.isfinite(float(expected.sum()))


def test_token_sampling_log_prob_is_recomputed_and_follows_the_temperature() -> None:
    from vla_dist.models.action_tokens import ActionTokenPolicy
    from vla_dist.rl.token_sampling import bins_log_prob, sample_bins

    policy = build("action_tokens")
    assert isinstance(policy, ActionTokenPolicy)
    batch = make_batch(policy, size=3)
    bins, log_prob = sample_bins(policy, batch, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert bins.shape == (3, policy.chunk_size, policy.action_dim) and bins.min() >= 0 and bins.max() < 256
    # Recomputed teacher-forced (no KV cache, one forward) it is the sampling-time log-probability ...
    torch.testing.assert_close(bins_log_prob(policy, batch, bins, temperature=1.0), log_prob, rtol=1e-4, atol=1e-3)
    # A higher temperature spreads the tokens: sampled chunks differ more from the greedy one.
    greedy = policy.predict_bins(batch)
    hot, _ = sample_bins(policy, batch, temperature=5.0, generator=torch.Generator().manual_seed(0))
    cold, _ = sample_bins(policy, batch, temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert (cold != greedy).float().mean() < (hot != greedy).float().mean()
    # Steps never executed carry no probability.
    half = torch.ones(3, policy.chunk_size, dtype=torch.bool)
    half[:, policy.chunk_size // 2 :] = False
    assert (bins_log_prob(policy, batch, bins, temperature=1.0, valid_steps=half) > log_prob).all()


def test_token_sampling_with_a_stream_per_row_draws_what_each_row_draws_alone() -> None:
    """RL's envs sample their action tokens in one batched forward per token, each from its own
    stream: row i's chunk is the one it samples alone from generators[i], whatever its neighbours."""
    from vla_dist.models.action_tokens import ActionTokenPolicy
    from vla_dist.models.policy import PolicyInputs
    from vla_dist.rl.token_sampling import sample_bins

    policy = build("action_tokens")
    assert isinstance(policy, ActionTokenPolicy)
    batch = make_batch(policy, size=3)
    streams = [torch.Generator().manual_seed(seed) for seed in (11, 12, 13)]
    bins, log_prob = sample_bins(policy, batch, temperature=1.0, generators=streams)
    for row, seed in enumerate((11, 12, 13)):
        alone = PolicyInputs(batch.images[row : row + 1], batch.state[row : row + 1], batch.instructions[row : row + 1])
        row_bins, row_log_prob = sample_bins(policy, alone, temperature=1.0,
                                             generator=torch.Generator().manual_seed(seed))
        assert torch.equal(bins[row : row + 1], row_bins)
        torch.testing.assert_close(log_prob[row : row + 1], row_log_prob, rtol=1e-4, atol=1e-4)
    # different streams draw different chunks (one stream for all would not show the rows apart)
    assert not torch.equal(bins[0], bins[1])
    with pytest.raises(ValueError, match="one per row"):
        sample_bins(policy, batch, temperature=1.0, generators=streams[:2])
    with pytest.raises(ValueError, match="not both"):
        sample_bins(policy, batch, temperature=1.0, generator=torch.Generator(), generators=streams)


@pytest.mark.parametrize("family", ["pi0", "action_tokens"])
def test_value_head_on_policy_features_learns_returns(family: str) -> None:
    """Features depend on what the policy sees (images, instruction), and a value head on them fits
    per-observation returns, with gradients reaching the backbone it shares with the policy."""
    from vla_dist.rl.value import ValueHead, feature_size, policy_features

    policy = build(family)
    batch = make_batch(policy, size=4)
    features = policy_features(policy, batch)
    assert features.shape == (4, feature_size(policy)) and torch.isfinite(features).all()
    other = make_batch(policy, size=4, seed=2)
    assert (policy_features(policy, other) - features).abs().max() > 1e-4
    head = ValueHead(feature_size(policy))
    assert float(head(features).abs().max()) == 0.0  # zero-initialized output
    returns = torch.tensor([1.0, 0.0, 0.5, -0.5])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss = value_loss(head(features.detach()), returns)
        loss.backward()
        optimizer.step()
    assert float(loss) < 1e-3
    value_loss(head(policy_features(policy, batch)), returns).backward()
    grads = [p.grad for p in policy.hf_model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_value_head_on_state_predicts_what_the_prompt_features_cannot() -> None:
    """rl.value_inputs: pi0's prompt features do not see the state (it enters the action expert), so
    two decisions with the same images and instruction but fingers closed on a cube or on nothing get
    the same features: a head on them cannot fit returns 1 and 0, one reading the state (every dim, also
    those the policy does not read, standardized and clipped) fits them."""
    from vla_dist.rl.value import STATE_CLIP, ValueHead, feature_size, value_input_size, value_inputs

    policy = build("pi0", state_inputs=["s0"])  # the policy reads one joint, not the finger opening (dim 7)
    one = make_batch(policy, size=1)
    holds, misses = one.state.clone(), one.state.clone()
    holds[0, 7], misses[0, 7] = policy.state_mean[7] + policy.state_std[7], policy.state_mean[7] - policy.state_std[7]
    batch = PolicyInputs(one.images.repeat(2, 1, 1, 1, 1), torch.cat([holds, misses]), one.instructions * 2)
    returns = torch.tensor([1.0, 0.0])
    width = {"features": feature_size(policy), "state": policy.spec.state_dim}
    losses = {}
    for names in (["features"], ["state"], ["features", "state"]):
        inputs = value_inputs(policy, batch, names).detach()
        assert inputs.shape == (2, value_input_size(policy, names)) == (2, sum(width[n] for n in names))
        head = ValueHead(inputs.shape[1])
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(200):
            optimizer.zero_grad()
            loss = value_loss(head(inputs), returns)
            loss.backward()
            optimizer.step()
        losses[tuple(names)] = float(loss)
    assert losses[("features",)] > 0.1  # 0.5 x the returns' variance 0.25: nothing to tell them apart
    assert losses[("state",)] < 1e-3 and losses[("features", "state")] < 1e-3
    state = value_inputs(policy, batch, ["state"])
    torch.testing.assert_close(state[:, 7], torch.tensor([1.0, -1.0]))  # standardized, though the policy drops it
    far = PolicyInputs(batch.images, batch.state + 1e6, batch.instructions)
    assert float(value_inputs(policy, far, ["state"]).abs().max()) == STATE_CLIP


def test_learning_rate_zero_moves_nothing_whatever_the_momentum() -> None:
    """rl.value_epochs fits the value head with the policy's optimizer group at learning rate 0: after a
    policy step (Adam's momentum non-zero), zero-gradient steps move the policy outside the block
    (what the fit must avoid) and not inside it; the rate comes back afterwards, also on error."""
    from vla_dist.rl.worker import learning_rate_zero

    policy, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [policy]}, {"params": [head], "lr": 1e-2}], lr=1e-3, weight_decay=0.1)
    (policy.sum() + head.sum()).backward()
    optimizer.step()

    def value_step() -> None:
        optimizer.zero_grad(set_to_none=False)  # DeepSpeed's flat buffers: zeros, not None
        (head**2).sum().backward()
        optimizer.step()

    before, head_before = policy.detach().clone(), head.detach().clone()
    with learning_rate_zero(optimizer.param_groups[0]):
        value_step()
        assert optimizer.param_groups[0]["lr"] == 0.0
    assert torch.equal(policy.detach(), before) and not torch.equal(head.detach(), head_before)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    value_step()  # the momentum of the policy's step moves it when its rate is not held at 0
    assert not torch.equal(policy.detach(), before)
    with pytest.raises(RuntimeError), learning_rate_zero(optimizer.param_groups[0]):
        raise RuntimeError("a failed step")
    assert optimizer.param_groups[0]["lr"] == 1e-3
