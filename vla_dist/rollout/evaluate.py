"""`vla-dist eval`: closed-loop success rate of a policy on the Ray sim-actor pool.

`eval.episodes` episodes per task, on seeds drawn from a stream disjoint from collection's, so a
policy is never scored on the layouts it was trained on. The policy (`eval.policy`) is either the
scripted expert (a reference for the success measure itself) or a VLA: an exported/saved policy
directory (`eval.checkpoint`), or, for a smoke run, the untrained `model.preset` built once by the
driver and shipped to every actor as a saved directory (so all actors run identical weights).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vla_dist.atomic import write_json
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.models.files import PretrainedError
from vla_dist.rollout.actor import ChunkResult, EpisodeOutcome
from vla_dist.rollout.episodes import episode_seed, eval_seed, practice_seed, selected_tasks
from vla_dist.rollout.output import write_videos
from vla_dist.rollout.policies import PolicySource, model_source, simulator_mismatch_of
from vla_dist.rollout.runner import EpisodeRequest
from vla_dist.sim.appearance import appearance_of

if TYPE_CHECKING:  # the pool imports ray: loaded by the functions that start one
    from vla_dist.rollout.pool import PoolStats, SimActorPool


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a success rate; sane at 0/n and n/n, unlike the normal one."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_fits_the_simulator(path: Path, cfg: RunConfig) -> None:
    """A policy of another embodiment cannot run in the simulator: say so before any actor starts."""
    if cfg.eval.offline_data is not None:
        return
    try:
        why = simulator_mismatch_of(path, cfg.sim.action_space)
    except PretrainedError as error:
        raise ConfigError("eval.checkpoint", str(error)) from None
    if why:
        raise ConfigError("eval.checkpoint", f"{path} was trained on {why}: evaluate it on held-out episodes "
                          "with eval.offline_data=DIR instead")


def resolve_policy(cfg: RunConfig) -> PolicySource:
    """What the actors will run; builds and saves the untrained preset when no checkpoint is given."""
    cameras = tuple(cfg.task.cameras)
    if cfg.eval.policy == "expert":
        return PolicySource(kind="expert", cameras=cameras)
    path = cfg.eval.checkpoint
    if path is None:
        from vla_dist.data.manifest import read_manifest
        from vla_dist.models import build_policy

        manifest_dir = Path(cfg.data.dir)
        if not (manifest_dir / "manifest.json").is_file():
            raise ConfigError("data.dir", f"{manifest_dir} has no manifest.json (normalization statistics for the "
                              "policy); run `vla-dist collect` first or point data.dir at a dataset")
        import torch

        torch.manual_seed(cfg.run.seed)  # the init `vla-dist train` starts from under the same run.seed
        policy = build_policy(cfg.model, read_manifest(manifest_dir))
        path = str(Path(cfg.run.dir) / "untrained_policy")
        policy.save_pretrained(path)
    elif not (Path(path) / "vla_dist.json").is_file():  # a training run/checkpoint (validated): export it once
        from vla_dist.checkpoint.export import export_checkpoint, resolve_checkpoint
        from vla_dist.checkpoint.manager import META

        step_dir = resolve_checkpoint(path)
        lora = bool(json.loads((step_dir / META).read_text(encoding="utf-8"))["lora"]["enabled"])
        exported = export_checkpoint(step_dir, Path(cfg.run.dir) / "policy", merge_lora=lora)
        path = str(exported["out"])
    _check_fits_the_simulator(Path(path), cfg)
    return model_source(cfg, str(path))


def closest_approach_cm(outcomes: list[EpisodeOutcome]) -> float | None:
    values = [o.closest_approach_m for o in outcomes if math.isfinite(o.closest_approach_m)]
    return round(100 * float(np.mean(values)), 2) if values else None


def closest_goal_cm(outcomes: list[EpisodeOutcome]) -> dict[str, float] | None:
    """The closest the cube came to its success region (`goal_distance`), over the failed episodes:
    median and quartiles (cm). A near miss (push 4 cm short of a 3 cm tolerance) and a policy that never
    touched the cube both score 0 successes; this tells them apart."""
    values = [o.closest_goal_m for o in outcomes if not o.success and math.isfinite(o.closest_goal_m)]
    if not values:
        return None
    q25, q50, q75 = (round(100 * float(v), 2) for v in np.quantile(values, [0.25, 0.5, 0.75]))
    return {"failures": len(values), "median": q50, "q25": q25, "q75": q75}


def eval_requests(cfg: RunConfig, episodes_per_task: int) -> tuple[list[str], list[EpisodeRequest]]:
    """(tasks, requests): the same seeds for the same run.seed, so evals of one run score the same layouts.
    Episode i runs tasks[i % len(tasks)] on a held-out layout, or (eval.seeds="collection") on the layout
    collection episode i had: the task rotation and seed of `vla-dist collect` under the same run.seed,
    or (eval.seeds="rl") on layout i mod rl.layouts of the pool an RL run practised, with its task: play
    i // rl.layouts of that layout, each play drawing its own policy noise (EpisodeRequest.draw)."""
    tasks = selected_tasks(cfg.task.name)
    total = episodes_per_task * len(tasks)
    paraphrases = tuple(cfg.task.paraphrases)
    if cfg.eval.seeds == "rl":  # layout j = i mod rl.layouts of the pool, with the task it is practised on
        slots = [i % cfg.rl.layouts for i in range(total)]
        return tasks, [EpisodeRequest(i, tasks[j % len(tasks)], practice_seed(cfg.run.seed, j), paraphrases=paraphrases,
                                      draw=i // cfg.rl.layouts) for i, j in enumerate(slots)]
    seed_of = episode_seed if cfg.eval.seeds == "collection" else eval_seed
    return tasks, [EpisodeRequest(i, tasks[i % len(tasks)], seed_of(cfg.run.seed, i), paraphrases=paraphrases)
                   for i in range(total)]


@dataclass
class EvalTally:
    """Finished episodes by index, and decode time summed over the chunks that brought them."""

    outcomes: dict[int, EpisodeOutcome] = field(default_factory=dict)
    decode_seconds: float = 0.0
    decode_calls: int = 0
    compile_seconds: float = 0.0

    def add(self, result: ChunkResult) -> None:
        self.decode_seconds += result.decode_seconds
        self.compile_seconds += result.compile_seconds
        self.decode_calls += result.decode_calls
        for outcome in result.outcomes:
            self.outcomes[outcome.index] = outcome

    def ordered(self) -> list[EpisodeOutcome]:
        return [self.outcomes[i] for i in sorted(self.outcomes)]


def run_requests(pool: SimActorPool, requests: list[EpisodeRequest], chunk_size: int,
                 on_update: Callable[[EvalTally], None] | None = None) -> tuple[EvalTally, PoolStats]:
    """Every request on the pool, in chunks of `chunk_size` (one env each)."""
    pending = [requests[i : i + chunk_size] for i in range(0, len(requests), chunk_size)]
    tally = EvalTally()

    def on_result(chunk: list[EpisodeRequest], result: ChunkResult) -> None:
        tally.add(result)
        if on_update is not None:
            on_update(tally)

    stats = pool.run(lambda: pending.pop(0) if pending else None, on_result)
    return tally, stats


def success_summary(outcomes: list[EpisodeOutcome], tasks: list[str]) -> dict[str, object]:
    """Success rate with its Wilson 95% interval and episode count, overall and per task."""
    per_task = {}
    for task in tasks:
        mine = [o for o in outcomes if o.task == task]
        wins = sum(o.success for o in mine)
        low, high = wilson_interval(wins, len(mine))
        per_task[task] = {
            "episodes": len(mine),
            "successes": wins,
            "success_rate": wins / max(len(mine), 1),
            "ci95": [round(low, 4), round(high, 4)],
            "mean_length": float(np.mean([o.num_frames for o in mine])) if mine else 0.0,
            "closest_approach_cm": closest_approach_cm(mine),
            "failures_closest_goal_cm": closest_goal_cm(mine),
            # episodes that lifted the cube the instruction did not name (both cubes on the table)
            "other_cube_lifted": sum(o.other_cube_lifted for o in mine),
        }
    wins = sum(o.success for o in outcomes)
    low, high = wilson_interval(wins, len(outcomes))
    return {
        "episodes": len(outcomes),
        "successes": wins,
        "success_rate": wins / max(len(outcomes), 1),
        "ci95": [round(low, 4), round(high, 4)],
        "per_task": per_task,
        "mean_length": float(np.mean([o.num_frames for o in outcomes])) if outcomes else 0.0,
        # mean over episodes of the closest hand-to-cube distance: progress short of success
        "closest_approach_cm": closest_approach_cm(outcomes),
    }


def decode_summary(tally: EvalTally, compiled: bool) -> dict[str, object]:
    calls = tally.decode_calls
    return {
        "decode_ms_per_chunk": 1000 * tally.decode_seconds / calls if calls else None,
        "decode_calls": calls,
        "compiled_decoding": compiled,
        "decode_compile_s": round(tally.compile_seconds, 2),  # summed over actors; excluded from decode_ms_per_chunk
    }


def run_eval(cfg: RunConfig) -> dict[str, object]:
    from vla_dist.rollout.pool import SimActorPool
    from vla_dist.rollout.progress import episode_progress
    from vla_dist.runtime import init_ray

    tasks, requests = eval_requests(cfg, cfg.eval.episodes)
    chunk_size = cfg.collect.envs_per_actor
    source = resolve_policy(cfg)
    started = time.perf_counter()

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    actor_kwargs = {
        "task": cfg.task, "sim": cfg.sim, "n_envs": chunk_size, "image_codec": cfg.data.image_codec, "policy": source,
    }
    with episode_progress() as progress:
        bar = progress.add_task(f"eval ({source.kind})", total=len(requests), rate=0.0, success=0.0)
        pool = SimActorPool.from_config(cfg.collect, actor_kwargs)  # eval shares the sim-pool settings
        eval_started = time.perf_counter()

        def on_update(tally: EvalTally) -> None:
            done = len(tally.outcomes)
            progress.update(
                bar, completed=done, rate=done / max(time.perf_counter() - eval_started, 1e-9),
                success=sum(o.success for o in tally.outcomes.values()) / max(done, 1),
            )

        try:
            tally, stats = run_requests(pool, requests, chunk_size, on_update)
        finally:
            pool.shutdown()

    ordered = tally.ordered()
    report = {
        "command": "eval",
        "policy": source.kind,
        "checkpoint": source.path,
        "seeds": cfg.eval.seeds,  # held-out layouts, or the collection's (a policy's own training layouts)
        "appearance": appearance_of(cfg.sim).to_dict(),  # the scene the cameras saw (default or perturbed)
        "sampler": {"flow_sde_noise": source.noise_level} if source.noise_level else "deterministic",
        **success_summary(ordered, tasks),
        **decode_summary(tally, bool(source.compile)),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "actor_failures": stats.actor_failures,
        "chunks_retried": stats.chunks_retried,
        # per episode, so two evals of the same run.seed (two policies, or one policy in two scenes)
        # can be compared layout by layout
        "outcomes": [{"index": o.index, "task": o.task, "seed": o.seed, "success": bool(o.success),
                      "length": o.num_frames} for o in ordered],
    }
    picked = pick_videos(ordered, cfg.eval.num_videos)
    videos = write_videos(Path(cfg.run.dir) / "videos", picked, cfg, label_outcome=True)
    report["videos"] = [str(path) for path in videos]
    write_json(Path(cfg.run.dir) / "report.json", report)
    return report


def pick_videos(ordered: list[EpisodeOutcome], count: int) -> list[dict[str, object]]:
    """Alternate successes and failures so a person sees both."""
    wins = [o.sample for o in ordered if o.success]
    losses = [o.sample for o in ordered if not o.success]
    picked: list[dict[str, object]] = []
    while len(picked) < count and (wins or losses):
        for group in (wins, losses):
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return picked
