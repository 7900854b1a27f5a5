"""Training windows -> one `WindowBatch` (a `PolicyBatch` that also says where each window came
from). Imports torch (the rest of vla_dist.data, but the loader, does not)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vla_dist.data.episode import Episode
from vla_dist.data.windows import make_window
from vla_dist.models.policy import PolicyBatch


@dataclass
class WindowBatch(PolicyBatch):
    """A `PolicyBatch` that also says where each window came from."""

    episode_ids: list[str]
    timesteps: torch.Tensor  # int64 [B]: t of each window in its episode
    # float32 [B, 3]: the red cube's centre at t (Episode.object_pos), the object head's target; None
    # when an episode of the batch has none recorded
    object_pos: torch.Tensor | None = None


def collate_windows(episodes: Sequence[Episode | None], index: Sequence[tuple[int, int]], chunk_size: int,
                    cameras: Sequence[str]) -> WindowBatch:
    """Stack the windows (episode i, time t) of `index` into one batch."""
    picked = [(episodes[i], t) for i, t in index]
    if any(ep is None for ep, _ in picked):
        raise ValueError("collate_windows: a window points at an episode that failed to decode")
    parts = [make_window(ep, t, chunk_size, cameras) for ep, t in picked]  # type: ignore[arg-type]
    recorded = all(ep.object_pos.size for ep, _ in picked)  # type: ignore[union-attr]
    return WindowBatch(
        images=torch.from_numpy(np.stack([p[0] for p in parts])),
        state=torch.from_numpy(np.stack([p[1] for p in parts])),
        instructions=[ep.instruction for ep, _ in picked],  # type: ignore[union-attr]
        actions=torch.from_numpy(np.stack([p[2] for p in parts])),
        action_mask=torch.from_numpy(np.stack([p[3] for p in parts])),
        episode_ids=[ep.episode_id for ep, _ in picked],  # type: ignore[union-attr]
        timesteps=torch.tensor([t for _, t in picked], dtype=torch.int64),
        object_pos=torch.from_numpy(np.stack([ep.object_pos[t] for ep, t in picked])) if recorded else None,  # type: ignore[union-attr]
    )
