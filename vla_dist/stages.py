"""Running one command as a stage of a larger plan (`vla-dist quickstart`, `vla-dist recipes run`).

A stage is a `vla-dist COMMAND` run in this process with its own `run.dir`, so it leaves exactly the
files the command leaves and the plan's printed command lines reproduce it alone. What makes plans
resumable lives here, once: a stage whose report.json says it finished is kept (not re-run), a train
or rl stage that stopped early (a signal, for a requeue) is run again and resumes from its own
checkpoint (dagger: from its last finished round), and a collect stage reuses a dataset that
already holds enough episodes. A stage holds a lock on what it writes while it decides and runs
(vla_dist/locks.py): two plans sharing a stage (the baseline's training, a dataset) never write it at
once; the second waits, then keeps the first's result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from vla_dist.config.load import save_resolved
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.locks import holding
from vla_dist.rollout.episodes import selected_tasks

REPORT = "report.json"
COMMANDS = ("collect", "select", "train", "rl", "dagger", "eval")

Log = Callable[[str], None]


def run_stage(command: str, cfg: RunConfig, log: Log,
              before_run: Callable[[], None] | None = None) -> tuple[dict[str, Any], float | None]:
    """(the stage's report, None) after running it; (its report, the seconds it took then) when an
    earlier run's result is kept (collect: a reused dataset this stage collected before; one collected
    elsewhere is timed like a run stage, the check that it holds enough episodes). `before_run` is
    called when the stage is about to run (a plan sets aside what was made from its earlier output)."""
    def waiting(path: Path) -> None:
        log(f"    another process is writing {path}: waiting for it to finish")

    with holding(stage_outputs(command, cfg), on_wait=waiting):
        kept = kept_stage(command, cfg, log)
        if kept is not None:
            return kept
        if before_run is not None:
            before_run()
        return _run(command, cfg, log), None


def kept_stage(command: str, cfg: RunConfig, log: Log) -> tuple[dict[str, Any], float | None] | None:
    """What `run_stage` returns when it would keep an earlier result instead of running; None when the
    stage would run (or resume: a train stage whose train.steps was raised runs again)."""
    if command not in COMMANDS:
        raise ValueError(f"a stage runs one of {COMMANDS}, got {command!r}")
    report_path = Path(cfg.run.dir) / REPORT
    if command == "collect":
        reused = existing_dataset(cfg)
        if reused is None:
            return None  # collect: the dataset decides, not a report
        _check_collected_alike(reused, cfg)
        log(f"    {cfg.data.dir} already holds {reused['episodes']} episodes: reusing it")
        earlier = read_report(report_path)  # this stage's own collection of that dataset, if it was one
        same = earlier is not None and Path(str(earlier.get("data_dir"))).resolve() == Path(cfg.data.dir).resolve()
        return ({"command": "collect", "reused": True, "episodes": reused["episodes"]},
                report_seconds(earlier) if same else None)
    report = read_report(report_path)
    if report is not None and _finished(command, report, cfg):
        log(f"    {report_path} exists: keeping it (delete {cfg.run.dir} to redo this stage)")
        return report, report_seconds(report)
    return None


def stage_outputs(command: str, cfg: RunConfig) -> list[Path]:
    """What a stage writes: its run.dir, and the dataset a collect or select stage makes."""
    outputs = [Path(cfg.run.dir)]
    if command in ("collect", "select"):
        outputs.append(Path(cfg.data.dir))
    return [path.absolute() for path in outputs]


def stage_inputs(command: str, cfg: RunConfig) -> list[Path]:
    """What a stage reads that another stage may have written: the policy it starts from or evaluates,
    the dataset it trains on (train, dagger) or chooses from (select)."""
    inputs = [cfg.model.pretrained, cfg.eval.checkpoint if command in ("eval", "select") else None]
    untrained = command == "eval" and cfg.eval.policy == "model" and not cfg.eval.checkpoint
    if command in ("train", "dagger") or untrained:  # (an untrained preset: the dataset's statistics)
        inputs.append(cfg.data.dir)
    if command == "select":
        inputs += [cfg.select.pool, *cfg.select.exclude, *cfg.select.keep]
    return [Path(path).absolute() for path in inputs if path]


class PlannedStage(Protocol):
    """What `dependents` reads of a plan's stage (quickstart.Stage, recipes.run.RecipeStage)."""

    command: str
    overrides: tuple[str, ...]
    made_earlier: tuple[str, ...]  # keys naming an earlier stage's output: nulled in the up-front config


def dependents(stages: Sequence[PlannedStage], configs: Sequence[RunConfig]) -> list[list[int]]:
    """For each stage of a plan, the later stages made from its output, directly or through another
    stage: an evaluation from its training, a second evaluation from the policy the first exported, an
    RL, DAgger or selection stage from a policy, a training from a collected or selected dataset.
    `configs`: the stages' up-front configs; the paths they null are read from the stages' overrides."""
    outputs = [stage_outputs(stage.command, cfg) for stage, cfg in zip(stages, configs, strict=True)]
    inputs = [stage_inputs(stage.command, cfg) + [Path(value).absolute() for key, _, value in
                                                  (o.partition("=") for o in stage.overrides)
                                                  if key in stage.made_earlier]
              for stage, cfg in zip(stages, configs, strict=True)]
    direct = [[j for j in range(i + 1, len(stages))
               if any(path == out or out in path.parents for path in inputs[j] for out in outputs[i])]
              for i in range(len(stages))]
    result: list[list[int]] = []
    for i in range(len(stages)):
        seen: set[int] = set()
        todo = list(direct[i])
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo.extend(direct[j])
        result.append(sorted(seen))
    return result


