"""RL rollouts on real Genesis (CPU backend): an exploring tiny policy of each family runs
`run_batch`, and the recorded decisions line up with the episodes and give back their
log-probabilities when recomputed from the stored raw frames (what PPO's first ratio must be)."""

from __future__ import annotations

import pytest
import torch

from tests.test_models import build
from vla_dist.data.episode import Episode
from vla_dist.rl.flow_sde import SDESample, chunk_log_prob
from vla_dist.rl.rollout import Exploration, ExplorationPolicy, RolloutBatch, rollout_batch
from vla_dist.rl.token_sampling import bins_log_prob
from vla_dist.rollout.runner import EpisodeRequest, Observation, run_batch
from vla_dist.sim.scene import TabletopScene

MAX_STEPS = 10
HORIZON = 4


@pytest.fixture(scope="module")
def scene(genesis_kernels: None) -> TabletopScene:
    return TabletopScene(n_envs=3, image_size=64)


def recompute(batch: RolloutBatch, policy: object, decision: int, exploration: Exploration) -> torch.Tensor:
    record = batch.records[decision]
    inputs = batch.inputs(decision)
    with torch.no_grad():
        if isinstance(record, SDESample):
            return chunk_log_prob(policy, inputs, record, noise_level=exploration.noise_level)  # type: ignore[arg-type]
        return bins_log_prob(policy, inputs, record, temperature=exploration.temperature)  # type: ignore[arg-type]


