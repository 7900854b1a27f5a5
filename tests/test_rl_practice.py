"""rl.layouts: RL practising a fixed pool of layouts, and eval.seeds=rl scoring a policy on that pool.
The check before asking RL to generalize is whether it learns what it practises; these tests pin the
mechanism: which layouts the rollouts get, and that the evaluation plays exactly those."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.errors import ConfigError
from vla_dist.rl.loop import rollout_requests
from vla_dist.rollout.evaluate import eval_requests


def _cfg(tmp_path: Path, *overrides: str):
    return validate(load_config(None, [f"run.dir={tmp_path}", "run.seed=3", *overrides]))


def test_rollouts_cycle_the_pool_and_each_layout_keeps_its_task(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "task.name=all", "rl.layouts=6", "rl.episodes_per_iteration=4")
    drawn = [(r.task, r.seed) for iteration in range(6) for r in rollout_requests(cfg, iteration)[0]]
    pool = Counter(drawn)
    assert len(pool) == 6 and set(pool.values()) == {4}  # 24 rollouts: every layout 4 times
    assert len({seed for _, seed in pool}) == 6  # a layout is one (task, seed): never two tasks
    assert len({task for task, _ in pool}) == 3
    # the evaluation of the pool plays exactly those (task, layout) pairs, each once
    tasks, requests = eval_requests(_cfg(tmp_path, "task.name=all", "rl.layouts=6", "eval.seeds=rl",
                                         "eval.episodes=2"), 2)
    assert tasks == ["pick_cube", "push_cube", "stack_cube"]
    assert Counter((r.task, r.seed) for r in requests) == Counter(dict.fromkeys(pool, 1))
    # without a pool every rollout group gets a fresh layout, none twice; the pool is the first
    # iteration's fresh layouts kept (with 4 groups an iteration: its 4, then 2 that iteration 0 of a
    # run with 6 groups would draw), and no later iteration's
    fresh = _cfg(tmp_path, "task.name=all", "rl.episodes_per_iteration=4")
    seeds = [r.seed for iteration in range(6) for r in rollout_requests(fresh, iteration)[0]]
    assert len(set(seeds)) == len(seeds) == 24
    assert set(seeds[:4]) < {seed for _, seed in pool} and not set(seeds[4:]) & {seed for _, seed in pool}
    wide = _cfg(tmp_path, "task.name=all", "rl.episodes_per_iteration=6")
    assert set(pool) == {(r.task, r.seed) for r in rollout_requests(wide, 0)[0]}


def test_grpo_groups_share_a_pool_layout(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "task.name=pick_cube", "rl.layouts=3", "rl.algorithm=grpo", "rl.group_size=2",
               "rl.episodes_per_iteration=4")
    first, groups = rollout_requests(cfg, 0)  # the RL loop counts iterations from 0
    second, _ = rollout_requests(cfg, 1)
    assert groups == [0, 0, 1, 1] and first[0].seed == first[1].seed != first[2].seed == first[3].seed
    assert second[0].seed == second[1].seed and second[2].seed == first[0].seed  # layouts 2, then 0 again
    assert len({r.seed for r in (*first, *second)}) == 3


def test_scoring_the_pool_needs_the_pool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.seeds"):
        _cfg(tmp_path, "eval.seeds=rl")
    with pytest.raises(ConfigError, match="rl.layouts"):
        _cfg(tmp_path, "rl.layouts=-1")
    with pytest.raises(ConfigError, match="eval.seeds"):
        _cfg(tmp_path, "eval.seeds=practice")


def test_repeated_plays_of_a_pool_layout_draw_their_own_noise(tmp_path: Path) -> None:
    """eval.seeds=rl with more episodes than layouts plays each layout again: same layout and task, but
    each play's policy noise has its own seed (draw 0: the layout seed, as single plays always had), so
    a pi0 policy's repeated plays are different samples, not copies of the first."""
    import torch

    from tests.test_models import build
    from tests.test_temporal_ensemble import observations
    from vla_dist.rollout.policies import ModelPolicy, PolicySource
    from vla_dist.rollout.runner import Observation

    _, requests = eval_requests(_cfg(tmp_path, "task.name=pick_cube", "rl.layouts=2", "eval.seeds=rl",
                                     "eval.episodes=6"), 6)
    assert [r.draw for r in requests] == [0, 0, 1, 1, 2, 2]
    assert [r.seed for r in requests[2:]] == [r.seed for r in requests[:2]] * 2  # the same two layouts
    assert [r.policy_seed for r in requests[:2]] == [r.seed for r in requests[:2]]
    assert len({r.policy_seed for r in requests}) == 6
    _, held_out = eval_requests(_cfg(tmp_path, "task.name=pick_cube"), 4)
    assert all(r.draw == 0 and r.policy_seed == r.seed for r in held_out)

    build("pi0").save_pretrained(tmp_path / "policy")
    policy = ModelPolicy(PolicySource(kind="model", path=str(tmp_path / "policy")))
    first = observations()[0]  # env 0's observation in both envs: the same layout, seen the same
    obs = Observation({cam: image[[0, 0]] for cam, image in first.images.items()}, first.proprio[[0, 0]], {},
                      first.instructions)

    def first_actions(seeds: list[int]) -> torch.Tensor:
        policy.reset(torch.zeros(2, dtype=torch.long), obs.instructions, seeds)
        return policy.act(obs)

    same = first_actions([requests[0].policy_seed, requests[0].policy_seed])
    assert torch.equal(same[0], same[1])  # what every play of a layout got before: one sample, repeated
    plays = first_actions([requests[0].policy_seed, requests[2].policy_seed])
    assert (plays[0] - plays[1]).abs().max() > 1e-3
