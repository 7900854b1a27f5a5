"""`vla-dist recipes report`: recipes.{json,md,png} from the runs under recipes.dir.

Per recipe, evaluation variant and task: successes pooled over the seeds that finished (each seed's
held-out layouts are the same for every recipe), the 95% Wilson interval, each seed's own count, the
difference to the baseline and to the recipe's control (recipes.control), and the budget (samples
trained, rollouts of RL or DAgger, wall time of the training and evaluation stages). A difference is
called an effect only when the two intervals do not overlap; everything else is "not separated",
reported all the same (a null result is a result).
"""

from __future__ import annotations

import json
import math
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
    first = comparison["evals"][0]
    firsts: dict[tuple[str, str], dict[str, Any]] = {}  # (recipe, task) -> its row on the first eval
    for variant in comparison["evals"]:
        base_rows: dict[str, dict[str, Any]] = {}
        for name in names:
            for row in _recipe_rows(root, name, variant, comparison["seeds"], comparison["recipes"][name]):
                if name == baseline:
                    base_rows[row["task"]] = row
                reference = base_rows.get(row["task"])
                if reference is not None and name != baseline and reference["seeds_finished"] != row["seeds_finished"]:
                    # a recipe run at fewer seeds is compared with the baseline at the same seeds
                    same_seeds = _recipe_rows(root, baseline, variant, row["seeds_finished"],
                                              comparison["recipes"][baseline])
                    reference = next((r for r in same_seeds if r["task"] == row["task"]), None)
                if reference is not None and reference["tasks"] != row["tasks"]:
                    reference = None  # a pooled row of other tasks (task-push-stack against a pick baseline)
                row.update(_against(row, reference) if name != baseline else {"delta": 0.0, "effect": "baseline"})
                # the same layouts, episode by episode: against the baseline in this scene, and against
                # this recipe on the first eval (what a perturbed scene costs it)
                row["paired_vs_baseline"] = _paired(reference, row) if name != baseline else None
                if variant == first:
                    firsts[(name, row["task"])] = row
                row[f"paired_vs_{first}"] = _paired(firsts.get((name, row["task"])), row) if variant != first else None
                rows.append(row)
    for row in rows:
        row["vs_control"] = _against_control(row, rows, comparison["recipes"][row["recipe"]].get("control"))
    for row in rows:
        row.pop("_outcomes")
    return rows


def _against_control(row: dict[str, Any], rows: list[dict[str, Any]], control: str | None) -> dict[str, Any] | None:
    """The row against its recipe's control (recipes.control) in the same eval and over the same tasks:
    difference, effect by the interval rule, and the paired counts on the shared layouts."""
    reference = next((r for r in rows if r["recipe"] == control and r["eval"] == row["eval"]
                      and r["task"] == row["task"] and r["tasks"] == row["tasks"]), None)
    if reference is None:
        return None
    return {"recipe": control, **_against(row, reference), "paired": _paired(reference, row)}


