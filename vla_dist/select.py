"""`vla-dist select`: active data selection. Which episodes of a pool a policy should train on next,
chosen by what the policy (eval.checkpoint) makes of them, against a random choice of the same size.

    score     "loss": the policy's own training loss on every window of the episode (what it has not
              learned yet; needs the recorded actions); "disagreement": how far its sampled action
              chunks spread at the episode's chunk starts (pi0: select.samples draws of the flow's
              noise; needs no recorded actions, so it could rank episodes before any expert labels
              them); "random": a seeded draw (run.seed), the control at the same data budget
    choose    the select.episodes highest scores among the pool's episodes that are not in any
              select.exclude dataset (ties: pool order)
    write     run.dir/selected: the chosen episodes (vla_dist/data/subset.py, bytes copied);
              data.dir: the select.keep datasets followed by the choice (data/aggregate.py links), what
              `vla-dist train data.dir=...` then trains on
    report    run.dir/report.json (every candidate's score, chosen or not, the chosen tasks) and
              run.dir/scores.png (the score distribution, the chosen marked)

Scores are deterministic for a run.seed: every window's flow-matching noise and time are drawn from
generators seeded by it, so a re-run chooses the same episodes.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_dist import atomic
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

WINDOWS_PER_FORWARD = 64
SELECTED = "selected"


def run_select(cfg: RunConfig, log: Any = print) -> dict[str, Any]:
    from vla_dist.data.aggregate import aggregate_datasets
    from vla_dist.data.subset import subset_dataset

    started = time.perf_counter()
    pool, s = _check(cfg), cfg.select
    excluded = {episode_id for directory in s.exclude for episode_id in _episode_ids(directory)}
    candidates_all = _episode_ids(pool)
    candidates = [episode_id for episode_id in candidates_all if episode_id not in excluded]
    if len(candidates) < s.episodes:
        raise ConfigError("select.episodes", f"{pool} offers {len(candidates)} episodes outside select.exclude, "
                          f"fewer than the {s.episodes} asked for")
    log(f"select: scoring {len(candidates)} episodes of {pool} by {s.score}")
    scores = score_episodes(cfg, pool, candidates)
    chosen = choose(candidates, scores, s.episodes)
    root = Path(cfg.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    subset = subset_dataset(pool, root / SELECTED, chosen, extra={"selected_by": s.score},
                            shard_max_episodes=cfg.data.shard_max_episodes)
    joined = aggregate_datasets(cfg.data.dir, [*s.keep, root / SELECTED])
    picked = set(chosen)
    rest = [score for episode_id, score in scores.items() if episode_id not in picked]
    report = {
        "command": "select", "score": s.score, "pool": str(pool), "policy": cfg.eval.checkpoint,
        "candidates": len(candidates), "excluded": len(candidates_all) - len(candidates), "episodes": len(chosen),
        "tasks": dict(Counter(subset["tasks"])), "frames": subset["frames"],
        "mean_score_chosen": float(np.mean([scores[i] for i in chosen])),
        "mean_score_rest": float(np.mean(rest)) if rest else None,
        "data_dir": cfg.data.dir, "data_episodes": joined["episodes"],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "scores": [{"episode_id": i, "score": scores[i], "chosen": i in picked} for i in candidates],
    }
    atomic.write_text(root / "report.json", json.dumps(report, indent=2) + "\n")
    report["plot"] = str(_plot(report, root / "scores.png"))
    return report


def _check(cfg: RunConfig) -> Path:
    """Everything that can be wrong before any model is loaded."""
    from vla_dist.data.manifest import read_manifest

    s = cfg.select
    if s.pool is None:
        raise ConfigError("select.pool", "name the dataset to choose from")
    pool = Path(s.pool)
    for key, directory in [("select.pool", pool), *((f"select.exclude[{n}]", Path(d)) for n, d in enumerate(s.exclude)),
                           *((f"select.keep[{n}]", Path(d)) for n, d in enumerate(s.keep))]:
        if not (directory / "manifest.json").is_file():
            raise ConfigError(key, f"{directory} is not a dataset (no manifest.json)")
    out = Path(cfg.data.dir).resolve()
    if out in {pool.resolve(), *(Path(d).resolve() for d in [*s.exclude, *s.keep])}:
        raise ConfigError("data.dir", f"{cfg.data.dir} is an input of the selection; the choice needs its own data.dir")
    if s.score != "random" and cfg.eval.checkpoint is None:
        raise ConfigError("eval.checkpoint", f"select.score={s.score} scores episodes by a policy: name it "
                          "(an export or a training run), or use select.score=random")
    read_manifest(pool)
    return pool


def _episode_ids(data_dir: str | Path) -> list[str]:
    from vla_dist.data.reader import iter_episodes

    return [episode.episode_id for episode in iter_episodes(data_dir, decode_images=False)]


def choose(candidates: list[str], scores: dict[str, float], count: int) -> list[str]:
    """The `count` highest-scoring candidates, in pool order (ties go to the earlier episode)."""
    order = sorted(range(len(candidates)), key=lambda i: (-scores[candidates[i]], i))
    return [candidates[i] for i in sorted(order[:count])]


def score_episodes(cfg: RunConfig, pool: Path, candidates: list[str]) -> dict[str, float]:
    """episode id -> score, higher is chosen first."""
    s = cfg.select
    if s.score == "random":
        draws = np.random.default_rng(cfg.run.seed).random(len(candidates))
        return {episode_id: float(v) for episode_id, v in zip(candidates, draws, strict=True)}
    from vla_dist.models.build import load_policy
    from vla_dist.rollout.evaluate import resolve_policy
    from vla_dist.train.batches import EpisodeWindows

    policy = load_policy(resolve_policy(cfg).path).eval()
    if s.score == "disagreement" and policy.family != "pi0":
        raise ConfigError("select.score", f"disagreement samples the flow's noise: a pi0-family policy only, "
                          f"{cfg.eval.checkpoint} is {policy.family!r} (use select.score=loss)")
    windows = EpisodeWindows(pool, policy.cameras, policy.chunk_size, 0, 1)
    wanted = set(candidates)
    by_episode: dict[int, list[int]] = {}
    for i, (e, t) in enumerate(windows.index):
        if windows.episode_ids[e] in wanted and (s.score == "loss" or t % policy.chunk_size == 0):
            by_episode.setdefault(e, []).append(i)
    scores = {}
    with torch.no_grad():
        for e, indices in by_episode.items():
            episode_seed = cfg.run.seed * 1_000_003 + e  # the same draws on a re-run
            if s.score == "loss":
                scores[windows.episode_ids[e]] = _mean_loss(policy, windows, indices, episode_seed)
            else:
                scores[windows.episode_ids[e]] = _disagreement(policy, windows, indices, s.samples, episode_seed)
    return scores


def _mean_loss(policy: Any, windows: Any, indices: list[int], seed: int) -> float:
    """The training loss (compute_loss, weighted by windows) over the episode's windows."""
    total, count = 0.0, 0
    for begin in range(0, len(indices), WINDOWS_PER_FORWARD):
        part = indices[begin:begin + WINDOWS_PER_FORWARD]
        torch.manual_seed(seed + begin)  # compute_loss draws the flow's noise and time from the global generator
        total += float(policy.compute_loss(windows.windows_batch(part))) * len(part)
        count += len(part)
    return total / count


