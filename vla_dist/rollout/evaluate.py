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
from pathlib import Path

import numpy as np

from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.rollout.actor import ChunkResult, EpisodeOutcome
from vla_dist.rollout.collect import selected_tasks, write_json, write_videos
from vla_dist.rollout.policies import PolicySource
from vla_dist.rollout.runner import EpisodeRequest

EVAL_SEED_STREAM = 1  # collection uses stream 0 (see collect.episode_seed)


def eval_seed(run_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([run_seed, index, EVAL_SEED_STREAM]).generate_state(1)[0])


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a success rate; sane at 0/n and n/n, unlike the normal one."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
    return PolicySource(
        kind="model", path=str(path), action_horizon=cfg.eval.action_horizon, cameras=cameras, compile=cfg.model.compile
    )


def closest_approach_cm(outcomes: list[EpisodeOutcome]) -> float | None:
    values = [o.closest_approach_m for o in outcomes if math.isfinite(o.closest_approach_m)]
    return round(100 * float(np.mean(values)), 2) if values else None


def run_eval(cfg: RunConfig) -> dict[str, object]:
    from vla_dist.rollout.pool import SimActorPool
    from vla_dist.rollout.progress import episode_progress
    from vla_dist.runtime import init_ray

    tasks = selected_tasks(cfg.task.name)
    total = cfg.eval.episodes * len(tasks)
    requests = [EpisodeRequest(i, tasks[i % len(tasks)], eval_seed(cfg.run.seed, i)) for i in range(total)]
    chunk_size = cfg.collect.envs_per_actor
    pending = [requests[i : i + chunk_size] for i in range(0, total, chunk_size)]
    source = resolve_policy(cfg)
    outcomes: dict[int, EpisodeOutcome] = {}
    decode_seconds, decode_calls, compile_seconds = 0.0, 0, 0.0
    started = time.perf_counter()

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    actor_kwargs = {
        "task": cfg.task, "sim": cfg.sim, "n_envs": chunk_size, "image_codec": cfg.data.image_codec, "policy": source,
    }
    with episode_progress() as progress:
        bar = progress.add_task(f"eval ({source.kind})", total=total, rate=0.0, success=0.0)
        pool = SimActorPool.from_config(cfg.collect, actor_kwargs)  # eval shares the sim-pool settings
        eval_started = time.perf_counter()

        def on_result(chunk: list[EpisodeRequest], result: ChunkResult) -> None:
            nonlocal decode_seconds, decode_calls, compile_seconds
            decode_seconds += result.decode_seconds
            compile_seconds += result.compile_seconds
            decode_calls += result.decode_calls
            for outcome in result.outcomes:
                outcomes[outcome.index] = outcome
            done = len(outcomes)
            progress.update(
                bar, completed=done, rate=done / max(time.perf_counter() - eval_started, 1e-9),
                success=sum(o.success for o in outcomes.values()) / max(done, 1),
            )

        try:
            stats = pool.run(lambda: pending.pop(0) if pending else None, on_result)
        finally:
            pool.shutdown()

    ordered = [outcomes[i] for i in sorted(outcomes)]
    per_task = {}
    for task in tasks:
        mine = [o for o in ordered if o.task == task]
        wins = sum(o.success for o in mine)
        low, high = wilson_interval(wins, len(mine))
        per_task[task] = {
            "episodes": len(mine),
            "successes": wins,
            "success_rate": wins / max(len(mine), 1),
            "ci95": [round(low, 4), round(high, 4)],
            "mean_length": float(np.mean([o.num_frames for o in mine])) if mine else 0.0,
            "closest_approach_cm": closest_approach_cm(mine),
        }
    wins = sum(o.success for o in ordered)
    low, high = wilson_interval(wins, len(ordered))
    report = {
        "command": "eval",
        "policy": source.kind,
        "checkpoint": source.path,
        "episodes": len(ordered),
        "successes": wins,
        "success_rate": wins / max(len(ordered), 1),
        "ci95": [round(low, 4), round(high, 4)],
        "per_task": per_task,
        "mean_length": float(np.mean([o.num_frames for o in ordered])),
        # mean over episodes of the closest hand-to-cube distance: progress short of success
        "closest_approach_cm": closest_approach_cm(ordered),
        "decode_ms_per_chunk": 1000 * decode_seconds / decode_calls if decode_calls else None,
        "decode_calls": decode_calls,
        "compiled_decoding": bool(source.compile),
        "decode_compile_s": round(compile_seconds, 2),  # summed over actors; excluded from decode_ms_per_chunk
        "wall_seconds": round(time.perf_counter() - started, 2),
        "actor_failures": stats.actor_failures,
        "chunks_retried": stats.chunks_retried,
    }
    picked = _pick_videos(ordered, cfg.eval.num_videos)
    videos = write_videos(Path(cfg.run.dir) / "videos", picked, cfg, label_outcome=True)
    report["videos"] = [str(path) for path in videos]
    write_json(Path(cfg.run.dir) / "report.json", report)
    return report


def _pick_videos(ordered: list[EpisodeOutcome], count: int) -> list[dict[str, object]]:
    """Alternate successes and failures so a person sees both."""
    wins = [o.sample for o in ordered if o.success]
    losses = [o.sample for o in ordered if not o.success]
    picked: list[dict[str, object]] = []
    while len(picked) < count and (wins or losses):
        for group in (wins, losses):
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return picked
