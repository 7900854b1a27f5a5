"""`vla-dist collect`: scripted Genesis demonstrations from a Ray actor pool into WebDataset shards.

Episode i of a collection has a fixed task (round-robin over the selected tasks) and seed (derived
from run.seed and i). Chunks of consecutive episodes go to the actors; finished chunks are committed
in index order, so the dataset is the first `collect.episodes` successful episodes by index: exactly
that many, none twice, and the same dataset for the same config whatever actor died on the way.

With `collect.relabel_policy` a saved policy drives the arm for `collect.episodes` rollouts (every one
counts, success or not). `collect.labels=expert` (DAgger): the scripted expert labels every state it
reaches, the episodes record the expert's actions on the policy's states, and every episode is written
(a failure's states are where the labels teach most). `collect.labels=own` (self-imitation): the
episodes record the policy's own executed actions, and only its successes are written.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from vla_dist.atomic import write_json
from vla_dist.config.schema import RunConfig
from vla_dist.data.manifest import write_manifest
from vla_dist.data.reader import list_shards
from vla_dist.data.shards import EpisodeShardWriter, ShardRecord, clear_shards
from vla_dist.data.stats import StatsAccumulator
from vla_dist.errors import ConfigError, VlaDistError
from vla_dist.models.files import PretrainedError
from vla_dist.rollout.actor import ChunkResult, EpisodeOutcome
from vla_dist.rollout.episodes import episode_seed, selected_tasks
from vla_dist.rollout.output import write_videos
from vla_dist.rollout.policies import PolicySource, model_source, simulator_mismatch_of
from vla_dist.rollout.runner import EpisodeRequest
from vla_dist.sim.appearance import appearance_of
from vla_dist.spaces import ACTION_SPACES, STATE_SPACE

log = logging.getLogger("vla_dist.rollout")


@dataclass
class CollectionState:
    """What has been committed so far; chunks arrive out of order and are committed in order."""

    target: int
    keep_failures: bool
    count_every: bool = False  # a policy's rollouts (collect.relabel_policy): every episode counts toward the target
    write_every: bool = False  # ... and is written (collect.labels=expert); own labels write its successes only
    next_index: int = 0  # next episode index to hand out
    next_commit: int = 0  # first episode index not yet committed
    buffered: dict[int, list[EpisodeOutcome]] = field(default_factory=dict)  # chunk start -> outcomes
    inflight: int = 0  # episodes handed out and not yet returned
    counted: int = 0  # episodes counted toward the target (successes, or every rollout of a policy)
    written: int = 0  # counted episodes written (successes, or every expert-labelled rollout)
    failures_written: int = 0
    attempts: Counter = field(default_factory=Counter)  # per task, committed episodes
    successes: Counter = field(default_factory=Counter)
    written_tasks: Counter = field(default_factory=Counter)  # per task, episodes in the dataset (kept failures too)
    surplus: int = 0  # finished after the target was reached; dropped

    def counts(self, success: bool) -> bool:
        """Whether an episode with this outcome counts toward the target."""
        return self.count_every or success

    def admit(self, task: str, success: bool) -> str | None:
        """Account one committed episode, in index order; how it is written: "counted" (toward the
        target), "failure" (a failed demonstration kept by collect.keep_failures) or None (not written)."""
        self.attempts[task] += 1
        self.successes[task] += int(success)
        if self.counts(success) and self.counted < self.target:
            self.counted += 1
            if not (success or self.write_every):
                return None  # own labels: a failed rollout counts toward the rollouts and is not imitated
            self.written += 1
            self.written_tasks[task] += 1
            return "counted"
        if not success and self.keep_failures and not self.count_every:  # demonstrations only
            self.failures_written += 1
            self.written_tasks[task] += 1
            return "failure"
        return None

    def needed(self) -> int:
        buffered = sum(self.counts(o.success) for outcomes in self.buffered.values() for o in outcomes)
        return self.target - self.counted - buffered - self.inflight


@dataclass
class CollectProgress:
    """Handed to `on_progress` after every finished chunk (for launchers, dashboards and tests)."""

    chunks_done: int
    episodes_written: int
    target: int
    actors: list[dict[str, object]]  # per actor: pid, node_id, build_seconds


def run_collect(
    cfg: RunConfig, on_progress: Callable[[CollectProgress], None] | None = None,
    seed_of: Callable[[int], int] | None = None, id_prefix: str = "",
) -> dict[str, object]:
    """`seed_of`: episode index -> layout seed (default: the collection stream of run.seed; DAgger's
    rounds draw their own, vla_dist/dagger.py); `id_prefix`: before every episode id (EpisodeRequest)."""
    from vla_dist.rollout.pool import SimActorPool
    from vla_dist.rollout.progress import episode_progress
    from vla_dist.runtime import init_ray

    data_dir = Path(cfg.data.dir)
    run_dir = Path(cfg.run.dir)
    if (data_dir.is_dir() and list_shards(data_dir)) or (data_dir / "manifest.json").exists():
        if not cfg.collect.overwrite:
            raise ConfigError("data.dir", f"{data_dir} already holds a dataset; choose another directory "
                              "or set collect.overwrite=true to replace it")
        clear_shards(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)  # fail on an unwritable path now, not after the sim is up
    source = relabelling_source(cfg)  # checked before any actor starts
    seed_of = seed_of or partial(episode_seed, cfg.run.seed)

    tasks = selected_tasks(cfg.task.name)
    c = cfg.collect
    max_attempts = int(c.episodes * c.max_attempts_factor)
    state = CollectionState(target=c.episodes, keep_failures=c.keep_failures, count_every=source is not None,
                            write_every=source is not None and source.relabel)
    action_stats, state_stats = StatsAccumulator(), StatsAccumulator()
    video_samples: list[dict[str, object]] = []
    frames_written = 0
    env_steps = 0
    started = time.perf_counter()

    def next_chunk() -> list[EpisodeRequest] | None:
        if state.needed() <= 0 or state.next_index >= max_attempts:
            return None
        size = min(c.envs_per_actor, max_attempts - state.next_index)
        chunk = [
            EpisodeRequest(i, tasks[i % len(tasks)], seed_of(i), action_noise=c.action_noise,
                           paraphrases=tuple(cfg.task.paraphrases), id_prefix=id_prefix)
            for i in range(state.next_index, state.next_index + size)
        ]
        state.next_index += size
        state.inflight += size
        return chunk

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    actor_kwargs = {"task": cfg.task, "sim": cfg.sim, "n_envs": c.envs_per_actor, "image_codec": cfg.data.image_codec,
                    "policy": source, "camera_jitter": c.camera_jitter,
                    "light_jitter": c.light_jitter}
    with episode_progress() as progress:
        bar = progress.add_task("building sim actors", total=c.episodes, rate=0.0, success=0.0)
        pool = SimActorPool.from_config(c, actor_kwargs)
        progress.update(bar, description="collecting")
        writer = EpisodeShardWriter(data_dir, max_episodes=cfg.data.shard_max_episodes,
                                    max_bytes=cfg.data.shard_max_bytes)
        collect_started = time.perf_counter()

        def commit(outcome: EpisodeOutcome) -> None:
            nonlocal frames_written
            written_as = state.admit(outcome.task, outcome.success)
            if written_as is not None:
                writer.write(outcome.sample)
            if written_as == "counted":
                frames_written += outcome.num_frames
                action_stats.add(outcome.actions)
                state_stats.add(outcome.state)
                if len(video_samples) < cfg.collect.num_videos and _wants_video(video_samples, outcome, tasks):
                    video_samples.append(outcome.sample)

        def on_result(chunk: list[EpisodeRequest], result: ChunkResult) -> None:
            nonlocal env_steps
            env_steps += result.env_steps
            state.inflight -= len(chunk)
            state.buffered[chunk[0].index] = sorted(result.outcomes, key=lambda o: o.index)
            while state.next_commit in state.buffered:
                outcomes = state.buffered.pop(state.next_commit)
                state.next_commit += len(outcomes)
                for outcome in outcomes:
                    if state.counted >= state.target:
                        state.surplus += 1
                    else:
                        commit(outcome)
            attempted = sum(state.attempts.values())
            elapsed = time.perf_counter() - collect_started
            progress.update(
                bar, completed=state.counted, rate=state.counted / max(elapsed, 1e-9),
                success=sum(state.successes.values()) / max(attempted, 1),
            )
            if on_progress is not None:
                on_progress(CollectProgress(pool.stats.chunks_done, state.counted, state.target, pool.infos))

        try:
            stats = pool.run(next_chunk, on_result)
        except BaseException:
            records = writer.close()  # finished shards are complete and stay; the open one is published too
            _write_partial_manifest(cfg, data_dir, records, state)
            raise
        finally:
            pool.shutdown()
        records = writer.close()

    wall = time.perf_counter() - started
    collect_wall = time.perf_counter() - collect_started
    if state.counted < state.target:
        _write_partial_manifest(cfg, data_dir, records, state)
        raise VlaDistError(
            f"only {state.counted} of {state.target} episodes succeeded within {max_attempts} attempts "
            f"(collect.max_attempts_factor={c.max_attempts_factor}); kept in {data_dir}: {state.written} successful "
            f"and {state.failures_written} failed episodes, listed in manifest.partial.json"
        )
    if state.written == 0:  # (own labels only: every other collection writes what it counts)
        raise VlaDistError(f"none of the {state.counted} rollouts of {cfg.collect.relabel_policy} succeeded: "
                           "collect.labels=own keeps successes only, and there is nothing to imitate")
    manifest_path = _write_manifest(cfg, data_dir, records, state, frames_written, action_stats, state_stats, tasks)
    videos = write_videos(run_dir / "videos", video_samples, cfg)
    attempted = sum(state.attempts.values())
    succeeded = sum(state.successes.values())
    report = {
        "command": "collect",
        "episodes_written": state.written,
        "failures_written": state.failures_written,
        "attempts": attempted,
        "failures": attempted - succeeded,
        "success_rate": succeeded / max(attempted, 1),  # relabelled: the policy's, on these layouts
        "relabel_policy": cfg.collect.relabel_policy,
        "labels": cfg.collect.labels,  # "expert" whenever the expert drives (validated)
        "per_task": {
            task: {
                "attempts": state.attempts[task],
                "successes": state.successes[task],
                "success_rate": state.successes[task] / max(state.attempts[task], 1),
            }
            for task in tasks
        },
        "surplus_dropped": state.surplus,
        "frames_written": frames_written,
        "env_steps": env_steps,
        "wall_seconds": round(wall, 2),
        "collect_seconds": round(collect_wall, 2),
        "episodes_per_second": state.counted / max(collect_wall, 1e-9),
        "env_steps_per_second": env_steps / max(collect_wall, 1e-9),
        "shards": len(records),
        "dataset_bytes": sum(r.bytes for r in records),
        "num_actors": c.num_actors,
        "envs_per_actor": c.envs_per_actor,
        "actors": pool.infos,
        "actor_failures": stats.actor_failures,
        "chunks_retried": stats.chunks_retried,
        "failure_log": stats.failures,
        "data_dir": str(data_dir),
        "manifest": str(manifest_path),
        "videos": [str(v) for v in videos],
    }
    write_json(run_dir / "report.json", report)
    return report


def relabelling_source(cfg: RunConfig) -> PolicySource | None:
    """collect.relabel_policy as the actors' policy (run as `vla-dist eval` runs it: eval.action_horizon,
    eval.temporal_ensemble), labelled by the expert or (collect.labels=own) recording its own actions; or
    None for the expert's own demonstrations."""
    path = cfg.collect.relabel_policy
    if path is None:
        return None
    if not (Path(path) / "vla_dist.json").is_file():
        raise ConfigError("collect.relabel_policy", f"{path} is not a saved policy (no vla_dist.json): export a "
                          "checkpoint first (`vla-dist export`)")
    try:
        why = simulator_mismatch_of(path, cfg.sim.action_space)
    except PretrainedError as error:
        raise ConfigError("collect.relabel_policy", str(error)) from None
    if why:
        raise ConfigError("collect.relabel_policy", f"{path} was trained on {why}: it cannot drive this simulator")
    return model_source(cfg, path, relabel=cfg.collect.labels == "expert")


