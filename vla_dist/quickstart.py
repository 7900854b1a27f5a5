"""`vla-dist quickstart`: the whole loop on one machine, as the separate commands a user would type.

    collect -> eval (expert, untrained) -> train full -> eval -> train LoRA -> eval -> summary

Every stage is one `vla-dist COMMAND --config FILE SIZING... OVERRIDES... STAGE-OVERRIDES` run in this
process (one Ray instance for all of them), each with its own `run.dir` under the quickstart's
`run.dir`, so every stage leaves the files its command leaves (report.json, videos, metrics,
checkpoints) and the printed commands reproduce any stage alone. SIZING (`SIZING` below) makes the
tiny default config a run that learns on 2 CPU cores: pick_cube with the sft-pick recipe's settings
(configs/recipe/sft-pick.yaml, docs/recipes.md) at a quickstart budget; the user's overrides come after
it and win. An existing dataset in `data.dir` with at least `collect.episodes` episodes is reused
rather than collected again, and a stage whose report exists is not re-run (delete its directory to
redo it): an interrupted quickstart picks up where it stopped.

The LoRA stage post-trains the full fine-tune's exported policy (`model.pretrained`) with adapters on
two ranks at ZeRO-2: the way LoRA is used on a pretrained checkpoint, not on a random init.

The summary (summary.json, summary.md, summary.png) compares success rate, its 95% interval and
the closest approach of the grasp point to the cube across the expert (the ceiling), the untrained
preset (the floor) and the two post-trained policies, on the same held-out layouts.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from vla_dist.config import load_config, validate
from vla_dist.config.load import save_resolved
from vla_dist.config.schema import RunConfig
from vla_dist.stages import dependents, run_stage, set_aside_later

# What turns the tiny CPU default (configs/quickstart.yaml) into a run whose policy learns a task within
# the quickstart's 20-30 minutes on 2 cores: the sft-pick recipe (configs/recipe/sft-pick.yaml, every
# setting measured in docs/recipes.md) with fewer steps at 32 px input. Applied before the user's
# overrides, which win.
SIZING: tuple[str, ...] = (
    "task.name=pick_cube",
    "collect.episodes=200", "collect.envs_per_actor=4",
    "model.state_inputs=[gripper_width]",  # the hand pose in the input lets it ignore the images
    # the 64 px frames resized to 32 px: steps take half the time and, at this budget, learn more
    # (2500 steps, same data: 18/20 held-out successes at 32 px, 7/20 at 64 px; docs/recipes.md)
    "model.image_size=32",
    "data.shuffle_buffer=8192", "data.num_workers=1", "data.random_shift=4",
    "train.steps=2500", "train.world_size=1", "train.cpus_per_rank=2", "train.zero_stage=1",
    "train.micro_batch_size=32", "train.warmup_steps=100", "train.save_every=500", "train.log_every=50",
    "eval.episodes=20", "eval.temporal_ensemble=0.01",
)


@dataclass(frozen=True)
class Stage:
    name: str  # also its directory under the quickstart's run.dir
    command: str  # collect | train | eval
    overrides: tuple[str, ...]  # after the user's: what makes the stage what it is
    label: str = ""  # row name in the summary (eval stages only)
    sizing: tuple[str, ...] = ()  # before the user's, after SIZING: this stage's budget
    # Keys whose override names an earlier stage's output (a training run, an export): nulled when
    # every stage's config is checked up front, before that output exists.
    made_earlier: tuple[str, ...] = ()


def plan(root: Path) -> list[Stage]:
    """The stages in order. The full fine-tune trains from scratch on one rank with both cores (faster
    than two ranks on 2 cores, docs/benchmarks.md); the LoRA stage adapts the full fine-tune's
    exported policy on 2 ranks at ZeRO-2. Eval of a training run exports its latest checkpoint."""
    return [
        Stage("collect", "collect", ()),
        Stage("eval-expert", "eval", ("eval.policy=expert",), "scripted expert (ceiling)"),
        Stage("eval-untrained", "eval", ("eval.policy=model", "eval.checkpoint=null"), "untrained preset"),
        Stage("train-full", "train", ("train.lora.enabled=false",)),
        Stage("eval-full", "eval", ("eval.policy=model", f"eval.checkpoint={root / 'train-full'}"), "full fine-tune",
              made_earlier=("eval.checkpoint",)),
        Stage("train-lora", "train", ("train.lora.enabled=true", f"model.pretrained={root / 'eval-full' / 'policy'}"),
              sizing=("train.steps=300", "train.world_size=2", "train.cpus_per_rank=1", "train.zero_stage=2",
                      "train.micro_batch_size=16", "train.lr=3e-4", "train.save_every=100"),
              made_earlier=("model.pretrained",)),  # the full fine-tune's export, made by eval-full
        Stage("eval-lora", "eval", ("eval.policy=model", f"eval.checkpoint={root / 'train-lora'}"),
              "LoRA on the full fine-tune", made_earlier=("eval.checkpoint",)),
    ]


def run_quickstart(config: str | None, overrides: Sequence[str], log: Callable[[str], None] = print) -> dict[str, Any]:
    base = validate(load_config(config, [*SIZING, *overrides]))  # a bad key fails here, before any stage runs
    root = Path(base.run.dir)
    stages = plan(root)

    def stage_config(stage: Stage, up_front: bool = False) -> RunConfig:
        # What a stage reads from an earlier one does not exist yet when every config is checked up
        # front: check the rest of the stage's config then, those paths when the stage starts.
        extra = [f"{key}=null" for key in stage.made_earlier] if up_front else []
        return validate(load_config(config, [*stage_overrides(stage, overrides, root), *extra]))

    configs = [stage_config(stage, up_front=True) for stage in stages]  # every bad config fails here, first
    after = dependents(stages, configs)  # what each stage's output makes later: set aside when it reruns
    save_resolved(base, root)
    started = time.perf_counter()
    reports: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    kept: list[str] = []
    for number, stage in enumerate(stages, 1):
        cfg = stage_config(stage)
        command = _command_line(config, overrides, stage, root)
        log(f"[{number}/{len(stages)}] {stage.name}: {command}")
        stage_started = time.perf_counter()
        reports[stage.name], kept_seconds = run_stage(
            stage.command, cfg, log, before_run=partial(set_aside_later, stages, configs, after[number - 1], log))
        if kept_seconds is None:
            seconds[stage.name] = round(time.perf_counter() - stage_started, 1)
        else:  # not run now: the time the run that made it took, from its own report
            seconds[stage.name] = round(kept_seconds, 1)
            kept.append(stage.name)
    from vla_dist.runtime import stop_command_ray

    stop_command_ray()  # the CLI's Ray: its actors' last log lines now, not amid the summary
    summary = _summarize(stages, reports, seconds, time.perf_counter() - started, _dataset_episodes(base), kept)
    _write_summary(root, summary)
    log(_markdown(summary))
    return {"command": "quickstart", "run_dir": str(root), "wall_s": summary["wall_s"],
            **{f"{row['name']}_success_rate": row["success_rate"] for row in summary["policies"]},
            "summary": str(root / "summary.md"), "summary_png": str(root / "summary.png")}


def _dataset_episodes(cfg: RunConfig) -> int:
    """Episodes in the dataset the stages used, from its manifest: the same whether the collect
    stage wrote it or reused it (their reports differ)."""
    from vla_dist.data.manifest import read_manifest

    return int(read_manifest(cfg.data.dir)["episodes"])


def stage_overrides(stage: Stage, overrides: Sequence[str], root: Path) -> list[str]:
    """SIZING, the stage's budget, the user's overrides (they win over both), what makes the stage
    what it is, and its run.dir (which replaces the user's)."""
    kept = [o for o in overrides if not o.replace(" ", "").startswith("run.dir=")]
    return [*SIZING, *stage.sizing, *kept, *stage.overrides, f"run.dir={root / stage.name}"]


def _command_line(config: str | None, overrides: Sequence[str], stage: Stage, root: Path) -> str:
    words = ["vla-dist", stage.command, *(["--config", config] if config else []),
             *stage_overrides(stage, overrides, root)]
    return shlex.join(words)


def _summarize(stages: list[Stage], reports: dict[str, dict[str, Any]], seconds: dict[str, float],
               wall_s: float, dataset_episodes: int, kept: Sequence[str] = ()) -> dict[str, Any]:
    rows = []
    for stage in stages:
        if stage.command != "eval":
            continue
        report = reports[stage.name]
        rows.append({
            "name": stage.name.removeprefix("eval-"), "label": stage.label, "episodes": report["episodes"],
            "successes": report["successes"], "success_rate": report["success_rate"], "ci95": report["ci95"],
            "closest_approach_cm": report.get("closest_approach_cm"),
            "per_task": {task: stats["success_rate"] for task, stats in report["per_task"].items()},
        })
    training = {}
    for name in ("train-full", "train-lora"):
        report = reports[name]
        training[name.removeprefix("train-")] = {
            key: report.get(key) for key in ("steps", "first_loss", "final_loss", "trainable_parameters",
                                             "parameters", "world_size", "zero_stage", "checkpoint", "loss_png")
        }
    # stage_seconds: the stages kept from an earlier run (kept_stages) count the time they took then;
    # wall_s is this run's
    return {"policies": rows, "training": training, "stage_seconds": seconds, "kept_stages": list(kept),
            "wall_s": round(wall_s, 1), "dataset_episodes": dataset_episodes}


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["| policy | success | 95% interval | closest approach (cm) | per task |", "|---|---|---|---|---|"]
    for row in summary["policies"]:
        low, high = row["ci95"]
        per_task = ", ".join(f"{task} {rate:.0%}" for task, rate in row["per_task"].items())
        closest = "n/a" if row["closest_approach_cm"] is None else f"{row['closest_approach_cm']:.1f}"
        lines.append(f"| {row['label']} | {row['successes']}/{row['episodes']} ({row['success_rate']:.0%}) | "
                     f"{low:.0%}-{high:.0%} | {closest} | {per_task} |")
    lines += ["", "| training | steps | loss first -> last | trainable / all parameters |", "|---|---|---|---|"]
    for name, t in summary["training"].items():
        share = t["trainable_parameters"] / t["parameters"] if t["parameters"] else 0.0
        lines.append(f"| {name} | {t['steps']} | {t['first_loss']:.3f} -> {t['final_loss']:.3f} | "
                     f"{t['trainable_parameters']:,} / {t['parameters']:,} ({share:.0%}) |")
    full = summary["training"].get("full")
    if full and full["parameters"] and full["trainable_parameters"] < full["parameters"]:
        frozen = full["parameters"] - full["trainable_parameters"]
        lines.append(f"\nThe full fine-tune leaves {frozen:,} parameters ({frozen / full['parameters']:.0%}) frozen on "
                     "purpose: weights the model never reads or whose outputs it discards (pi0: the action expert's "
                     "copy of the vocabulary embedding, the backbone's last layer past its K/V); LoRA trains only "
                     "its adapters.")
    kept = set(summary.get("kept_stages", ()))
    lines.append(f"\nwall time {summary['wall_s']:.0f} s; per stage (s): "
                 + ", ".join(f"{k} {v:.0f}" + (" (kept from an earlier run)" if k in kept else "")
                             for k, v in summary["stage_seconds"].items()))
    return "\n".join(lines)


def _write_summary(root: Path, summary: dict[str, Any]) -> None:
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (root / "summary.md").write_text("# vla-dist quickstart\n\n" + _markdown(summary) + "\n", encoding="utf-8")
    _plot(summary, root / "summary.png")


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["policies"]
    labels = [row["label"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    rates = [row["success_rate"] for row in rows]
    errors = [[rate - row["ci95"][0] for rate, row in zip(rates, rows, strict=True)],
              [row["ci95"][1] - rate for rate, row in zip(rates, rows, strict=True)]]
    left.bar(labels, rates, yerr=errors, capsize=4, color="#4c72b0")
    left.set_ylim(0, 1.05)
    left.set_title("success rate (95% Wilson interval)")
    right.bar(labels, [row["closest_approach_cm"] or 0.0 for row in rows], color="#dd8452")
    right.set_title("closest grasp point to cube (cm, lower is better)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