def set_aside_later(stages: Sequence[PlannedStage], configs: Sequence[RunConfig], later: Sequence[int],
                    log: Log) -> None:
    """`set_aside` every stage in `later` (indices of `stages`, e.g. one entry of `dependents`)."""
    for index in later:
        set_aside(stages[index].command, configs[index], log)


def set_aside(command: str, cfg: RunConfig, log: Log) -> None:
    """Move what a stage wrote to PATH.stale (replacing an older one), so that it runs again: it was
    made from an earlier stage's output that is being made anew. Moved, not deleted: nothing is lost."""
    import shutil

    for path in stage_outputs(command, cfg):
        if not path.exists():
            continue
        stale = path.with_name(path.name + ".stale")
        if stale.exists():
            shutil.rmtree(stale)
        path.rename(stale)
        log(f"    {path} was made from an output being redone: moved to {stale}")


def _run(command: str, cfg: RunConfig, log: Log) -> dict[str, Any]:
    if command == "collect":
        from vla_dist.rollout.collect import run_collect

        save_resolved(cfg, cfg.run.dir)
        return run_collect(cfg)
    if command == "train":
        from vla_dist.train import run_train

        return run_train(cfg)  # writes its config.yaml itself (after the resume checks)
    if command == "rl":
        from vla_dist.rl.loop import run_rl

        return run_rl(cfg)
    if command == "dagger":
        from vla_dist.dagger import run_dagger

        save_resolved(cfg, cfg.run.dir)
        return run_dagger(cfg, log)
    if command == "select":
        from vla_dist.select import run_select

        save_resolved(cfg, cfg.run.dir)
        return run_select(cfg, log)
    from vla_dist.rollout.evaluate import run_eval

    save_resolved(cfg, cfg.run.dir)
    return run_eval(cfg)


def _finished(command: str, report: dict[str, Any], cfg: RunConfig) -> bool:
    """A train or rl run stopped by a signal reports how far it got: resume it; one run to a smaller
    budget than asked (train.steps / rl.iterations raised since) continues too."""
    if command == "train":
        return report.get("last_step", report.get("steps")) == cfg.train.steps and not report.get("stopped_by")
    if command == "rl":
        return report.get("last_iteration") == cfg.rl.iterations and not report.get("stopped_by")
    if command == "dagger":
        return report.get("last_round") == cfg.dagger.rounds and not report.get("stopped_by")
    return True


def read_report(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def report_seconds(report: dict[str, Any] | None) -> float:
    """A stage's wall time as its command reported it (train, rl: wall_s; collect, eval: wall_seconds)."""
    report = report or {}
    return float(report.get("wall_s", report.get("wall_seconds")) or 0.0)


def _check_collected_alike(manifest: dict[str, Any], cfg: RunConfig) -> None:
    """A reused dataset must have been collected the way this stage would collect it: a recipe that
    changes collection (instruction phrasings, DART noise, appearance, action space, tasks) sharing
    another's data.dir would otherwise train on data it did not ask for."""
    from vla_dist.data.manifest import recorded_labels
    from vla_dist.sim.appearance import Appearance, appearance_of  # imports torch: not at module load
    from vla_dist.spaces import action_space_type

    extra = manifest.get("extra") or {}
    recorded = {"task.paraphrases": list(extra.get("paraphrases") or []),
                "collect.action_noise": float(extra.get("action_noise") or 0.0),
                "collect.relabel_policy": extra.get("relabel_policy"),
                "collect.labels": recorded_labels(manifest),
                "sim.action_space": action_space_type(manifest["action_space"]) if "action_space" in manifest
                else "ee_delta_pose"}
    wanted = {"task.paraphrases": list(cfg.task.paraphrases), "collect.action_noise": float(cfg.collect.action_noise),
              "collect.relabel_policy": cfg.collect.relabel_policy, "collect.labels": cfg.collect.labels,
              "sim.action_space": cfg.sim.action_space}
    # keys a dataset's manifest lacks (recorded before they existed) are the defaults it was collected with
    seen = {**Appearance().to_dict(), **(extra.get("appearance") or {})}
    for name, value in appearance_of(cfg.sim, cfg.collect.camera_jitter, cfg.collect.light_jitter).to_dict().items():
        key = f"collect.{name}" if name in ("camera_jitter", "light_jitter") else f"sim.{name}"
        recorded[key], wanted[key] = seen.get(name), value
    for key, value in wanted.items():
        if recorded[key] != value:
            raise ConfigError(key, f"{cfg.data.dir} was collected with {key}={recorded[key]}, this run asks for "
                              f"{value}: give it its own data.dir")
    tasks = set(selected_tasks(cfg.task.name))
    missing = tasks - set(manifest.get("tasks") or tasks)
    if missing:
        raise ConfigError("task.name", f"{cfg.data.dir} holds no episodes of {sorted(missing)}: give this run its "
                          "own data.dir")


def existing_dataset(cfg: RunConfig) -> dict[str, Any] | None:
    """data.dir's manifest when it holds at least collect.episodes episodes, else None."""
    from vla_dist.data.manifest import ManifestError, read_manifest

    try:
        manifest = read_manifest(cfg.data.dir)
    except (ManifestError, OSError):
        return None
    return dict(manifest) if int(manifest["episodes"]) >= cfg.collect.episodes else None
