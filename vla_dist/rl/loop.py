"""`vla-dist rl`: RL post-training from simulated rollouts, starting from `model.pretrained`.

    for each iteration:
        rollouts   the sim-actor pool runs weight version v with exploration (rl/rollout.py)
        update     the DeepSpeed ranks take PPO/GRPO steps on them (rl/worker.py)
        sync       the new trainable weights go to every actor as version v+1 (rl/sync.py)
        log / eval / save

The driver only orchestrates: seeds, bookkeeping, metrics.jsonl, the progress bar, checkpoints
(COMPLETE marker + `latest`, as `vla-dist train`). Re-running with a larger rl.iterations continues
from the last complete checkpoint (rl.resume=auto): weights, value head, optimizer, iteration and
weight version; rollout seeds and exploration noise derive from (run.seed, iteration, version), so
the resumed run continues the uninterrupted one's streams.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vla_dist.checkpoint import manager as ckpt
from vla_dist.config.load import save_resolved
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.models.files import is_foundation_dir
from vla_dist.rl.rollout import Exploration, exploration_from
from vla_dist.rl.trajectories import Trajectories, join_rollouts
from vla_dist.rollout.episodes import practice_layout, rl_seed, selected_tasks
from vla_dist.rollout.evaluate import eval_requests, run_requests, success_summary, wilson_interval
from vla_dist.rollout.runner import EpisodeRequest
from vla_dist.train.metrics import MetricsLog, read_metrics
from vla_dist.train.stop import StoppedBySignal, StopRequest

RESUME_HINT = "run the same command again (rl.resume=auto) to continue from it"


def rollout_requests(cfg: RunConfig, iteration: int) -> tuple[list[EpisodeRequest], list[int]]:
    """(requests, group of each): rl.episodes_per_iteration episodes; under GRPO groups of
    rl.group_size share a layout (PPO: a group per episode). Tasks rotate over groups; with rl.layouts
    the groups cycle that fixed pool (`practice_layout`), each layout keeping its task."""
    rl, tasks = cfg.rl, selected_tasks(cfg.task.name)
    size = rl.group_size if rl.algorithm == "grpo" else 1
    requests, groups = [], []
    for index in range(rl.episodes_per_iteration):
        group = index // size
        slot, seed = group, rl_seed(cfg.run.seed, iteration, group)
        if rl.layouts:
            slot, seed = practice_layout(cfg.run.seed, iteration, group, rl.episodes_per_iteration // size, rl.layouts)
        requests.append(EpisodeRequest(index, tasks[slot % len(tasks)], seed, paraphrases=tuple(cfg.task.paraphrases)))
        groups.append(group)
    return requests, groups


def collect_rollouts(pool: Any, requests: list[EpisodeRequest], groups: list[int], exploration: Exploration,
                     version: int, envs: int) -> tuple[Trajectories, dict[str, Any]]:
    """Every request on the pool as `version` (chunks of `envs`); a chunk whose actor died is re-run
    whole by the pool, so each request is counted once."""
    chunks = [requests[i : i + envs] for i in range(0, len(requests), envs)]
    pending = list(chunks)
    results: dict[int, Any] = {}
    started = time.perf_counter()
    before = (pool.stats.chunks_retried, pool.stats.actor_failures)  # the pool counts over its lifetime

    def on_result(chunk: list[EpisodeRequest], result: Any) -> None:
        results[chunk[0].index] = result

    stats = pool.run(lambda: pending.pop(0) if pending else None, on_result, method="run_rollouts",
                     args=(exploration, version))
    ordered = [results[chunk[0].index] for chunk in chunks]
    traj = join_rollouts([r.batch for r in ordered], [r.tasks for r in ordered], [r.seeds for r in ordered],
                         [[groups[q.index] for q in chunk] for chunk in chunks])
    seconds = time.perf_counter() - started
    executed_steps = int(traj.lengths.sum())  # control steps the episodes took (padding envs not counted)
    return traj, {"rollout_s": seconds, "env_steps": executed_steps, "env_steps_per_s": executed_steps / seconds,
                  "chunks_retried": stats.chunks_retried - before[0],
                  "actor_failures": stats.actor_failures - before[1]}


def rollout_summary(traj: Trajectories, tasks: list[str]) -> dict[str, Any]:
    wins = int(traj.success.sum())
    low, high = wilson_interval(wins, traj.episodes)
    per_task = {}
    for task in tasks:
        mine = [i for i, t in enumerate(traj.tasks) if t == task]
        per_task[task] = sum(int(traj.success[i]) for i in mine) / max(len(mine), 1)
    # A layout rolled out several times (GRPO groups, rl.layouts): its successes of its tries. A layout
    # every try of which succeeds (or fails) gives GRPO no signal; one that moves is what RL learned.
    per_layout: dict[str, list[int]] = {}
    for seed, won in zip(traj.seeds, traj.success.tolist(), strict=True):
        per_layout.setdefault(str(seed), [0, 0])[0 if won else 1] += 1
    repeated = {seed: f"{w}/{w + f}" for seed, (w, f) in per_layout.items()} if len(per_layout) < traj.episodes else {}
    return {"success_rate": wins / traj.episodes, "successes": wins, "episodes": traj.episodes,
            "ci95": [round(low, 4), round(high, 4)], "per_task_success": per_task,
            **({"per_layout_successes": repeated} if repeated else {}),
            "mean_return": float((traj.rewards * traj.valid).sum(1).mean()),
            "mean_length": float(traj.lengths.float().mean())}


def run_rl(cfg: RunConfig) -> dict[str, Any]:
    from vla_dist.rl.sync import WeightSync
    from vla_dist.rl.worker import RLWorker
    from vla_dist.rollout.policies import PolicySource
    from vla_dist.rollout.pool import SimActorPool
    from vla_dist.runtime import init_ray
    from vla_dist.train.sft import start_ranks

    rl, run_dir = cfg.rl, Path(cfg.run.dir)
    if not cfg.model.pretrained:
        raise ConfigError("model.pretrained", "vla-dist rl starts from a policy: give a saved or exported policy "
                          "directory (e.g. one `vla-dist export` wrote, or RUN/checkpoints/step_N/policy of an rl run)")
    if is_foundation_dir(cfg.model.pretrained):
        raise ConfigError("model.pretrained", f"{cfg.model.pretrained} is a plain transformers checkpoint: RL needs a "
                          "policy that already acts on this robot's data; post-train it first (vla-dist train "
                          "model.pretrained=... data.dir=...) and start rl from that run's export")
    resume = _resume(cfg)
    save_resolved(cfg, run_dir)
    env = init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    _check_fits(cfg)
    started = time.perf_counter()
    tasks = selected_tasks(cfg.task.name)
    if cfg.model.family == "pi0" and cfg.model.num_inference_steps < 2:
        raise ConfigError("model.num_inference_steps", "Flow-SDE makes one of pi0's denoising steps after the "
                          f"first stochastic: needs >= 2 steps, got {cfg.model.num_inference_steps}")
    exploration = exploration_from(cfg)
    source = PolicySource(kind="model", path=cfg.model.pretrained, action_horizon=cfg.eval.action_horizon,
                          temporal_ensemble=cfg.eval.temporal_ensemble, cameras=tuple(cfg.task.cameras))
    lora = cfg.train.lora if cfg.train.lora.enabled else None
    rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    with StopRequest(what="vla-dist rl") as stop:
        group, info = start_ranks(cfg, {}, env, RLWorker, resume=resume, resume_mode="same",
                                  on_lost=lambda: ckpt.kept_message(run_dir, RESUME_HINT, "iteration 0"))
        pool = None
        try:
            iteration = first = info["step"]
            version = info["version"]
            actor_kwargs = {"task": cfg.task, "sim": cfg.sim, "n_envs": cfg.collect.envs_per_actor,
                            "image_codec": cfg.data.image_codec, "policy": source}
            pool = SimActorPool.from_config(cfg.collect, actor_kwargs)
            sync = WeightSync(group, pool, lora, rl.sync_timeout_s)
            sync_stats = sync.push(version)
            pool.restore = sync.restore
            metrics = MetricsLog(run_dir / "metrics.jsonl", resumed_step=iteration)
            saved = iteration
            with _progress() as progress:
                bar = progress.add_task("rl", total=rl.iterations, completed=iteration, success=float("nan"),
                                        rate=0.0, held="")
                while iteration < rl.iterations and not stop.requested:
                    if _eval_due(cfg, iteration, first):
                        evals.append(_evaluate(cfg, pool, iteration, metrics))
                        progress.update(bar, held=_held_label(evals[-1]))
                    requests, groups = rollout_requests(cfg, iteration)
                    traj, rollout = collect_rollouts(pool, requests, groups, exploration, version,
                                                     cfg.collect.envs_per_actor)
                    traj_ref = _put(traj)
                    update = group.run(lambda a, r, ref=traj_ref, it=iteration: a.update.remote(ref, it))[0]
                    version += 1
                    sync_stats = sync.push(version)
                    iteration += 1
                    row = {"iteration": iteration, "step": iteration, "version": version,
                           **rollout_summary(traj, tasks), **rollout, **update, **sync_stats,
                           "elapsed_s": round(time.perf_counter() - started, 3)}
                    metrics.write(row)
                    rows.append(row)
                    if (rl.save_every and iteration % rl.save_every == 0) or iteration == rl.iterations:
                        _save(group, cfg, iteration, version)
                        saved = iteration
                    progress.update(bar, completed=iteration, success=row["success_rate"],
                                    rate=row["env_steps_per_s"])
                if iteration == rl.iterations and rl.eval_every and not stop.requested:
                    evals.append(_evaluate(cfg, pool, iteration, metrics))
            if stop.requested and iteration > saved:
                _save(group, cfg, iteration, version)
        finally:
            group.shutdown()
            if pool is not None:
                pool.shutdown()
    plot = plot_success(run_dir / "metrics.jsonl", run_dir / "success.png")
    latest = ckpt.latest_checkpoint(run_dir)
    report = {
        "command": "rl", "algorithm": rl.algorithm, "family": cfg.model.family, "iterations": rl.iterations,
        "first_iteration": first, "last_iteration": iteration, "lora": cfg.train.lora.enabled,
        "rollout_episodes": iteration * rl.episodes_per_iteration,  # every iteration's, before a resume too
        "world_size": cfg.train.world_size, "zero_stage": cfg.train.zero_stage,
        "trainable_parameters": info["trainable"], "parameters": info["parameters"],
        "first_rollout_success": rows[0]["success_rate"] if rows else None,
        "last_rollout_success": rows[-1]["success_rate"] if rows else None,
        "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
        "sync_bytes": sync_stats["sync_bytes"], "sync_s": round(sync_stats["sync_s"], 3),
        "checkpoint": latest and str(latest), "policy": latest and str(latest / "policy"),
        "success_png": str(plot), "wall_s": round(time.perf_counter() - started, 2),
        "stopped_by": stop.signal_name if iteration < rl.iterations else None,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if report["stopped_by"]:
        message = (f"stopped by {report['stopped_by']} at iteration {iteration} of {rl.iterations}; checkpoint "
                   f"kept: {latest or 'none'}; run the same command again to continue from it")
        if report["stopped_by"] == "SIGTERM":
            raise StoppedBySignal(message, report)
        print(message, flush=True)
    return report


def _put(traj: Trajectories) -> Any:
    """One copy of the iteration in Ray's store, read by every rank (not one copy per rank)."""
    import ray

    return ray.put(traj)