def _disagreement(policy: Any, windows: Any, indices: list[int], samples: int, seed: int) -> float:
    """Variance across `samples` sampled chunks, in the policy's normalized action units (the [q01,
    q99] range of each dim maps to [-1, 1]), averaged over the valid steps and dims of the episode's
    chunk starts."""
    norm = policy.normalization
    scale = torch.clamp((torch.tensor(norm.action_q99) - torch.tensor(norm.action_q01)) / 2, min=1e-6)
    batch = windows.windows_batch(indices)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.stack([
        policy.predict_chunk(batch, noise=torch.randn(len(indices), policy.chunk_size, policy.action_dim,
                                                      generator=generator)) / scale
        for _ in range(samples)])  # [S, B, chunk, A]
    spread = draws.var(dim=0, unbiased=False).mean(dim=-1)  # [B, chunk]
    mask = batch.action_mask.to(spread.dtype)
    return float((spread * mask).sum() / mask.sum().clamp_min(1))


def _plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [row["score"] for row in report["scores"] if row["chosen"]]
    rest = [row["score"] for row in report["scores"] if not row["chosen"]]
    figure, axis = plt.subplots(figsize=(5.5, 3.2))
    bins = np.histogram_bin_edges([*chosen, *rest], bins=30)
    axis.hist(rest, bins=bins, color="#9aa5b1", label=f"not chosen ({len(rest)})")
    axis.hist(chosen, bins=bins, color="#4c72b0", label=f"chosen ({len(chosen)})")
    axis.set_xlabel(f"score: {report['score']}")
    axis.set_ylabel("episodes")
    axis.set_title(f"vla-dist select: {report['episodes']} of {report['candidates']} candidates")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
