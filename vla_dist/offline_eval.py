"""`vla-dist eval eval.offline_data=DIR`: a policy scored without a simulator, for data from a real
robot: the error of its predicted action chunks against the actions recorded in held-out episodes.

Every window that starts a chunk (t = 0, chunk, 2 chunk, ... of each episode in DIR) is predicted
once from the recorded observation (images, state, instruction), with sampling noise drawn from
run.seed, and compared with the recorded actions t .. t+chunk-1 (steps past the episode's end are
left out). Reported, in the policy's normalized units (the [q01, q99] range of each action dim maps
to [-1, 1], so dims of different scales weigh alike) and in raw units: the mean squared error
overall, per action dim, per chunk step (how error grows along the chunk) and per task, next to
the error of always predicting the held-out data's mean action: a policy that has learned anything
from its observations beats that baseline.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_dist import atomic
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

BATCH = 32  # windows per forward


def run_offline_eval(cfg: RunConfig) -> dict[str, Any]:
    from vla_dist.data.manifest import read_manifest
    from vla_dist.models.build import load_policy
    from vla_dist.rollout.evaluate import resolve_policy
    from vla_dist.train.batches import EpisodeWindows

    started = time.perf_counter()
    data_dir = Path(str(cfg.eval.offline_data))
    manifest = read_manifest(data_dir)
    source = resolve_policy(cfg)
    policy = load_policy(source.path).eval()
    missing = [camera for camera in policy.cameras if camera not in manifest["cameras"]]
    if missing or int(manifest["action_space"]["dim"]) != policy.action_dim:
        raise ConfigError("eval.offline_data", f"{data_dir} has cameras {list(manifest['cameras'])} and "
                          f"{manifest['action_space']['dim']} action dims; the policy reads cameras "
                          f"{policy.cameras} and predicts {policy.action_dim} action dims")
    windows = EpisodeWindows(data_dir, policy.cameras, policy.chunk_size, 0, 1)
    starts = [i for i, (_, t) in enumerate(windows.index) if t % policy.chunk_size == 0]
    generator = torch.Generator().manual_seed(cfg.run.seed)
    predicted, recorded, valid = [], [], []
    with torch.no_grad():
        for begin in range(0, len(starts), BATCH):
            batch = windows.windows_batch(starts[begin:begin + BATCH])
            noise = torch.randn(len(batch.instructions), policy.chunk_size, policy.action_dim, generator=generator)
            predicted.append(policy.predict_chunk(batch, noise=noise).numpy())
            recorded.append(batch.actions.numpy())
            valid.append(batch.action_mask.numpy())
    tasks = [windows.tasks[windows.index[i][0]] for i in starts]
    report = action_errors(np.concatenate(predicted), np.concatenate(recorded), np.concatenate(valid),
                           policy.normalization.action_q01, policy.normalization.action_q99,
                           list(manifest["action_space"].get("names") or []), tasks)
    report.update(command="eval", mode="offline", checkpoint=source.path, offline_data=str(data_dir),
                  episodes=len(windows.actions), windows=len(starts), chunk_size=policy.chunk_size,
                  wall_seconds=round(time.perf_counter() - started, 2))
    atomic.write_text(Path(cfg.run.dir) / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def action_errors(predicted: np.ndarray, recorded: np.ndarray, valid: np.ndarray, q01: list[float],
                  q99: list[float], dim_names: list[str], tasks: list[str]) -> dict[str, Any]:
    """Masked squared errors of [N, chunk, A] predictions (see the module docstring)."""
    scale = np.maximum((np.asarray(q99) - np.asarray(q01)) / 2, 1e-6).astype(np.float64)
    error = (predicted.astype(np.float64) - recorded) ** 2
    mask = valid[..., None].astype(np.float64) * np.ones_like(error)
    normalized = error / scale**2
    mean_action = (recorded * mask).sum(axis=(0, 1)) / np.maximum(mask.sum(axis=(0, 1)), 1)
    baseline = ((mean_action - recorded) ** 2) / scale**2

    def mse(values: np.ndarray, weights: np.ndarray, axis: Any = None) -> Any:
        return (values * weights).sum(axis=axis) / np.maximum(weights.sum(axis=axis), 1)

    names = dim_names if len(dim_names) == predicted.shape[-1] else [str(i) for i in range(predicted.shape[-1])]
    by_task: dict[str, list[int]] = defaultdict(list)
    for row, task in enumerate(tasks):
        by_task[task].append(row)
    overall, base = float(mse(normalized, mask)), float(mse(baseline, mask))
    return {
        "mse": round(overall, 6),
        "mean_action_mse": round(base, 6),
        "mse_vs_mean_action": round(overall / base, 4) if base > 0 else None,
        "mse_per_dim": {n: round(float(v), 6) for n, v in zip(names, mse(normalized, mask, axis=(0, 1)), strict=True)},
        "mean_action_mse_per_dim": {n: round(float(v), 6)
                                    for n, v in zip(names, mse(baseline, mask, axis=(0, 1)), strict=True)},
        "raw_mse_per_dim": {n: round(float(v), 8) for n, v in zip(names, mse(error, mask, axis=(0, 1)), strict=True)},
        "mse_per_chunk_step": [round(float(v), 6) for v in mse(normalized, mask, axis=(0, 2))],
        "mse_per_task": {task: round(float(mse(normalized[rows], mask[rows])), 6)
                         for task, rows in sorted(by_task.items())},
        "units": "normalized: each action dim's [q01, q99] (the policy's normalization) mapped to [-1, 1]",
    }