def _eval_due(cfg: RunConfig, iteration: int, first: int) -> bool:
    every = cfg.rl.eval_every
    return bool(every) and (iteration % every == 0 or iteration == first == 0)


def _evaluate(cfg: RunConfig, pool: Any, iteration: int, metrics: MetricsLog) -> dict[str, Any]:
    """Greedy evaluation of the actors' current weights (eval.* decoding settings), on the layouts
    `vla-dist eval` uses under the same run.seed: held out, disjoint from the rollouts' (stream 2), or
    with eval.seeds=rl the pool the rollouts practise (rl.layouts)."""
    tasks, requests = eval_requests(cfg, cfg.rl.eval_episodes or cfg.eval.episodes)
    started = time.perf_counter()
    tally, _ = run_requests(pool, requests, cfg.collect.envs_per_actor)
    summary = success_summary(tally.ordered(), tasks)
    row = {"iteration": iteration, "step": iteration, "kind": "eval", "eval_s": round(time.perf_counter() - started, 2),
           **{f"eval_{k}": v for k, v in summary.items()}}
    metrics.write(row)
    return row


def _held_label(row: dict[str, Any]) -> str:
    return (f"held-out {row['eval_successes']}/{row['eval_episodes']} "
            f"({row['eval_ci95'][0]:.0%}-{row['eval_ci95'][1]:.0%})")


