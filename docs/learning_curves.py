"""Draw docs/img/learning_curves.png from docs/learning_curves.json (measured points, see docs/recipes.md).

    .venv/bin/python docs/learning_curves.py

Each point is a closed-loop evaluation on held-out layouts (`vla-dist eval`, report.json: successes,
episodes); the bars are 95% Wilson intervals, the same as every report.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vla_dist.rollout.evaluate import wilson_interval

HERE = Path(__file__).resolve().parent


def main() -> Path:
    data = json.loads((HERE / "learning_curves.json").read_text(encoding="utf-8"))
    curves = data["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        for series in curve["series"]:
            xs = [p["x"] for p in series["points"]]
            rates = [p["successes"] / p["episodes"] for p in series["points"]]
            bounds = [wilson_interval(p["successes"], p["episodes"]) for p in series["points"]]
            low = [r - b[0] for r, b in zip(rates, bounds, strict=True)]
            high = [b[1] - r for r, b in zip(rates, bounds, strict=True)]
            ax.errorbar(xs, [100 * r for r in rates], yerr=[[100 * v for v in low], [100 * v for v in high]],
                        marker="o", capsize=3, label=series["label"])
        ax.set_xlabel(curve["x_label"])
        ax.set_ylabel("success on held-out layouts (%)")
        ax.set_ylim(0, 100)
        ax.set_title(curve["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = HERE / "img" / "learning_curves.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
