"""`vla-dist dagger`: expert-in-the-loop post-training (DAgger, Ross et al. 2011) from model.pretrained.

A policy trained on demonstrations only ever saw the expert's states; its own small errors take it
where no demonstration went, and nothing there tells it how to come back. DAgger collects those
states and asks the expert. Each of dagger.rounds rounds:

    round_R/collect, round_R/labels   the current policy drives dagger.episodes_per_round episodes (as
                                      `vla-dist eval` runs it) on layouts of their own seed stream, and
                                      the scripted expert, following the state, labels every step
                                      (`vla-dist collect collect.relabel_policy=...`, every episode kept)
    round_R/data                      the aggregate: data.dir's demonstrations and every round's labels
    round_R/train                     the policy continues on the aggregate for dagger.train_steps
                                      (`vla-dist train model.pretrained=...`)
    round_R/policy                    its export: the next round's policy; run.dir/policy is the last

With dagger.labels=own the expert labels nothing: a round keeps the policy's own executed actions in
its successful rollouts (self-imitation, as rejection-sampling fine-tuning does for language models:
the reward filters the policy's own behaviour and the flow-matching or token loss imitates what
passed), the same rollouts and steps as DAgger at no expert cost.

The rollouts are the round's policy on layouts it never trained on, so their success (report.json,
dagger.png) is the learning curve, measured at no extra simulation. A finished round is kept; a
stopped one resumes (complete labels are reused, training resumes from its checkpoint).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from vla_dist import atomic
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.rollout.episodes import dagger_seed
from vla_dist.stages import Log, existing_dataset, read_report, run_stage

POLICY = "policy"


def run_dagger(cfg: RunConfig, log: Log = print) -> dict[str, Any]:
    from vla_dist.data.aggregate import aggregate_datasets
    from vla_dist.rollout.collect import run_collect

    _check_start(cfg)
    root, d = Path(cfg.run.dir), cfg.dagger
    root.mkdir(parents=True, exist_ok=True)
    policy = Path(cfg.model.pretrained or "")
    rounds: list[dict[str, Any]] = []
    earlier = {row["round"]: row for row in (read_report(root / "report.json") or {}).get("rounds", [])}
    for number in range(1, d.rounds + 1):
        here = root / f"round_{number}"
        if number in earlier and (here / POLICY / "vla_dist.json").is_file():  # its row keeps its measured wall time
            log(f"round {number}/{d.rounds}: finished before, keeping it ({here})")
            rounds.append(earlier[number])
            policy = here / POLICY
            continue
        round_started = time.perf_counter()
        collect_cfg = _round_config(cfg, here / "collect", here / "labels")
        collect_cfg.collect.episodes = d.episodes_per_round
        collect_cfg.collect.relabel_policy = str(policy)
        collect_cfg.collect.labels = d.labels
        labels = _reused_labels(collect_cfg)
        if labels is None:
            labelled_by = "labelled by the expert" if d.labels == "expert" else "its successes kept as they ran"
            log(f"round {number}/{d.rounds}: {d.episodes_per_round} rollouts of {policy}, {labelled_by}")
            collect_cfg.collect.overwrite = True  # an interrupted round's partial labels are redone
            labels = run_collect(collect_cfg, seed_of=partial(dagger_seed, cfg.run.seed, number),
                                 id_prefix=f"dagger{number}-")  # ids apart from the demonstrations' in the aggregate
        aggregate = aggregate_datasets(here / "data", [cfg.data.dir, *(root / f"round_{k}" / "labels"
                                                                      for k in range(1, number + 1))])
        train_cfg = _round_config(cfg, here / "train", here / "data")
        train_cfg.model.pretrained = str(policy)
        train_cfg.train.steps = d.train_steps
        train_cfg.train.eval_every = 0  # the next round's rollouts measure this round's policy
        log(f"round {number}/{d.rounds}: training {d.train_steps} steps on {aggregate['episodes']} episodes")
        trained, _ = run_stage("train", train_cfg, log)
        if trained.get("stopped_by"):
            return _report(cfg, rounds, stopped_by=str(trained["stopped_by"]))
        policy = _export(here / "train", here / POLICY, cfg.train.lora.enabled)
        successes = sum(int(stats["successes"]) for stats in labels["per_task"].values())
        episodes = int(labels["attempts"])
        rounds.append({
            "round": number, "rollouts": episodes, "successes": successes, "success_rate": successes / episodes,
            "labelled_frames": int(labels["frames_written"]), "episodes_added": int(labels["episodes_written"]),
            "aggregate_episodes": int(aggregate["episodes"]),
            "train_steps": int(trained["steps"]),
            "train_samples": int(trained["steps"]) * int(trained["global_batch_size"]),
            "wall_s": round(time.perf_counter() - round_started, 1),
        })
        _report(cfg, rounds)
    final = root / POLICY
    if final.is_symlink() or final.exists():
        final.unlink()
    final.symlink_to(policy.relative_to(root))
    return _report(cfg, rounds)


def _check_start(cfg: RunConfig) -> None:
    """Fail before any actor or rank starts: a saved policy to start from and the demonstrations."""
    pretrained = cfg.model.pretrained
    if not pretrained or not (Path(pretrained) / "vla_dist.json").is_file():
        raise ConfigError("model.pretrained", f"dagger continues a saved policy (an export with vla_dist.json), "
                          f"got {pretrained!r}: train on demonstrations first and `vla-dist export` it")
    if not (Path(cfg.data.dir) / "manifest.json").is_file():
        raise ConfigError("data.dir", f"{cfg.data.dir} holds no dataset: DAgger aggregates its labels with the "
                          "demonstrations the policy was trained on")


def _round_config(cfg: RunConfig, run_dir: Path, data_dir: Path) -> RunConfig:
    """This command's config with a stage's run.dir and data.dir (copied: the rounds change keys)."""
    stage = copy.deepcopy(cfg)
    stage.run.dir, stage.data.dir = str(run_dir), str(data_dir)
    return stage


def _reused_labels(cfg: RunConfig) -> dict[str, Any] | None:
    """The round's collect report when its labels are complete (a resumed run), else None."""
    report_path = Path(cfg.run.dir) / "report.json"
    manifest = existing_dataset(cfg)
    if manifest is None or not report_path.is_file():
        return None
    from vla_dist.data.manifest import recorded_labels

    recorded = ((manifest.get("extra") or {}).get("relabel_policy"), recorded_labels(manifest))
    if recorded != (cfg.collect.relabel_policy, cfg.collect.labels):
        return None
    return json.loads(report_path.read_text(encoding="utf-8"))