def _save(group: Any, cfg: RunConfig, iteration: int, version: int) -> Path:
    t = cfg.train
    meta = {"kind": "rl", "iteration": iteration, "version": version, "step": iteration,
            "model": asdict(cfg.model), "manifest": None, "seed": cfg.run.seed, "lora": asdict(t.lora),
            "world_size": t.world_size, "zero_stage": t.zero_stage, "rl": asdict(cfg.rl)}
    return ckpt.save_step(cfg.run.dir, iteration, lambda path: group.run(lambda a, r: a.save.remote(str(path), meta)),
                          {"kind": "rl", "world_size": t.world_size, "zero_stage": t.zero_stage,
                           "lora": t.lora.enabled, "algorithm": cfg.rl.algorithm}, cfg.rl.keep_last)


def _resume(cfg: RunConfig) -> Path | None:
    """rl.resume -> the checkpoint to continue from; it must be an rl checkpoint of the same
    layout (ranks, ZeRO stage, LoRA, algorithm: elastic RL resume is not supported yet)."""
    rl = cfg.rl
    resume = ckpt.resolve_resume(rl.resume, cfg.run.dir)
    if resume is None:
        return None
    saved = json.loads((resume / ckpt.COMPLETE).read_text(encoding="utf-8"))
    if saved.get("kind") != "rl":
        raise ConfigError("rl.resume", f"{resume} is not an rl checkpoint (a `vla-dist train` run?): give rl its own "
                          "run.dir, and the policy to start from as model.pretrained")
    ours = {"world_size": cfg.train.world_size, "zero_stage": cfg.train.zero_stage, "lora": cfg.train.lora.enabled,
            "algorithm": rl.algorithm}
    for key, value in ours.items():
        if saved.get(key) != value:
            raise ConfigError("rl.resume", f"{resume} was saved with {key}={saved.get(key)}, this run has {value}: "
                              "an rl run resumes with the same layout (or set rl.resume=never)")
    return resume


