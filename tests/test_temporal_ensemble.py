"""Temporal ensembling (`eval.temporal_ensemble`, ACT): a real tiny pi0 saved to disk and run behind
`ModelPolicy`, whose executed actions are checked against chunks predicted by hand from the same
observations and noise streams."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_models import IMAGE_SIZE, STATE_DIM, build
from vla_dist.config import ConfigError, load_config
from vla_dist.config.validate import validate
from vla_dist.models import PolicyInputs, load_policy
from vla_dist.rollout.policies import ModelPolicy, PolicySource
from vla_dist.rollout.runner import Observation

SEEDS = [11, 12]
STEPS = 10


def observations() -> list[Observation]:
    gen = torch.Generator().manual_seed(0)
    obs = []
    for _ in range(STEPS):
        images = {cam: torch.randint(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=gen).numpy()
                  for cam in ("front", "wrist")}
        obs.append(Observation(images=images, proprio=torch.randn(2, STATE_DIM, generator=gen), privileged={},
                               instructions=["pick up the red cube"] * 2))
    return obs


@pytest.fixture(scope="module")
def saved_pi0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("te") / "policy"
    build("pi0").save_pretrained(path)
    return path


def run(path: Path, k: float) -> torch.Tensor:
    policy = ModelPolicy(PolicySource(kind="model", path=str(path), temporal_ensemble=k))
    policy.reset(torch.zeros(2, dtype=torch.long), ["pick up the red cube"] * 2, SEEDS)
    return torch.stack([policy.act(o) for o in observations()])  # [T, B, A]


def hand_chunks(path: Path) -> list[torch.Tensor]:
    """The chunk predicted at every step, from each env's own seeded noise stream."""
    model = load_policy(path).eval()
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    chunks = []
    with torch.no_grad():
        for o in observations():
            images = torch.from_numpy(np.stack([o.images[cam] for cam in ("front", "wrist")], axis=1))
            noise = torch.cat([model.make_noise(1, g) for g in generators])
            chunks.append(model.predict_chunk(PolicyInputs(images, o.proprio, o.instructions), noise=noise))
    return chunks


@pytest.mark.parametrize("k", [0.01, 0.7])
def test_executed_action_is_the_weighted_average_of_overlapping_chunks(saved_pi0: Path, k: float) -> None:
    actions, chunks = run(saved_pi0, k), hand_chunks(saved_pi0)
    size = chunks[0].shape[1]
    for t in range(STEPS):
        made = [s for s in range(t + 1) if t - s < size]  # oldest first
        weights = [math.exp(-k * i) for i in range(len(made))]
        expected = sum(w * chunks[s][:, t - s] for w, s in zip(weights, made, strict=True)) / sum(weights)
        torch.testing.assert_close(actions[t], expected, rtol=1e-5, atol=1e-5)
    # Averaging is not replanning: the executed actions differ from each step's fresh first action.
    assert (actions[1:] - torch.stack([c[:, 0] for c in chunks])[1:]).abs().max() > 1e-3


def test_large_k_executes_the_oldest_chunk(saved_pi0: Path) -> None:
    actions, chunks = run(saved_pi0, 60.0), hand_chunks(saved_pi0)
    size = chunks[0].shape[1]
    for t in range(size):  # the first chunk dominates until it runs out
        torch.testing.assert_close(actions[t], chunks[0][:, t], rtol=1e-4, atol=1e-4)


def test_negative_k_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"eval\.temporal_ensemble"):
        validate(load_config(None, ["eval.temporal_ensemble=-0.1"]))


def test_eval_noise_level_executes_the_flow_sde_sample_of_each_envs_stream(saved_pi0: Path) -> None:
    """eval.noise_level: the chunk executed is Flow-SDE's sample (a stochastic step per env, then the
    sampler's draws) from each env's own seeded stream, as RL's rollouts draw them; not the ODE's."""
    from vla_dist.rl.flow_sde import sample_chunk

    policy = ModelPolicy(PolicySource(kind="model", path=str(saved_pi0), action_horizon=2, noise_level=0.5))
    policy.reset(torch.zeros(2, dtype=torch.long), ["pick up the red cube"] * 2, SEEDS)
    acted = torch.stack([policy.act(o) for o in observations()[:2]])  # one chunk's first two actions
    model = load_policy(saved_pi0).eval()
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    steps = torch.tensor([int(torch.randint(1, model.spec.num_inference_steps, (1,), generator=g)) for g in generators])
    o = observations()[0]
    inputs = PolicyInputs(torch.from_numpy(np.stack([o.images[cam] for cam in ("front", "wrist")], axis=1)),
                          o.proprio, o.instructions)
    sample = sample_chunk(model, inputs, step=steps, noise_level=0.5, generators=generators)
    expected = model.unnormalize_actions(sample.actions[..., : model.action_dim])
    torch.testing.assert_close(acted, expected[:, :2].transpose(0, 1), rtol=1e-4, atol=1e-4)
    assert (acted[0] - hand_chunks(saved_pi0)[0][:, 0]).abs().max() > 1e-3  # not the deterministic sampler
    tokens = saved_pi0.parent / "tokens"
    build("action_tokens").save_pretrained(tokens)
    with pytest.raises(ValueError, match="eval.noise_level"):
        ModelPolicy(PolicySource(kind="model", path=str(tokens), noise_level=0.5))
    with pytest.raises(ConfigError, match="eval.noise_level"):
        validate(load_config(None, ["eval.noise_level=-0.1"]))