def _export(train_dir: Path, out: Path, lora: bool) -> Path:
    """The round's latest checkpoint as a saved policy, written aside and renamed: a kill mid-export
    leaves no directory that looks finished."""
    from vla_dist.checkpoint.export import export_checkpoint

    if (out / "vla_dist.json").is_file():
        return out
    partial_dir = out.with_name(out.name + ".partial")
    shutil.rmtree(partial_dir, ignore_errors=True)
    export_checkpoint(train_dir, partial_dir, merge_lora=lora)
    os.replace(partial_dir, out)
    return out


def _report(cfg: RunConfig, rounds: list[dict[str, Any]], stopped_by: str | None = None) -> dict[str, Any]:
    from vla_dist.rollout.evaluate import wilson_interval

    root = Path(cfg.run.dir)
    for row in rounds:
        row["ci95"] = list(wilson_interval(row["successes"], row["rollouts"]))
    report = {
        "command": "dagger", "labels": cfg.dagger.labels, "rounds": rounds,
        "last_round": rounds[-1]["round"] if rounds else 0,
        "rounds_asked": cfg.dagger.rounds, "start_policy": cfg.model.pretrained,
        "policy": str(root / POLICY) if len(rounds) == cfg.dagger.rounds else None,
        "rollout_episodes": sum(r["rollouts"] for r in rounds),
        "labelled_frames": sum(r["labelled_frames"] for r in rounds),
        "train_samples": sum(r["train_samples"] for r in rounds),
        # the rounds' own measured times (a resumed run keeps the finished rounds' rows)
        "wall_s": round(sum(r["wall_s"] for r in rounds), 1), "stopped_by": stopped_by,
        "plot": str(root / "dagger.png"),
    }
    atomic.write_text(root / "report.json", json.dumps(report, indent=2) + "\n")
    _plot(rounds, root / "dagger.png", "DAgger" if cfg.dagger.labels == "expert" else "Self-imitation")
    return report


def _plot(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    """The rollouts' success per round (the policy each round starts with), with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r["round"] for r in rounds]
    ys = [100 * r["success_rate"] for r in rounds]
    errors = [[100 * (r["success_rate"] - r["ci95"][0]) for r in rounds],
              [100 * (r["ci95"][1] - r["success_rate"]) for r in rounds]]
    ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3)
    ax.set_xlabel("round (its rollouts run the policy it starts with)")
    ax.set_ylabel("rollout success (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(xs)
    ax.set_title(f"{title}: success of each round's rollouts, 95% Wilson")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
