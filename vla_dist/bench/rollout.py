"""`vla-dist bench rollout`: sim-actor scaling on this machine, measured in one run.

value    = env-steps/s with rendering of N actors stepping at once (N = bench.rollout_actors)
baseline = env-steps/s with rendering of 1 actor alone
ratio    = value / (N x baseline): scaling efficiency, 1.0 is perfect
Also reported: env-steps/s without rendering (physics + IK + expert only) and the cost of one
rendered frame (one camera, one env), which bounds CPU collection.
"""

from __future__ import annotations

import time

from vla_dist.bench.common import bench_report
from vla_dist.config.schema import RunConfig


def run_rollout_bench(cfg: RunConfig) -> dict[str, object]:
    import ray

    from vla_dist.rollout.actor import SimActor
    from vla_dist.runtime import announce_sim_build, init_ray

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    announce_sim_build()
    n, steps = cfg.bench.rollout_actors, cfg.bench.rollout_steps
    remote_cls = ray.remote(SimActor)
    kwargs = {
        "task": cfg.task, "sim": cfg.sim, "n_envs": cfg.collect.envs_per_actor, "image_codec": cfg.data.image_codec,
    }
    actors = [remote_cls.options(num_cpus=cfg.collect.cpus_per_actor).remote(**kwargs) for _ in range(n)]
    try:
        ray.get([a.info.remote() for a in actors])
        ray.get([a.measure.remote(3, True) for a in actors])  # warm-up: first render and IK compile lazily

        single = ray.get(actors[0].measure.remote(steps, True))
        no_render = ray.get(actors[0].measure.remote(steps, False))
        started = time.perf_counter()
        parallel = ray.get([a.measure.remote(steps, True) for a in actors])
        wall = time.perf_counter() - started
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)

    one_actor = single["env_steps"] / single["seconds"]
    n_actors = sum(p["env_steps"] for p in parallel) / wall
    return bench_report(
        "rollout", round(n_actors, 2), "env_steps/s (rendered)", round(one_actor, 2),
        round(n_actors / (n * one_actor), 3), "N-actor throughput / (N x 1-actor throughput)",
        num_actors=n,
        envs_per_actor=cfg.collect.envs_per_actor,
        image_size=cfg.task.image_size,
        cameras=list(cfg.task.cameras),
        steps_measured=steps,
        env_steps_per_s_no_render=round(no_render["env_steps"] / no_render["seconds"], 2),
        render_ms_per_frame=round(1000 * single["render_seconds"] / max(single["frames"], 1), 2),
        render_share=round(single["render_seconds"] / single["seconds"], 3),
    )
