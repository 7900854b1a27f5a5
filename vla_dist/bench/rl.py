"""`vla-dist bench rl`: the two costs an RL iteration adds to plain simulation, measured in one run.

value    = env-steps/s of policy-driven rollouts with exploration (SimActor.run_rollouts: rendering,
           Flow-SDE or token sampling per decision, the decisions recorded) on the sim-actor pool
baseline = env-steps/s of expert-driven stepping with rendering on the same actors (SimActor.measure)
ratio    = value / baseline: the share of simulation speed that rollouts keep
Also: weight sync (WeightSync's path: one ray.put, every actor fetches and loads the weights as a
version) in GB/s against a plain ray.put + ray.get of the same bytes by the same number of actors; and
`sampling`: one exploring decision for an actor's envs_per_actor envs drawn as the rollouts draw it (one
batched call, each env from its own stream) against the same envs drawn one at a time (what the
action-token rollouts did before), ms per decision, in this process on random images and states.

The policy is model.pretrained, or the untrained model.preset (the speed does not depend on the
weights). Collect.* sizes the pool; rl.* sets the exploration.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vla_dist.bench.common import bench_report
from vla_dist.config.schema import RunConfig

if TYPE_CHECKING:
    from vla_dist.rl.rollout import Exploration

SYNC_REPEATS = 3


class _Receiver:
    """The sync baseline's other end: takes the weights from the store and touches nothing else."""

    def receive(self, weights: dict[str, Any]) -> int:
        return sum(t.numel() * t.element_size() for t in weights.values())


def run_rl_bench(cfg: RunConfig) -> dict[str, object]:
    import ray
    import torch

    from vla_dist.models.build import build_policy, placeholder_manifest
    from vla_dist.rl.rollout import exploration_from
    from vla_dist.rollout.actor import SimActor
    from vla_dist.rollout.policies import PolicySource
    from vla_dist.rollout.runner import EpisodeRequest
    from vla_dist.runtime import announce_sim_build, init_ray

    path = cfg.model.pretrained
    if not path:  # the untrained preset, saved once where the actors can load it
        path = str(Path(cfg.run.dir) / "bench_policy")
        torch.manual_seed(cfg.run.seed)
        build_policy(cfg.model, placeholder_manifest()).save_pretrained(path)
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    announce_sim_build()
    c = cfg.collect
    source = PolicySource(kind="model", path=path, cameras=tuple(cfg.task.cameras))
    kwargs = {"task": cfg.task, "sim": cfg.sim, "n_envs": c.envs_per_actor, "image_codec": cfg.data.image_codec,
              "policy": source}
    actors = [ray.remote(SimActor).options(num_cpus=c.cpus_per_actor).remote(**kwargs) for _ in range(c.num_actors)]
    receivers = [ray.remote(_Receiver).options(num_cpus=0).remote() for _ in range(c.num_actors)]
    try:
        from vla_dist.models import load_policy

        policy = load_policy(path)  # the sync's bytes here, the sampling figure below
        weights = {name: p.detach().clone() for name, p in policy.named_parameters()}
        size = sum(t.numel() * t.element_size() for t in weights.values())
        ray.get([a.set_weights.remote(0, weights) for a in actors])  # warm: loads the model, first sync
        sync_s, plain_s = [], []
        for version in range(1, SYNC_REPEATS + 1):
            started = time.perf_counter()
            ref = ray.put(weights)
            ray.get([a.set_weights.remote(version, ref) for a in actors])
            sync_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            ref = ray.put(weights)
            ray.get([r.receive.remote(ref) for r in receivers])
            plain_s.append(time.perf_counter() - started)
        exploration = exploration_from(cfg)
        steps = cfg.task.max_steps or cfg.bench.rollout_steps

        def requests(actor: int) -> list[EpisodeRequest]:
            return [EpisodeRequest(actor * c.envs_per_actor + i, "pick_cube", 1000 + actor * 100 + i, max_steps=steps)
                    for i in range(c.envs_per_actor)]

        version = SYNC_REPEATS
        ray.get([a.run_rollouts.remote(requests(i), exploration, version) for i, a in enumerate(actors)])  # warm-up
        started = time.perf_counter()
        results = ray.get([a.run_rollouts.remote(requests(i), exploration, version) for i, a in enumerate(actors)])
        policy_rate = sum(r.env_steps for r in results) / (time.perf_counter() - started)
        ray.get([a.measure.remote(3, True) for a in actors])
        started = time.perf_counter()
        measured = ray.get([a.measure.remote(steps, True) for a in actors])
        expert_rate = sum(m["env_steps"] for m in measured) / (time.perf_counter() - started)
    finally:
        for actor in (*actors, *receivers):
            ray.kill(actor, no_restart=True)
    sampling = exploration_sampling(policy, exploration, c.envs_per_actor, tuple(cfg.task.cameras))
    sync_gbps, plain_gbps = size / min(sync_s) / 1e9, size / min(plain_s) / 1e9
    return bench_report(
        "rl", round(policy_rate, 2), "env_steps/s (policy rollouts with exploration)", round(expert_rate, 2),
        round(policy_rate / expert_rate, 3), "policy-driven rollout env-steps/s / expert-driven env-steps/s",
        family=cfg.model.family, num_actors=c.num_actors, envs_per_actor=c.envs_per_actor, steps_per_episode=steps,
        horizon=exploration.horizon, sync_bytes=size, sync_gb_per_s=round(sync_gbps, 4),
        plain_put_get_gb_per_s=round(plain_gbps, 4),
        sync_ratio=round(sync_gbps / plain_gbps, 3), sync_s=round(min(sync_s), 4), sampling=sampling,
    )


def exploration_sampling(policy: Any, exploration: Exploration, batch: int,
                         cameras: tuple[str, ...]) -> dict[str, float]:
    """ms per decision for `batch` envs: ExplorationPolicy.sample_decision on the batch (the rollouts' way)
    against one call per env with that env's stream; bench.decode's timing (median after a warm-up)."""
    import torch

    from vla_dist.bench.decode import random_policy_inputs, time_call
    from vla_dist.models.policy import PolicyInputs
    from vla_dist.rl.rollout import ExplorationPolicy

    inputs = random_policy_inputs(policy, batch)
    task_ids, seeds = torch.zeros(batch, dtype=torch.long), list(range(batch))
    batched = ExplorationPolicy(policy, exploration, 0, cameras)
    alone = [ExplorationPolicy(policy, exploration, 0, cameras) for _ in range(batch)]
    for row, single in enumerate(alone):
        single.reset(task_ids[:1], inputs.instructions[row : row + 1], seeds[row : row + 1])
    batched.reset(task_ids, inputs.instructions, seeds)
    rows = [PolicyInputs(inputs.images[r : r + 1], inputs.state[r : r + 1], inputs.instructions[r : r + 1])
            for r in range(batch)]

    def one_batch() -> None:
        batched.sample_decision(inputs)

    def one_by_one() -> None:
        for single, row in zip(alone, rows, strict=True):
            single.sample_decision(row)

    ms = {name: round(1000 * time_call(lambda _, fn=fn: fn(), {}), 2)
          for name, fn in (("batched", one_batch), ("one_env_at_a_time", one_by_one))}
    return {"envs": batch, "batched_ms": ms["batched"], "one_env_at_a_time_ms": ms["one_env_at_a_time"],
            "speedup": round(ms["one_env_at_a_time"] / ms["batched"], 3)}
