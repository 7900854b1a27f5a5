"""run.dir/metrics.jsonl (one JSON object per optimizer step, one per training-time eval) and the
loss (+ success) curve png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vla_dist import atomic


class MetricsLog:
    """Appends one line per step. Opened at `resumed_step`, it first drops lines of later steps
    (written by the run that crashed after its last checkpoint), so the file has each step once."""

    def __init__(self, path: str | os.PathLike[str], resumed_step: int) -> None:
        self.path = Path(path)
        rows = [row for row in read_metrics(self.path) if row.get("step", 0) <= resumed_step] if resumed_step else []
        atomic.write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """The loss against the step; with training-time evals (rows with success_rate), a second panel
    of the success rate against the step with its Wilson 95% interval, on the same step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(metrics_path)
    rows = [row for row in metrics if "loss" in row]
    evals = sorted((row for row in metrics if "success_rate" in row), key=lambda row: row["step"])
    fig, axes = plt.subplots(2 if evals else 1, 1, figsize=(6, 6 if evals else 3.5), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot([row["step"] for row in rows], [row["loss"] for row in rows], marker=".")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[1][0]
        steps, rates = [row["step"] for row in evals], [row["success_rate"] for row in evals]
        low = [rate - row["ci95"][0] for rate, row in zip(rates, evals, strict=True)]
        high = [row["ci95"][1] - rate for rate, row in zip(rates, evals, strict=True)]
        ax.errorbar(steps, rates, yerr=[low, high], marker="o", capsize=3, label="all tasks (95% CI)")
        for task in evals[-1].get("per_task", {}):
            ax.plot(steps, [row["per_task"].get(task, {}).get("success_rate") for row in evals], marker=".",
                    linestyle="--", alpha=0.7, label=task)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(f"success rate ({evals[-1]['episodes']} episodes)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
