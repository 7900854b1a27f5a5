"""`vla-dist recipes report`: recipes.{json,md,png} from the runs under recipes.dir.

Per recipe, evaluation variant and task: successes pooled over the seeds that finished (each seed's
held-out layouts are the same for every recipe), the 95% Wilson interval, each seed's own count, the
difference to the baseline, and the budget (samples trained, rollouts of RL or DAgger, wall time of the training
and evaluation stages). A difference is called an effect only when the two intervals do not overlap;
everything else is "not separated", reported all the same (a null result is a result).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vla_dist import atomic
from vla_dist.errors import VlaDistError
from vla_dist.rollout.evaluate import wilson_interval
from vla_dist.stages import read_report, report_seconds

ALL = "all"  # the row pooling every task of a multi-task evaluation


def write_report(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    comparison = read_report(root / "comparison.json")
    if comparison is None:
        raise VlaDistError(f"{root} holds no comparison.json: run `vla-dist recipes run NAME...` with "
                           f"recipes.dir={root} first")
    rows = collect_rows(root, comparison)
    if not rows:
        raise VlaDistError(f"no evaluation under {root} has finished yet: nothing to report")
    summary = {"baseline": comparison["baseline"], "seeds": comparison["seeds"], "evals": comparison["evals"],
               "rows": rows}
    atomic.write_text(root / "recipes.json", json.dumps(summary, indent=2) + "\n")
    atomic.write_text(root / "recipes.md", markdown(summary) + "\n")
    _plot(summary, root / "recipes.png")
    effects = [r for r in rows if r["effect"] in ("better", "worse") and r["task"] == ALL]
    return {"report": str(root / "recipes.md"), "plot": str(root / "recipes.png"), "rows": len(rows),
            "effects": len(effects)}


def collect_rows(root: Path, comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (eval variant, recipe, task) with at least one finished seed; the baseline first."""
    baseline = comparison["baseline"]
    names = [baseline, *(n for n in comparison["recipes"] if n != baseline)]
    rows: list[dict[str, Any]] = []
    for variant in comparison["evals"]:
        base_rows: dict[str, dict[str, Any]] = {}
        for name in names:
            for row in _recipe_rows(root, name, variant, comparison["seeds"], comparison["recipes"][name]):
                if name == baseline:
                    base_rows[row["task"]] = row
                reference = base_rows.get(row["task"])
                row.update(_against(row, reference) if name != baseline else {"delta": 0.0, "effect": "baseline"})
                rows.append(row)
    return rows


def _recipe_rows(root: Path, name: str, variant: str, seeds: list[int], recipe: dict[str, Any]) -> list[dict[str, Any]]:
    counts: dict[str, dict[int, tuple[int, int]]] = {}  # task -> seed -> (successes, episodes)
    budget = {"train_samples": 0, "rollout_episodes": 0, "wall_s": 0.0, "seeds_finished": []}
    for seed in seeds:
        here = root / name / f"seed_{seed}"
        evaluation = read_report(here / f"eval-{variant}" / "report.json")
        if evaluation is None:
            continue
        budget["seeds_finished"].append(seed)
        for task, stats in evaluation["per_task"].items():
            counts.setdefault(task, {})[seed] = (int(stats["successes"]), int(stats["episodes"]))
        budget["wall_s"] += report_seconds(evaluation)
        train, rl = read_report(here / "train" / "report.json"), read_report(here / "rl" / "report.json")
        dagger = read_report(here / "dagger" / "report.json")
        if train is not None:
            budget["train_samples"] += int(train["steps"]) * int(train["global_batch_size"])
            budget["wall_s"] += report_seconds(train)
        for post_training in (rl, dagger):  # their rollouts; DAgger's also its training on the labels
            if post_training is not None:
                budget["rollout_episodes"] += int(post_training.get("rollout_episodes") or 0)
                budget["train_samples"] += int(post_training.get("train_samples") or 0)
                budget["wall_s"] += report_seconds(post_training)
    pooled: dict[int, tuple[int, int]] = {}  # the row over every task; with one task, that task's
    for per_seed in counts.values():
        for seed, (wins, n) in per_seed.items():
            old = pooled.get(seed, (0, 0))
            pooled[seed] = (old[0] + wins, old[1] + n)
    per_task = counts if len(counts) > 1 else {}
    rows = []
    for task, per_seed in ({ALL: pooled, **per_task} if counts else {}).items():
        wins = sum(w for w, _ in per_seed.values())
        episodes = sum(n for _, n in per_seed.values())
        low, high = wilson_interval(wins, episodes)
        rows.append({"recipe": name, "eval": variant, "task": task, "successes": wins, "episodes": episodes,
                     "success_rate": round(wins / episodes, 4) if episodes else 0.0,
                     "ci95": [round(low, 4), round(high, 4)],
                     "per_seed": {str(seed): [w, n] for seed, (w, n) in sorted(per_seed.items())},
                     "start_from": recipe.get("start_from"), **budget})
    return rows


