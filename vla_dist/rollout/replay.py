"""`vla-dist replay`: data fidelity of a collected dataset, by open-loop replay in the simulator.

Every episode of `data.dir` is rebuilt from its (task, seed), exactly as collection built it (same
layout, instruction and arm start), and its recorded actions are played back open loop on the same
SimActorPool that eval uses (`replay` policy, rollout/policies.py; no rendering: physics only).
An episode replays for at most its recorded number of steps, under the same success rule as
collection (SUCCESS_HOLD_STEPS). Reported per task: how many recorded successes the replay
reproduces, and per episode the state drift, max |proprio replayed - proprio recorded| over the
recorded steps. A dataset whose actions and seeds really describe its episodes replays at ~100%
with tiny drift; stored actions that are off by a step, cut, or recorded under other physics
settings show up here before a policy is trained on them.

Determinism, measured (Genesis 1.4.5, CPU backend): replaying episodes collected 2 envs per scene in
other env slots of a 3-env scene, in another order, gave drift 0.0 (bitwise equal proprio) for all
three tasks, so a replay is exact whatever the batching. The physics settings must be the
collection's: the manifest records control rate and (since this was added) sim.dt/substeps, and a
mismatch is refused naming the key. (Measured before that check existed: the quickstart dataset
replayed at sim.dt=0.005 instead of 0.01 reproduced 7 of 8 successes with drift up to 0.028, i.e.
physics differences show up, but only partly, in the success rate; the drift is the sharper signal.)

`perturb` ("reverse": actions in reverse time order, "zero": all zero, i.e. stay and keep the
gripper open) is a negative control: a replay that still succeeded with those would mean the
success check, not the recorded actions, decides the outcome.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vla_dist.atomic import write_json
from vla_dist.config.schema import RunConfig
from vla_dist.data.episode import Episode
from vla_dist.errors import ConfigError
from vla_dist.rollout.actor import ChunkResult, EpisodeOutcome
from vla_dist.rollout.episodes import selected_tasks
from vla_dist.rollout.policies import PolicySource
from vla_dist.rollout.runner import EpisodeRequest
from vla_dist.spaces import action_space_type

PERTURBATIONS = ("none", "reverse", "zero")


def perturbed(actions: np.ndarray, perturb: str) -> np.ndarray:
    if perturb == "none":
        return actions
    if perturb == "reverse":
        return np.ascontiguousarray(actions[::-1])
    if perturb == "zero":
        return np.zeros_like(actions)
    raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")


def check_physics(cfg: RunConfig, manifest: Mapping[str, Any]) -> None:
    """The replay must step the physics the collection stepped; refuse other settings by key."""
    if not math.isclose(float(manifest["fps"]), float(cfg.task.control_hz)):
        raise ConfigError("task.control_hz", f"{cfg.data.dir} was recorded at {manifest['fps']:g} actions/s, "
                          f"this config replays at {cfg.task.control_hz}: set task.control_hz={manifest['fps']:g}")
    # manifest extra.sim (collect.py); datasets collected before it was recorded: not checked
    sim = (manifest.get("extra") or {}).get("sim") or {}
    for key in ("dt", "substeps"):
        if key in sim and not math.isclose(float(sim[key]), float(getattr(cfg.sim, key))):
            raise ConfigError(f"sim.{key}", f"{cfg.data.dir} was collected with sim.{key}={sim[key]}, this config "
                              f"has {getattr(cfg.sim, key)}: set sim.{key}={sim[key]}")
    recorded = action_space_type(manifest["action_space"])
    if recorded != cfg.sim.action_space:
        raise ConfigError("sim.action_space", f"{cfg.data.dir} records {recorded or 'another robot'}'s actions, this "
                          f"config replays {cfg.sim.action_space} actions" +
                          (f": set sim.action_space={recorded}" if recorded else ""))


def load_recorded(cfg: RunConfig) -> tuple[list[Episode], list[tuple[str, str]], float]:
    """The episodes to replay (task.name: one task, or all), images not decoded; shard errors; the
    execution noise they were collected with (collect.action_noise, DART: replayed identically)."""
    from vla_dist.data.manifest import ManifestError, read_manifest, recorded_labels
    from vla_dist.data.reader import ShardErrors, iter_episodes

    try:
        manifest = read_manifest(cfg.data.dir)
    except (ManifestError, FileNotFoundError, OSError) as error:
        raise ConfigError("data.dir", f"no readable dataset at {cfg.data.dir} ({error})") from None
    check_physics(cfg, manifest)
    extra = manifest.get("extra") or {}
    relabelled = extra.get("relabel_policy")
    if relabelled and recorded_labels(manifest) == "expert":
        raise ConfigError("data.dir", f"{cfg.data.dir} holds DAgger labels (the expert's actions on the states "
                          f"{relabelled} reached), not the actions that executed: it cannot be replayed")
    action_noise = float(extra.get("action_noise", 0.0))
    errors = ShardErrors()
    tasks = selected_tasks(cfg.task.name)
    episodes = [ep for ep in iter_episodes(cfg.data.dir, decode_images=False, on_error=errors) if ep.task in tasks]
    if not episodes:
        raise ConfigError("data.dir", f"{cfg.data.dir} holds no readable episodes of task.name={cfg.task.name}")
    seen: dict[int, str] = {}
    for ep in episodes:  # the replay policy finds an episode's actions by its seed
        if ep.seed in seen:
            raise ConfigError("data.dir", f"{cfg.data.dir}: episodes {seen[ep.seed]} and {ep.episode_id} share "
                              f"seed {ep.seed} (datasets merged from runs with the same run.seed?)")
        seen[ep.seed] = ep.episode_id
    return episodes, errors.errors, action_noise


def replay_dataset(cfg: RunConfig, perturb: str = "none") -> dict[str, Any]:
    """Replay `cfg.data.dir` on a SimActorPool sized by `cfg.collect`; returns the report."""
    from vla_dist.rollout.pool import SimActorPool
    from vla_dist.rollout.progress import episode_progress
    from vla_dist.runtime import init_ray

    started = time.perf_counter()
    episodes, shard_errors, action_noise = load_recorded(cfg)
    recorded = {ep.seed: perturbed(ep.actions, perturb) for ep in episodes}
    requests = [EpisodeRequest(i, ep.task, ep.seed, max_steps=ep.num_frames, action_noise=action_noise)
                for i, ep in enumerate(episodes)]
    size = cfg.collect.envs_per_actor
    pending = [requests[i : i + size] for i in range(0, len(requests), size)]
    source = PolicySource(kind="replay", cameras=tuple(cfg.task.cameras), recorded=recorded)
    outcomes: dict[int, EpisodeOutcome] = {}

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    actor_kwargs = {"task": cfg.task, "sim": cfg.sim, "n_envs": size, "image_codec": cfg.data.image_codec,
                    "policy": source}
    with episode_progress() as progress:
        bar = progress.add_task("replay", total=len(requests), rate=0.0, success=0.0)
        pool = SimActorPool.from_config(cfg.collect, actor_kwargs)
        replay_started = time.perf_counter()

        def on_result(chunk: list[EpisodeRequest], result: ChunkResult) -> None:
            for outcome in result.outcomes:
                outcomes[outcome.index] = outcome
            done = len(outcomes)
            progress.update(bar, completed=done, rate=done / max(time.perf_counter() - replay_started, 1e-9),
                            success=sum(o.success for o in outcomes.values()) / max(done, 1))

        try:
            stats = pool.run(lambda: pending.pop(0) if pending else None, on_result)
        finally:
            pool.shutdown()

    detail = [_episode_result(ep, outcomes[i]) for i, ep in enumerate(episodes)]
    tasks = sorted({ep.task for ep in episodes})
    report: dict[str, Any] = {
        "command": "replay",
        "data_dir": str(cfg.data.dir),
        "perturb": perturb,
        **_summary(detail),
        "per_task": {task: _summary([d for d in detail if d["task"] == task]) for task in tasks},
        "episode_results": detail,
        "shard_errors": [f"{shard}: {message}" for shard, message in shard_errors],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "actor_failures": stats.actor_failures,
        "chunks_retried": stats.chunks_retried,
    }
    return report


def _episode_result(ep: Episode, outcome: EpisodeOutcome) -> dict[str, Any]:
    steps = min(ep.num_frames, outcome.num_frames)
    # proprio is recorded before each action: row t is the state the t-th action was applied in
    drift = float(np.abs(outcome.state[:steps] - ep.state[:steps]).max()) if steps else float("nan")
    return {"episode_id": ep.episode_id, "task": ep.task, "seed": ep.seed, "recorded_success": ep.success,
            "replay_success": outcome.success, "recorded_steps": ep.num_frames, "replay_steps": outcome.num_frames,
            "state_drift": drift}


def _summary(detail: list[dict[str, Any]]) -> dict[str, Any]:
    """success_rate: replayed successes among the episodes recorded as successes (a kept failure,
    collect.keep_failures, is not expected to succeed); reproduced_rate: same outcome as recorded."""
    wins = [d for d in detail if d["recorded_success"]]
    drifts = [d["state_drift"] for d in detail]
    return {
        "episodes": len(detail),
        "recorded_successes": len(wins),
        "replay_successes": sum(d["replay_success"] for d in wins),
        "success_rate": sum(d["replay_success"] for d in wins) / len(wins) if wins else None,
        "reproduced_rate": sum(d["replay_success"] == d["recorded_success"] for d in detail) / max(len(detail), 1),
        "max_state_drift": max(drifts) if drifts else None,
        "mean_state_drift": float(np.mean(drifts)) if drifts else None,
    }


def run_replay(cfg: RunConfig) -> dict[str, Any]:
    """`vla-dist replay`: replay_dataset, report written to run.dir/report.json."""
    report = replay_dataset(cfg)
    write_json(Path(cfg.run.dir) / "report.json", report)
    return report
