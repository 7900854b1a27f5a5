"""run.dir/metrics.jsonl (one JSON object per optimizer step) and the loss curve png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one line per step. Opened at `resumed_step`, it first drops lines of later steps
    (written by the run that crashed after its last checkpoint), so the file has each step once."""

    def __init__(self, path: str | os.PathLike[str], resumed_step: int) -> None:
        self.path = Path(path)
        rows = [row for row in read_metrics(self.path) if row.get("step", 0) <= resumed_step] if resumed_step else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in read_metrics(metrics_path) if "loss" in row]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([row["step"] for row in rows], [row["loss"] for row in rows], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