def _wants_video(chosen: list[dict[str, object]], outcome: EpisodeOutcome, tasks: list[str]) -> bool:
    """Spread videos over tasks: one per task first, then any."""
    shown = {json.loads(s["meta.json"])["task"] for s in chosen}
    return outcome.task not in shown or len(shown) == len(tasks)


def _write_manifest(
    cfg: RunConfig,
    data_dir: Path,
    records: list[ShardRecord],
    state: CollectionState,
    frames: int,
    action_stats: StatsAccumulator,
    state_stats: StatsAccumulator,
    tasks: list[str],
    complete: bool = True,
) -> Path:
    return write_manifest(
        data_dir,
        shards=records,
        episodes=state.written + state.failures_written,
        frames=frames,
        tasks={task: state.written_tasks[task] for task in tasks},
        action_space=ACTION_SPACES[cfg.sim.action_space],
        state_space=STATE_SPACE,
        action_stats=action_stats.result(),
        state_stats=state_stats.result(),
        cameras=list(cfg.task.cameras),
        image_size=cfg.task.image_size,
        image_codec=cfg.data.image_codec,
        fps=float(cfg.task.control_hz),
        extra={
            "complete": complete,
            "successful_episodes": sum(state.successes.values()) if state.write_every else state.written,
            "failed_episodes": state.failures_written,
            "stats_over": "every episode" if state.write_every else "successful episodes",
            "run_seed": cfg.run.seed,
            # the physics the actions were recorded under: `vla-dist replay` refuses other settings
            "sim": {"dt": cfg.sim.dt, "substeps": cfg.sim.substeps, "backend": cfg.sim.backend,
                    "action_space": cfg.sim.action_space},
            # what the cameras saw (camera placement and its per-episode jitter, lights, distractor)
            "appearance": appearance_of(cfg.sim, cfg.collect.camera_jitter, cfg.collect.light_jitter).to_dict(),
            # DART noise on the executed actions (the recorded ones are the expert's): replay re-applies it
            "action_noise": cfg.collect.action_noise,
            "paraphrases": list(cfg.task.paraphrases),  # the instruction phrasings drawn from ([]: all)
            # a policy's rollouts: the policy that drove the arm, and whose actions the episodes record:
            # "expert" (DAgger: the expert's labels of its states, not what executed; such a dataset cannot
            # be replayed) or "own" (its executed actions, its successes only)
            "relabel_policy": cfg.collect.relabel_policy,
            "labels": cfg.collect.labels,  # "expert" whenever the expert drives (validated)
            # every episode's object_pos.npy: what training's object head predicts (train.object_target)
            "object_pos": "red cube centre, m, world frame",
        },
    )


def _write_partial_manifest(cfg: RunConfig, data_dir: Path, records: list[ShardRecord], state: CollectionState) -> None:
    """After a failure: describe the shards that are complete so nothing written is orphaned."""
    if not records:
        return
    payload = {
        "complete": False,
        "shards": [r.to_dict() for r in records],
        "episodes": sum(r.episodes for r in records),
        "note": "collection stopped early; these shards are complete and readable",
    }
    write_json(data_dir / "manifest.partial.json", payload)
