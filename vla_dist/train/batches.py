"""Training windows from the shards, until the data pipeline (vla_dist/data/windows.py) lands.

A window is the observation at t and the actions t..t+chunk-1 (padded past the episode's end, with
action_mask False there). Rank r reads episodes r, r+W, r+2W, ... (episode index order); each step
draws its micro-batches from a generator seeded by (seed, rank, step, micro): no iterator state, so
a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from vla_dist.data import iter_episodes
from vla_dist.errors import ConfigError
from vla_dist.models.policy import PolicyBatch

# TODO(data): plug in vla_dist.data.loader.WindowLoader.from_config(cfg, batch_size=..., rank=..., world_size=...) here; save its state_dict in save_checkpoint(client_state=...) and load it on resume.


class EpisodeWindows:
    def __init__(self, data_dir: str | os.PathLike[str], cameras: Sequence[str], chunk_size: int, rank: int,
                 world_size: int) -> None:
        episodes = [ep for i, ep in enumerate(iter_episodes(data_dir)) if i % world_size == rank]
        if not episodes:
            raise ConfigError("train.world_size", f"rank {rank} of {world_size} got no episode from {data_dir}: "
                              "use fewer ranks than episodes")
        self.chunk_size = chunk_size
        self.images = [np.stack([ep.frames[c] for c in cameras], axis=1) for ep in episodes]  # [T, ncam, H, W, 3]
        self.states = [ep.state.astype(np.float32) for ep in episodes]
        self.actions = [ep.actions.astype(np.float32) for ep in episodes]
        self.instructions = [ep.instruction for ep in episodes]
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(ep.num_frames)]

    def __len__(self) -> int:
        return len(self.index)

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray, str, np.ndarray, np.ndarray]:
        e, t = self.index[i]
        actions = self.actions[e][t : t + self.chunk_size]
        valid = actions.shape[0]
        padded = np.zeros((self.chunk_size, actions.shape[1]), np.float32)
        padded[:valid] = actions
        padded[valid:] = actions[-1]  # repeat the last action; masked out of the loss anyway
        mask = np.arange(self.chunk_size) < valid
        return self.images[e][t], self.states[e][t], self.instructions[e], padded, mask

    def batch(self, size: int, seed: Sequence[int]) -> PolicyBatch:
        rng = np.random.default_rng(list(seed))
        rows = [self.window(int(i)) for i in rng.integers(len(self.index), size=size)]
        images, states, texts, actions, masks = zip(*rows, strict=True)
        return PolicyBatch(images=torch.from_numpy(np.stack(images)), state=torch.from_numpy(np.stack(states)),
                           instructions=list(texts), actions=torch.from_numpy(np.stack(actions)),
                           action_mask=torch.from_numpy(np.stack(masks)))
