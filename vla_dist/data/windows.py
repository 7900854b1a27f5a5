"""Episode -> training windows, and which episodes each data consumer reads. numpy only (no torch).

A window is what one training sample holds: the observation at time t (every camera's image, the
state, the instruction) and the action chunk t..t+chunk-1, zero-padded past the episode's end, with
`action_mask` False on the padding. Windows are built from indices into a decoded episode, so a
shuffled group of episodes costs no copies until a batch is stacked.

Splitting (`epoch_episodes`, `consumer_block`): the unit is the episode, not the shard. For an epoch
the shard order is permuted (seeded by (seed, epoch)), the episodes are listed in that shard order,
and consumer k of N = world_size * workers takes the contiguous block [k*E//N, (k+1)*E//N). Every
episode is read by exactly one consumer per epoch, whatever N is (N > shards and N > E included:
consumers past the last episode get none). A block touches at most its own shards plus the tails
of two neighbours; episodes it skips in a shard are read past, never decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vla_dist.data.episode import Episode


@dataclass(frozen=True)
class EpisodeRef:
    """One episode of the dataset by where it is: a shard (manifest name) and its place in it."""

    shard: str
    position: int  # 0-based order of the sample in the shard's tar


def window_starts(num_frames: int, stride: int = 1) -> range:
    """Times t at which an episode of `num_frames` steps yields a window."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return range(0, num_frames, stride)


def make_window(
    episode: Episode, t: int, chunk_size: int, cameras: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [n_cam, H, W, 3], state f32 [S], actions f32 [chunk, A], action_mask bool [chunk])
    of `episode` at time t; the instruction is `episode.instruction`."""
    num_frames = episode.num_frames
    if not 0 <= t < num_frames:
        raise IndexError(f"episode {episode.episode_id!r}: t={t} outside [0, {num_frames})")
    missing = [cam for cam in cameras if cam not in episode.frames]
    if missing:
        raise KeyError(f"episode {episode.episode_id!r}: no frames for cameras {missing} (decoded without images?)")
    images = np.stack([episode.frames[cam][t] for cam in cameras])
    future = episode.actions[t : t + chunk_size]
    valid = len(future)
    actions = np.zeros((chunk_size, episode.actions.shape[1]), np.float32)
    actions[:valid] = future
    mask = np.arange(chunk_size) < valid
    return images, episode.state[t].astype(np.float32, copy=False), actions, mask


def episode_windows(
    episode: Episode, chunk_size: int, cameras: Sequence[str], stride: int = 1
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every window of an episode in time order (see `make_window`)."""
    return [make_window(episode, t, chunk_size, cameras) for t in window_starts(episode.num_frames, stride)]


def epoch_episodes(shards: Sequence[tuple[str, int]], seed: int, epoch: int, shuffle: bool) -> list[EpisodeRef]:
    """Every episode of (shard name, episode count) `shards` in this epoch's order: shards in a
    seeded permutation (same seed and epoch -> same order) when `shuffle`, else as given."""
    order = list(range(len(shards)))
    if shuffle:
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    return [EpisodeRef(shards[i][0], p) for i in order for p in range(shards[i][1])]


def consumer_block(num_items: int, consumer: int, num_consumers: int) -> range:
    """Indices of the contiguous block consumer `consumer` of `num_consumers` owns; the blocks tile
    range(num_items) exactly, sizes differ by at most one."""
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} outside [0, {num_consumers})")
    return range(consumer * num_items // num_consumers, (consumer + 1) * num_items // num_consumers)