def _check_fits(cfg: RunConfig) -> None:
    """On the in-process Ray, ranks and sim actors must fit together (actors queued behind the ranks
    would wait forever); a cluster may autoscale."""
    import ray

    if cfg.cluster.address is not None:
        return
    t, c = cfg.train, cfg.collect
    need = t.world_size * t.cpus_per_rank + c.num_actors * c.cpus_per_actor
    offered = ray.cluster_resources().get("CPU", 0.0)
    if need > offered:
        raise ConfigError("train.cpus_per_rank", f"rl colocates {t.world_size} ranks x {t.cpus_per_rank:g} CPU and "
                          f"{c.num_actors} sim actors x {c.cpus_per_actor:g} CPU = {need:g}; the local Ray offers "
                          f"{offered:g}: give fractions (train.cpus_per_rank, collect.cpus_per_actor) or fewer")


def plot_success(metrics_path: Path, out_png: Path) -> Path:
    """Rollout success (exploring) and held-out success (greedy, 95% interval) against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    rollouts = [r for r in rows if "kind" not in r and "success_rate" in r]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iteration"] for r in rollouts], [r["success_rate"] for r in rollouts], marker=".",
            label="rollouts (exploring)")
    if evals:
        rates = [r["eval_success_rate"] for r in evals]
        ax.errorbar([r["iteration"] for r in evals], rates,
                    yerr=[[rate - r["eval_ci95"][0] for rate, r in zip(rates, evals, strict=True)],
                          [r["eval_ci95"][1] - rate for rate, r in zip(rates, evals, strict=True)]],
                    marker="o", capsize=3, label="held-out (95% CI)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("rollout success {task.fields[success]:.2f}"),
                    TextColumn("{task.fields[rate]:.1f} env-steps/s"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), TextColumn("{task.fields[held]}"))
