"""`vla-dist train`: supervised post-training on a Ray group of DeepSpeed ranks.

The driver orchestrates only: it starts the ranks, asks them for a few steps at a time, writes
metrics.jsonl and the progress bar from rank 0's numbers, and turns "every rank saved" into a
COMPLETE marker + the `latest` pointer. Components: TrainerGroup (distributed/group.py), SFTWorker
(train/worker.py: engine, batches, steps), checkpoint/manager.py (layout, resume, prune),
StopRequest (train/stop.py: SIGUSR1/SIGTERM -> save a checkpoint at the current step, then stop).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vla_dist.checkpoint import manager as ckpt
from vla_dist.cluster.placement import TrainerPlacement
from vla_dist.config.load import save_resolved
from vla_dist.config.schema import RunConfig
from vla_dist.config.train_checks import eval_fit_message, global_batch_size
from vla_dist.data.manifest import ManifestError, read_manifest
from vla_dist.errors import ConfigError, VlaDistError
from vla_dist.spaces import action_space_type, simulator_mismatch
from vla_dist.train.evals import TrainingEvals, train_meta
from vla_dist.train.loggers import RunLoggers, check_loggers
from vla_dist.train.metrics import plot_loss
from vla_dist.train.stop import StoppedBySignal, StopRequest

if TYPE_CHECKING:
    from vla_dist.distributed.group import TrainerGroup
    from vla_dist.train.worker import SFTWorker

# Longest a chunk of steps asked of the ranks should last: the driver sees a stop request (SIGTERM:
# Kubernetes waits 30 s, docker stop 10 s before SIGKILL) only between chunks, and must still save.
STOP_CHECK_S = 2.0
PROGRESS_S = 1.0  # train.log_every=0: steps per driver round trip, by the last step's time
RESUME_HINT = "restart with train.resume=auto to continue from it"


def run_train(cfg: RunConfig, worker_cls: type[SFTWorker] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; the report `vla-dist train` prints. `worker_cls`: the rank actor,
    SFTWorker or a subclass of it (as bench/train.py's ranks take one)."""
    from vla_dist.runtime import init_ray

    t, run_dir = cfg.train, Path(cfg.run.dir)
    check_loggers(cfg)
    manifest = _manifest(cfg)
    global_batch = global_batch_size(t)
    resume = ckpt.resolve_resume(t.resume, run_dir)
    resume_mode = _check_resumable(cfg, resume)
    if resume is not None and resume_mode != "same":  # elastic: convert once, driver-side, before any rank
        from vla_dist.checkpoint.universal import ensure_universal, needs_conversion

        if needs_conversion(resume_mode):  # a stage-0 source is read from its own safetensors copy instead
            ensure_universal(resume)
    save_resolved(cfg, run_dir)
    env = init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    _check_fits(cfg)
    started = time.perf_counter()
    # SIGUSR1/SIGTERM (SLURM time limit, preemption, docker stop) only set stop.requested; the loop then
    # saves and returns. Installed after init_ray: ray.init sets its own SIGTERM handler (sys.exit).
    with StopRequest() as stop:
        # a lost rank's message names the checkpoint that is latest when the loss is found, not at start
        group, info = start_ranks(cfg, manifest, env, worker_cls, resume=resume, resume_mode=resume_mode,
                                  on_lost=lambda: ckpt.kept_message(run_dir, RESUME_HINT, "step 0"))
        loggers = evals = None
        finished = False
        try:
            setup_s = time.perf_counter() - started
            step = first_step = info["step"]
            loggers = RunLoggers(cfg, resumed_step=step)  # metrics.jsonl (+ TensorBoard, W&B)
            evals = TrainingEvals(cfg, manifest, loggers)  # train.eval_every: closed-loop evals on the side
            rows: list[dict[str, Any]] = []
            saved = step  # the checkpoint resumed from (or step 0, nothing to save): a stop there saves nothing
            with _progress() as progress:
                bar = progress.add_task("train", total=t.steps, completed=step, loss=float("nan"), rate=0.0, evals="")
                # a stop request is seen between chunks, so a chunk is also kept short (_steps_within)
                while step < t.steps and not stop.requested:
                    chunk = min(t.log_every or _steps_within(PROGRESS_S, rows), t.steps - step,
                                _steps_within(STOP_CHECK_S, rows),
                                evals.steps_to_next(step),
                                (t.save_every - step % t.save_every) if t.save_every else t.steps)
                    evals.poll()
                    eval_running = evals.running  # per row: measures what an eval costs the steps
                    got = group.run(lambda a, r, n=chunk: a.train.remote(n))[0]
                    if got and "stop" in got[-1]:
                        kept = ckpt.latest_checkpoint(run_dir)
                        raise VlaDistError(f"{t.max_nan_steps} non-finite losses in a row at step {got[-1]['step']}: "
                                           f"stopped; last good checkpoint kept: {kept or 'none (no save yet)'}")
                    for row in got:
                        row["elapsed_s"] = round(time.perf_counter() - started, 3)
                        if evals.every:
                            row["eval_running"] = eval_running
                        loggers.train(row)
                    rows += got
                    step = got[-1]["step"]
                    # keep_best ranks checkpoints by their eval: an eval step is then also a save step
                    save_due = (t.save_every and step % t.save_every == 0) or step == t.steps
                    if save_due or (evals.due(step) and t.keep_best):
                        _save(group, cfg, manifest, step, keep=evals.protected())
                        saved = step
                    if evals.due(step):
                        evals.start(group, step)  # the ranks export the weights; the eval runs meanwhile
                    evals.poll()
                    progress.update(bar, completed=step, loss=got[-1]["loss"], rate=got[-1]["samples_per_s"],
                                    evals=evals.label())
            if stop.requested and step > saved:  # save now, whole (COMPLETE + latest) like any other save
                _save(group, cfg, manifest, step, keep=evals.protected())
            finished = True
        finally:
            group.shutdown()  # first: the ranks' CPUs then serve the queued evals
            if evals is not None:  # queued evals are waited for, unless stopped or failed
                evals.finish(keep_waiting=lambda: finished and not stop.requested)
            if loggers is not None:
                loggers.close()
    # a signal that came after the last step changed nothing: the run is complete
    stopped_by = stop.signal_name if step < t.steps else None
    latest = ckpt.latest_checkpoint(run_dir)
    plot = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    step_times = sorted(row["step_time_s"] for row in rows[1:]) or [0.0]
    report = {
        "command": "train", "steps": t.steps, "first_step": first_step, "resumed_from": resume and str(resume),
        "world_size": t.world_size, "zero_stage": t.zero_stage, "lora": t.lora.enabled,
        "global_batch_size": global_batch, "trainable_parameters": info["trainable"],
        "parameters": info["parameters"], "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None, "median_step_s": step_times[len(step_times) // 2],
        "setup_s": round(setup_s, 2), "model_load": info["load"], "wall_s": round(time.perf_counter() - started, 2),
        "nan_skipped": sum(row.get("nan_skipped", 0) for row in rows),
        "checkpoint": latest and str(latest), "loss_png": str(plot), "rank_nodes": group.rank_nodes,
        "last_step": step, "stopped_by": stopped_by, **evals.summary(rows),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if stopped_by:
        message = (f"stopped by {stopped_by} at step {step} of {t.steps}; checkpoint kept: "
                   f"{latest or 'none (no step taken)'}; restart with train.resume=auto to continue from it")
        if stopped_by == "SIGTERM":  # exit 1: see StoppedBySignal (a supervisor must not count the run as done)
            raise StoppedBySignal(message, report)
        print(message, flush=True)  # SIGUSR1: the SLURM script asked, and requeues the job itself: exit 0
    return report


def start_ranks(cfg: RunConfig, manifest: dict[str, Any], env: dict[str, str], worker_cls: type | None = None, *,
                resume: Path | None = None, resume_mode: str = "same",
                on_lost: Callable[[], str] | None = None) -> tuple[TrainerGroup, dict[str, Any]]:
    """The ranks of `vla-dist train`, set up: `train.world_size` actors of `worker_cls` (SFTWorker or a
    subclass, as the benches use) in a TrainerGroup placed by `TrainerPlacement.from_train`, each given
    its rendezvous env on top of `env` (init_ray's, Ray being up) and DS_ACCELERATOR. Returns the group
    and rank 0's setup info (step, parameters, trainable), with each rank's parameter elements held
    and peak resident memory right after building the policy under "load"; a failed setup shuts the
    group down."""
    from vla_dist.distributed.group import TrainerGroup
    from vla_dist.train.worker import SFTWorker

    env = {**env, "DS_ACCELERATOR": "cuda" if cfg.train.gpus_per_rank else "cpu"}
    group = TrainerGroup(worker_cls or SFTWorker, TrainerPlacement.from_train(cfg.train), env=env, on_lost=on_lost)
    try:
        infos = group.run(lambda a, r: a.setup.remote(group.rank_envs[r], cfg, manifest, resume and str(resume),
                                                       resume_mode))
        info = {**infos[0], "load": {"held_elements": [i["load"]["held_elements"] for i in infos],
                                     "peak_rss_mb": [i["load"]["peak_rss_mb"] for i in infos]}}
    except BaseException:
        group.shutdown()
        raise
    return group, info


def _steps_within(seconds: float, rows: list[dict[str, Any]]) -> int:
    """How many steps fit in `seconds` at the last measured step time; 1 before any step is timed."""
    if not rows:
        return 1
    return max(1, int(seconds / max(rows[-1]["step_time_s"], 1e-6)))


def _save(group: Any, cfg: RunConfig, manifest: dict[str, Any], step: int, keep: list[Path]) -> Path:
    """`keep`: step dirs pruning must spare (their training-time eval is still running)."""
    t = cfg.train
    meta = train_meta(cfg, manifest, step)
    return ckpt.save_step(cfg.run.dir, step, lambda path: group.run(lambda a, r: a.save.remote(str(path), meta)),
                          {"world_size": t.world_size, "zero_stage": t.zero_stage, "lora": t.lora.enabled},
                          t.keep_last, keep=keep)


def _manifest(cfg: RunConfig) -> dict[str, Any]:
    try:
        manifest = read_manifest(cfg.data.dir)
    except (ManifestError, FileNotFoundError, OSError) as error:
        raise ConfigError("data.dir",
                          f"no readable dataset at {cfg.data.dir} ({error}); run vla-dist collect") from None
    why = simulator_mismatch(list(manifest["cameras"]), int(manifest["action_space"]["dim"]),
                             int(manifest["state_space"]["dim"]), action_space_type(manifest["action_space"]),
                             cfg.sim.action_space)
    if cfg.train.eval_every and why:
        raise ConfigError("train.eval_every", f"{cfg.data.dir} holds {why}: training-time evals run in that "
                          "simulator; set train.eval_every=0 and score checkpoints with eval.offline_data")
    _check_pretrained_fits(cfg, manifest)
    if cfg.train.object_target and not (manifest.get("extra") or {}).get("object_pos"):
        raise ConfigError("train.object_target", f"{cfg.data.dir} records no object positions (collected before "
                          "they were, or imported): collect it again with vla-dist collect, or set "
                          "train.object_target=0")
    if cfg.train.world_size > int(manifest["episodes"]):
        raise ConfigError("train.world_size", f"{cfg.train.world_size} ranks but {cfg.data.dir} holds "
                          f"{manifest['episodes']} episodes: every rank needs at least one")
    return dict(manifest)


def _check_pretrained_fits(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """model.pretrained (a vla-dist policy) acts in the dataset's spaces, or model.retarget says to learn
    them: checked from its vla_dist.json before Ray starts (the ranks load the weights)."""
    from vla_dist.models.build import RETARGET_HINT, pretrained_mismatch, spec_from
    from vla_dist.models.files import check_pretrained_dir, is_foundation_dir
    from vla_dist.models.policy import PolicySpec

    pretrained = cfg.model.pretrained
    if pretrained is None or is_foundation_dir(pretrained):
        if cfg.model.retarget:
            raise ConfigError("model.retarget", "re-targets a policy saved by vla-dist: set model.pretrained to one")
        return
    theirs = PolicySpec.from_dict(check_pretrained_dir(pretrained))  # (load_config checked the directory)
    why = pretrained_mismatch(theirs, spec_from(cfg.model, manifest))
    if why and not cfg.model.retarget:
        raise ConfigError("model.pretrained", f"{pretrained}: {why} {RETARGET_HINT}")


def _check_fits(cfg: RunConfig) -> None:
    """On the in-process Ray (a fixed size: nothing will join) a group that cannot fit would wait forever."""
    import ray

    if cfg.cluster.address is not None:
        return  # a cluster may autoscale: TrainerGroup waits, then fails naming the bundles
    t, offered = cfg.train, ray.cluster_resources()
    for name, need in (("CPU", t.world_size * t.cpus_per_rank), ("GPU", t.world_size * t.gpus_per_rank)):
        if need > offered.get(name, 0.0):
            raise ConfigError("train.world_size", f"{t.world_size} ranks need {need:g} {name} "
                              f"(train.cpus_per_rank/gpus_per_rank), the local Ray offers {offered.get(name, 0.0):g}")
    # the eval actors come on top: queued behind the ranks they would wait forever (an eval never ends)
    cpus_needed = t.world_size * t.cpus_per_rank + t.eval_actors * t.eval_cpus_per_actor
    if t.eval_every and cpus_needed > offered.get("CPU", 0.0):
        raise ConfigError("train.eval_actors", eval_fit_message(cfg, offered.get("CPU", 0.0)))


def _check_resumable(cfg: RunConfig, resume: Path | None) -> str:
    """-> how the ranks load `resume` (checkpoint/universal.py MODES): "same", "universal" (another
    world size), "by_hand" (another ZeRO stage) or "stage0" (a stage-0 checkpoint at another world
    size or stage). LoRA on/off must match."""
    if resume is None:
        return "same"
    from vla_dist.checkpoint.universal import resume_mode

    saved = json.loads((resume / ckpt.COMPLETE).read_text(encoding="utf-8"))
    if saved.get("lora") != cfg.train.lora.enabled:
        raise ConfigError("train.lora.enabled", f"{resume} was saved with lora={saved.get('lora')}, this run has "
                          f"{cfg.train.lora.enabled}: set train.resume=never or match the checkpoint")
    return resume_mode(saved, cfg.train.world_size, cfg.train.zero_stage)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} samples/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[evals]}"))