def _against(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Difference to the baseline's row of the same eval and task; an effect only when the intervals separate."""
    if base is None:
        return {"delta": None, "effect": "no baseline"}
    delta = round(row["success_rate"] - base["success_rate"], 4)
    if row["ci95"][0] > base["ci95"][1]:
        effect = "better"
    elif row["ci95"][1] < base["ci95"][0]:
        effect = "worse"
    else:
        effect = "not separated"
    return {"delta": delta, "effect": effect}


def markdown(summary: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [f"# Recipes against `{summary['baseline']}` (seeds {seeds})", "",
             ("Success pooled over seeds on held-out layouts (the same layouts for every recipe at a seed), "
             "95% Wilson interval, each seed's count, difference to the baseline. An effect is called only "
             "where the intervals do not overlap. A recipe continuing another's policy (from X) counts the "
             "samples and rollouts it added to X's.")]
    for variant in summary["evals"]:
        lines += ["", f"## eval: {variant}", "",
                  ("| recipe | task | success | 95% interval | per seed | vs baseline | effect | samples trained "
                  "| rollouts (rl, dagger) | wall (s) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in summary["rows"] if r["eval"] == variant):
            per_seed = ", ".join(f"{w}/{n}" for w, n in row["per_seed"].values())
            delta = "" if row["delta"] is None or row["effect"] == "baseline" else f"{row['delta']:+.0%}"
            name = row["recipe"] + (f" (from {row['start_from']})" if row.get("start_from") else "")
            lines.append(f"| {name} | {row['task']} | {row['successes']}/{row['episodes']} ({row['success_rate']:.0%}) "
                         f"| {row['ci95'][0]:.0%}-{row['ci95'][1]:.0%} | {per_seed} | {delta} | {row['effect']} "
                         f"| {row['train_samples']:,} | {row['rollout_episodes']} | {row['wall_s']:.0f} |")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["evals"]
    figure, axes = plt.subplots(1, len(variants), figsize=(1.2 + 4.2 * len(variants), 3.8), squeeze=False)
    for axis, variant in zip(axes[0], variants, strict=True):
        rows = [r for r in summary["rows"] if r["eval"] == variant and r["task"] == ALL]
        rates = [r["success_rate"] for r in rows]
        errors = [[rate - r["ci95"][0] for rate, r in zip(rates, rows, strict=True)],
                  [r["ci95"][1] - rate for rate, r in zip(rates, rows, strict=True)]]
        colours = ["#7f7f7f" if r["effect"] == "baseline" else {"better": "#2ca02c", "worse": "#d62728"}.get(
            r["effect"], "#4c72b0") for r in rows]
        axis.bar([r["recipe"] for r in rows], rates, yerr=errors, capsize=4, color=colours)
        if rows and rows[0]["effect"] == "baseline":
            axis.axhline(rows[0]["success_rate"], color="#7f7f7f", linestyle="--", linewidth=1)
        axis.set_ylim(0, 1.05)
        axis.set_title(f"eval: {variant} (success, 95% interval)")
        axis.tick_params(axis="x", labelrotation=25)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