# Heavy: a 3-env Genesis scene at 64 px, ~80 s; tests/test_rl_math.py keeps the log-prob maths in the main suite.
@pytest.mark.heavy
@pytest.mark.parametrize("family", ["pi0", "action_tokens"])
def test_rollout_decisions_replay_their_log_probs(scene: TabletopScene, family: str) -> None:
    model = build(family)
    exploration = Exploration(horizon=HORIZON, noise_level=0.5, sde_step=5, temperature=1.0)
    policy = ExplorationPolicy(model, exploration, version=3, cameras=("front", "wrist"))
    requests = [EpisodeRequest(i, "pick_cube", 500 + i, max_steps=MAX_STEPS - 3 * i) for i in range(2)]  # 10, 7 steps
    episodes = run_batch(scene, requests, policy, fps=10, render=True)
    batch = rollout_batch(policy, episodes, model.chunk_size)
    decisions = -(-MAX_STEPS // HORIZON)  # 3 chunks for the longest episode
    assert batch.images.shape[:2] == (2, decisions) and batch.images.dtype == torch.uint8
    assert batch.version == 3 and batch.log_probs.shape == (2, decisions)
    # The frames a decision was taken on are the episode's own frames at that step (raw, not re-encoded).
    for d in range(decisions):
        step = d * HORIZON
        if step < episodes[0].num_frames:
            assert torch.equal(batch.images[0, d, 0], torch.from_numpy(episodes[0].frames["front"][step]))
    # Episode 2 ran 7 steps: decisions at steps 0 and 4 are valid, it ended during decision 1, and of
    # that chunk only steps 4, 5 and 6 ran.
    assert batch.valid.tolist() == [[True, True, True], [True, True, False]]
    assert batch.dones.tolist() == [[False, False, True], [False, True, False]]
    assert batch.executed[1, 1].tolist() == [True, True, True] + [False] * (model.chunk_size - 3)
    assert not batch.rewards.any()  # an untrained policy does not succeed in 10 steps
    # Recomputed from the stored frames with the same weights: the sampling-time log-probabilities.
    for d in range(decisions):
        torch.testing.assert_close(recompute(batch, model, d, exploration), batch.log_probs[:, d],
                                   rtol=1e-4, atol=2e-3)
    # The executed actions are the sampled chunks' (exploration happens in the simulator, not only on paper).
    actions = torch.from_numpy(episodes[0].actions)
    record = batch.records[0]
    sampled = (model.unnormalize_actions(record.actions[:, :, : model.action_dim]) if isinstance(record, SDESample)
               else model.bins_to_actions(record))  # type: ignore[attr-defined]
    torch.testing.assert_close(actions[:HORIZON], sampled[0, :HORIZON])


def test_rewards_and_dones_follow_the_episodes() -> None:
    """rollout_batch's bookkeeping on hand-made outcomes: success on the decision it happened in."""
    model = build("pi0")
    policy = ExplorationPolicy(model, Exploration(horizon=2), version=0, cameras=("front", "wrist"))
    policy.reset(torch.zeros(3, dtype=torch.long), ["x"] * 3, [1, 2, 3])
    for _ in range(3):  # three decisions recorded by hand
        policy.images.append(torch.zeros(3, 2, 4, 4, 3, dtype=torch.uint8))
        policy.states.append(torch.zeros(3, 15))
        policy.log_probs.append(torch.zeros(3))
        policy.records.append(torch.zeros(3, model.chunk_size, model.action_dim, dtype=torch.long))
    episodes = [Episode("a", "pick_cube", "x", 1, True, 10, actions=torch.zeros(5, 7).numpy()),
                Episode("b", "pick_cube", "x", 2, False, 10, actions=torch.zeros(6, 7).numpy()),
                Episode("c", "pick_cube", "x", 3, True, 10, actions=torch.zeros(2, 7).numpy())]
    batch = rollout_batch(policy, episodes, model.chunk_size)
    # 5 steps: decisions at 0, 2, 4; ended (and succeeded) in decision 2. 6 steps: failed, ended in 2.
    # 2 steps: succeeded in decision 0; decisions 1 and 2 never happened.
    assert batch.rewards.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    assert batch.dones.tolist() == [[False, False, True], [False, False, True], [True, False, False]]
    assert batch.valid.tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert batch.executed[0, 2].tolist() == [True] + [False] * (model.chunk_size - 1)


def test_ensembled_rollouts_execute_the_average_of_the_sampled_chunks() -> None:
    """rl.temporal_ensemble: each control step executes ACT's weighted average of every sampled chunk
    that covers it (the held-out evaluation's execution), and a decision counts every chunk step
    that ran, not only its first `horizon` ones."""
    model = build("pi0")
    k = 0.5  # far from uniform, so the weights' order (oldest first) matters
    policy = ExplorationPolicy(model, Exploration(horizon=2, temporal_ensemble=k), version=0,
                               cameras=("front", "wrist"))
    policy.reset(torch.zeros(2, dtype=torch.long), ["pick up the cube"] * 2, [11, 12])
    size = model.spec.image_size
    generator = torch.Generator().manual_seed(0)
    executed_actions = []
    for _ in range(6):  # decisions at steps 0, 2 and 4
        images = {cam: torch.randint(0, 256, (2, size, size, 3), generator=generator, dtype=torch.uint8).numpy()
                  for cam in ("front", "wrist")}
        obs = Observation(images=images, proprio=torch.randn(2, 15, generator=generator), privileged={},
                          instructions=["pick up the cube"] * 2)
        executed_actions.append(policy.act(obs))
    chunks = [model.unnormalize_actions(record.actions[..., : model.action_dim]).float()  # type: ignore[union-attr]
              for record in policy.records]
    assert len(chunks) == 3
    weights = torch.exp(-k * torch.arange(3, dtype=torch.float32))
    torch.testing.assert_close(executed_actions[0], chunks[0][:, 0])
    torch.testing.assert_close(executed_actions[1], chunks[0][:, 1])
    torch.testing.assert_close(executed_actions[2], (weights[0] * chunks[0][:, 2] + weights[1] * chunks[1][:, 0])
                               / weights[:2].sum())
    torch.testing.assert_close(executed_actions[5], (weights[0] * chunks[0][:, 5] + weights[1] * chunks[1][:, 3]
                                                     + weights[2] * chunks[2][:, 1]) / weights.sum())
    # Episodes of 5 and 6 steps: decision 1 (step 2) fed steps 2, 3, 4 of the first one, 2..5 of the second.
    episodes = [Episode("a", "pick_cube", "x", 11, False, 10, actions=torch.zeros(5, 7).numpy()),
                Episode("b", "pick_cube", "x", 12, True, 10, actions=torch.zeros(6, 7).numpy())]
    batch = rollout_batch(policy, episodes, model.chunk_size)
    assert batch.executed[0, 1].tolist() == [True] * 3 + [False] * (model.chunk_size - 3)
    assert batch.executed[1, 1].tolist() == [True] * 4 + [False] * (model.chunk_size - 4)
    assert batch.executed[1, 0].tolist() == [True] * 6 + [False] * (model.chunk_size - 6)
    assert batch.lengths.tolist() == [5, 6]