def _paired(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any] | None:
    """Episode by episode on the layouts both evaluated (same seed and index: the same layout):
    how many `after` lost and gained against `before`, and the exact McNemar p-value of that split
    (two-sided). None when either evaluation did not record its episodes, or they share no layout."""
    if before is None or not before["_outcomes"] or not after["_outcomes"]:
        return None
    shared = before["_outcomes"].keys() & after["_outcomes"].keys()
    if not shared:  # other tasks, or other seeds: nothing to pair
        return None
    lost = sum(before["_outcomes"][k] and not after["_outcomes"][k] for k in shared)
    gained = sum(after["_outcomes"][k] and not before["_outcomes"][k] for k in shared)
    return {"episodes": len(shared), "lost": lost, "gained": gained, "p": float(f"{mcnemar_exact_p(lost, gained):.3g}")}


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar test: under no difference each discordant layout is lost or gained
    with probability 1/2, so the smaller count is binomial(lost + gained, 1/2)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _recipe_rows(root: Path, name: str, variant: str, seeds: list[int], recipe: dict[str, Any]) -> list[dict[str, Any]]:
    counts: dict[str, dict[int, tuple[int, int]]] = {}  # task -> seed -> (successes, episodes)
    other_lifted: dict[str, int] = {}  # task -> episodes that lifted the cube the instruction did not name
    budget = {"train_samples": 0, "rollout_episodes": 0, "wall_s": 0.0, "seeds_finished": []}
    outcomes: dict[str, dict[str, bool]] = {}  # task -> "seed/index" -> success (evals that recorded them)
    for seed in seeds:
        here = root / name / f"seed_{seed}"
        evaluation = read_report(here / f"eval-{variant}" / "report.json")
        if evaluation is None:
            continue
        budget["seeds_finished"].append(seed)
        for task, stats in evaluation["per_task"].items():
            counts.setdefault(task, {})[seed] = (int(stats["successes"]), int(stats["episodes"]))
            other_lifted[task] = other_lifted.get(task, 0) + int(stats.get("other_cube_lifted") or 0)
        for episode in evaluation.get("outcomes") or []:
            # a layout is a (seed, index) pair *of one task*: evaluations of other tasks on the same
            # indices (a held-out task combination against the default eval) share no layouts
            key, success = f"{seed}/{episode['index']}/{episode['task']}", bool(episode["success"])
            outcomes.setdefault(episode["task"], {})[key] = success
            outcomes.setdefault(ALL, {})[key] = success
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
        rows.append({"recipe": name, "eval": variant, "task": task, "tasks": sorted(counts) if task == ALL else [task],
                     "successes": wins, "episodes": episodes,
                     "other_cube_lifted": sum(other_lifted.values()) if task == ALL else other_lifted.get(task, 0),
                     "success_rate": round(wins / episodes, 4) if episodes else 0.0,
                     "ci95": [round(low, 4), round(high, 4)],
                     "per_seed": {str(seed): [w, n] for seed, (w, n) in sorted(per_seed.items())},
                     "start_from": recipe.get("start_from"), **budget,
                     "_outcomes": outcomes.get(task, {})})  # for the paired counts; not written out
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
             "95% Wilson interval, each seed's count, difference to the baseline (and to the recipe's control, "
             "the same budget without what it adds). An effect is called only "
             "where the intervals do not overlap. Same layouts: episode by episode on the layouts both "
             "evaluations ran, the successes lost and gained and the exact McNemar p-value of that split (paired; "
             "listed, not used to call effects). A recipe run at fewer seeds than the baseline is compared with "
             "the baseline at its seeds. A recipe continuing another's policy (from X) counts the "
             "samples and rollouts it added to X's. Samples, rollouts and wall time are totals over its seeds.")]
    first = summary["evals"][0]
    for variant in summary["evals"]:
        lines += ["", f"## eval: {variant}", "",
                  ("| recipe | task | success | 95% interval | per seed | vs baseline | effect | same layouts: "
                  f"lost/gained vs baseline (p) | vs {first} eval (p) | vs control: difference, effect, same "
                  "layouts (p) | samples trained (all seeds) | rollouts (rl, dagger; all seeds) | wall (s; all seeds) "
                  "|"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in summary["rows"] if r["eval"] == variant):
            per_seed = ", ".join(f"{w}/{n}" for w, n in row["per_seed"].values())
            delta = "" if row["delta"] is None or row["effect"] == "baseline" else f"{row['delta']:+.0%}"
            name = row["recipe"] + (f" (from {row['start_from']})" if row.get("start_from") else "")
            other = row.get("other_cube_lifted") or 0  # held-out combinations: picked the cube not named
            lifted = f"; lifted the other cube in {other}" if other else ""
            lines.append(f"| {name} | {row['task']} | {row['successes']}/{row['episodes']} ({row['success_rate']:.0%})"
                         f"{lifted} "
                         f"| {row['ci95'][0]:.0%}-{row['ci95'][1]:.0%} | {per_seed} | {delta} | {row['effect']} "
                         f"| {paired_text(row['paired_vs_baseline'])} | {paired_text(row[f'paired_vs_{first}'])} "
                         f"| {control_text(row['vs_control'])} "
                         f"| {row['train_samples']:,} | {row['rollout_episodes']} | {row['wall_s']:.0f} |")
    return "\n".join(lines)


def control_text(against: dict[str, Any] | None) -> str:
    if against is None:
        return ""
    paired = paired_text(against["paired"])
    return f"{against['recipe']}: {against['delta']:+.0%}, {against['effect']}" + (f", {paired}" if paired else "")


def paired_text(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return ""
    p = "<0.001" if paired["p"] < 0.001 else f"{paired['p']:.2g}"
    return f"-{paired['lost']}/+{paired['gained']} ({p})"


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["evals"]
    # each panel as wide as its bars need, so eight recipes' names do not run into each other
    bars = [max(1, sum(r["eval"] == v and r["task"] == ALL for r in summary["rows"])) for v in variants]
    figure, axes = plt.subplots(1, len(variants), figsize=(1.0 + sum(1.4 + 0.6 * n for n in bars), 4.4),
                                squeeze=False, gridspec_kw={"width_ratios": [1.4 + 0.6 * n for n in bars]})
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
        axis.set_title(f"eval: {variant}\n(success, 95% interval)", fontsize=10)
        axis.tick_params(axis="x", labelrotation=40)
        for label in axis.get_xticklabels():
            label.set_horizontalalignment("right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
