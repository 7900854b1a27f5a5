"""Training-time closed-loop evals (train.eval_every): success rates while `vla-dist train` runs.

At an eval step the ranks write the current weights to run.dir/evals/step_N/weights
(SFTWorker.export_policy: the only time the ranks stop for an eval) and go on training. The
driver hands that directory to `EvalRunner`, a Ray actor (0 CPUs) that owns a pool of
`train.eval_actors` sim actors for the whole run and evaluates one step after another, like
`vla-dist eval` does (same seeds every time, so evals of a run score the same layouts). Results
come back between chunks of steps (`TrainingEvals.poll`): a row in metrics.jsonl (success rate
overall and per task, Wilson 95% interval, episode counts), TensorBoard/W&B, and with
train.keep_best the checkpoints/best pointer. Evals queue when they take longer than eval_every
steps; the run waits for the queue at the end (not after a stop signal: those are abandoned).

On a small machine the eval actors compete with the ranks for cores: the Ray CPUs they reserve
(train.eval_cpus_per_actor) are not the ranks', so steps slow down only when the machine has fewer
cores than reserved CPUs; each metrics row says whether an eval was running (`eval_running`) so
the slowdown is measurable (report.json: median step time with and without).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from vla_dist.atomic import write_json
from vla_dist.checkpoint import manager as ckpt
from vla_dist.config.schema import RunConfig
from vla_dist.train.loggers import RunLoggers
from vla_dist.train.metrics import read_metrics

EVALS_DIR = "evals"
CURRENT = "current_policy"  # what every eval actor loads; rewritten before each eval
ROW_KEYS = ("step", "success_rate", "ci95", "episodes", "successes", "closest_approach_cm", "mean_length")


def train_meta(cfg: RunConfig, manifest: dict[str, Any], step: int) -> dict[str, Any]:
    """What rebuilding the policy needs (checkpoints' train_meta.json; a LoRA eval's base)."""
    t = cfg.train
    return {"step": step, "seed": cfg.run.seed, "model": asdict(cfg.model), "lora": asdict(t.lora),
            "manifest": manifest, "world_size": t.world_size, "zero_stage": t.zero_stage}


def eval_score(row: dict[str, Any]) -> tuple[float, float]:
    """How keep_best ranks evals: success rate, then (ties: 0% early on, or few episodes) the
    closest approach of the grasp point to the cube, closer being better."""
    approach = row.get("closest_approach_cm")
    return float(row["success_rate"]), -float(approach) if approach is not None else float("-inf")


class EvalRunner:
    """Ray actor: one training-time eval at a time on a sim-actor pool built at the first eval."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.pool = cfg, None
        self.root = Path(cfg.run.dir) / EVALS_DIR

    def evaluate(self, step: int, weights: str, meta: dict[str, Any]) -> dict[str, Any]:
        from vla_dist.data.codec import decode_frames
        from vla_dist.data.video import tile_cameras
        from vla_dist.rollout.evaluate import (
            decode_summary,
            eval_requests,
            pick_videos,
            run_requests,
            success_summary,
        )
        from vla_dist.rollout.output import write_videos

        cfg, started = self.cfg, time.perf_counter()
        _install_policy(Path(weights), meta, self.root / CURRENT)
        self._pool_ready()
        tasks, requests = eval_requests(cfg, cfg.train.eval_episodes or cfg.eval.episodes)
        tally, stats = run_requests(self.pool, requests, cfg.collect.envs_per_actor)
        ordered = tally.ordered()
        out = self.root / f"step_{step}"
        picked = pick_videos(ordered, cfg.eval.num_videos)
        paths = write_videos(out / "videos", picked, cfg, label_outcome=True)
        report = {"step": step, **success_summary(ordered, tasks), **decode_summary(tally, cfg.model.compile),
                  "eval_wall_s": round(time.perf_counter() - started, 2), "actor_failures": stats.actor_failures,
                  "videos": [str(p) for p in paths]}
        write_json(out / "report.json", report)
        shutil.rmtree(weights, ignore_errors=True)
        frames = [tile_cameras({cam: decode_frames(s[f"{cam}.{cfg.data.image_codec}"], cfg.data.image_codec)
                                for cam in cfg.task.cameras}) for s in picked]
        fps = float(cfg.task.control_hz)
        report["video_frames"] = [(p.stem, f, fps, str(p)) for p, f in zip(paths, frames, strict=True)]
        return report

    def _pool_ready(self) -> None:
        """Build the pool once; later evals make its actors reload CURRENT (scenes stay built)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        from vla_dist.cluster.placement import ActorPlacement
        from vla_dist.rollout.policies import PolicySource
        from vla_dist.rollout.pool import SimActorPool

        cfg = self.cfg
        if self.pool is None:
            source = PolicySource(kind="model", path=str(self.root / CURRENT), action_horizon=cfg.eval.action_horizon,
                                  temporal_ensemble=cfg.eval.temporal_ensemble, cameras=tuple(cfg.task.cameras),
                                  compile=cfg.model.compile)
            kwargs = {"task": cfg.task, "sim": cfg.sim, "n_envs": cfg.collect.envs_per_actor,
                      "image_codec": cfg.data.image_codec, "policy": source}
            # the collect pool's placement (memory, custom resources), with the eval actors' own CPUs
            placement = replace(ActorPlacement.from_collect(cfg.collect),
                                num_cpus=cfg.train.eval_cpus_per_actor)
            self.pool = SimActorPool(cfg.train.eval_actors, kwargs, placement, cfg.collect.max_actor_restarts)
            return
        for actor in self.pool.actors:
            try:
                ray.get(actor.reload_policy.remote())
            except (RayActorError, ActorUnavailableError):
                pass  # dead or restarting: a restarted actor loads CURRENT itself; the pool re-queues its work

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _install_policy(weights: Path, meta: dict[str, Any], current: Path) -> None:
    """The ranks' export -> a plain policy directory at `current`. LoRA: the adapter merged into the
    base rebuilt as training built it (done here, off the ranks)."""
    shutil.rmtree(current, ignore_errors=True)
    if not (weights / "adapter").is_dir():
        shutil.move(str(weights), current)
        return
    from peft import PeftModel

    from vla_dist.checkpoint.export import rebuild_policy

    policy = rebuild_policy(meta)
    policy.hf_model = PeftModel.from_pretrained(policy.hf_model, str(weights / "adapter")).merge_and_unload()
    policy.save_pretrained(current)


class TrainingEvals:
    """The driver's side: start evals at their steps, collect results, keep the best checkpoint."""

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any], loggers: RunLoggers) -> None:
        import ray

        self.cfg, self.manifest, self.loggers = cfg, manifest, loggers
        self.run_dir, self.every = Path(cfg.run.dir), cfg.train.eval_every
        self.pending: dict[Any, int] = {}  # ObjectRef -> step
        self.rows: list[dict[str, Any]] = []
        self.export_s: dict[int, float] = {}  # step -> seconds the ranks spent writing its weights
        self.errors: list[str] = []
        self.runner = ray.remote(num_cpus=0, max_restarts=0)(EvalRunner).remote(cfg) if self.every else None
        self.best = ckpt.best_checkpoint(self.run_dir) if cfg.train.keep_best else None
        earlier = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if "success_rate" in r]
        self.best_score = max((eval_score(r) for r in earlier if self.best and r["step"] == ckpt.step_of(self.best)),
                              default=(-1.0, float("-inf")))

    @property
    def running(self) -> bool:
        return bool(self.pending)

    def steps_to_next(self, step: int) -> int:
        return self.every - step % self.every if self.every else self.cfg.train.steps

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.cfg.train.steps)

    def protected(self) -> list[Path]:
        """Checkpoints still waiting for their eval: keep_best may yet point at them."""
        return [ckpt.step_dir(self.run_dir, step) for step in self.pending.values()]

    def start(self, group: Any, step: int) -> None:
        """Stops the ranks only for the export; the eval itself runs on the EvalRunner's pool."""
        weights = self.run_dir / EVALS_DIR / f"step_{step}" / "weights"
        shutil.rmtree(weights, ignore_errors=True)
        weights.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        group.run(lambda a, r: a.export_policy.remote(str(weights)))
        self.export_s[step] = time.perf_counter() - started
        meta = train_meta(self.cfg, self.manifest, step)
        self.pending[self.runner.evaluate.remote(step, str(weights), meta)] = step

    def poll(self, timeout: float = 0.0) -> None:
        """Log every eval that has finished (waiting up to `timeout` s for them)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not self.pending:
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in done:
            step = self.pending.pop(ref)
            try:
                report = ray.get(ref)
            except (RayTaskError, RayActorError) as error:  # training goes on; report.json lists it
                self.errors.append(f"eval at step {step}: {str(error).strip().splitlines()[-1][:300]}")
                print(f"warning: training-time {self.errors[-1]}", flush=True)
                continue
            self._record(step, report)

    def _record(self, step: int, report: dict[str, Any]) -> None:
        row = {k: report[k] for k in ROW_KEYS}
        row["per_task"] = {task: {k: stats[k] for k in ("success_rate", "ci95", "episodes", "successes",
                                                         "closest_approach_cm", "failures_closest_goal_cm")}
                           for task, stats in report["per_task"].items()}
        row.update(export_s=round(self.export_s[step], 3), eval_wall_s=report["eval_wall_s"],
                   decode_ms_per_chunk=report["decode_ms_per_chunk"])
        self.rows.append(row)
        self.loggers.eval(row, report["video_frames"])
        path = ckpt.step_dir(self.run_dir, step)
        if self.cfg.train.keep_best and ckpt.is_complete(path) and eval_score(row) > self.best_score:
            ckpt.mark_best(path)
            self.best, self.best_score = path, eval_score(row)
            ckpt.prune(self.run_dir, self.cfg.train.keep_last, keep=self.protected())  # the former best may go

    def label(self) -> str:
        """The progress bar's eval column."""
        last = self.rows[-1] if self.rows else None
        text = f"success {last['success_rate']:.0%} @{last['step']}" if last else ""
        if self.pending:
            text += f" (eval @{min(self.pending.values())} running)"
        return text.strip()

    def finish(self, keep_waiting: Callable[[], bool]) -> None:
        """Wait for queued evals while `keep_waiting()` (False: a stop signal came, or the run
        failed), then stop the runner and its pool."""
        shown = None
        while self.pending and keep_waiting():
            if shown != min(self.pending.values()):
                shown = min(self.pending.values())
                print(f"training done; waiting for the eval of step {shown} ({len(self.pending)} queued)", flush=True)
            self.poll(timeout=1.0)
        self.close()
        if self.cfg.train.keep_best:
            ckpt.prune(self.run_dir, self.cfg.train.keep_last)

    def close(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if self.runner is not None:
            if not self.pending:  # a busy runner (evals abandoned after a stop signal) is just killed:
                with contextlib.suppress(RayError, GetTimeoutError):  # its sim actors are owned by it and go too
                    ray.get(self.runner.shutdown.remote(), timeout=30)
            ray.kill(self.runner, no_restart=True)
            self.runner, self.pending = None, {}

    def summary(self, train_rows: list[dict[str, Any]]) -> dict[str, Any]:
        """report.json's view of the run's evals, with what they cost the trainer: the ranks' export
        time, and the median step time while an eval ran against without (cores shared)."""
        if not self.every:
            return {}
        last = self.rows[-1] if self.rows else None
        return {"evals": len(self.rows), "eval_errors": self.errors,
                "median_step_s_eval_running": median_step_s(train_rows, True),
                "median_step_s_no_eval": median_step_s(train_rows, False),
                "eval_export_s_total": round(sum(self.export_s.values()), 3),
                "final_success_rate": last and last["success_rate"], "final_success_ci95": last and last["ci95"],
                "best_checkpoint": self.best and str(self.best),
                "best_step": self.best and ckpt.step_of(self.best),
                "best_success_rate": self.best and self.best_score[0]}


def median_step_s(rows: list[dict[str, Any]], eval_running: bool) -> float | None:
    times = [r["step_time_s"] for r in rows[1:] if bool(r.get("eval_running")) == eval_running]
    return float(np.median(times)) if times else None
