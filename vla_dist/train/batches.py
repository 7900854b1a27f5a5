"""Training batches: EpisodeWindows (train.fixed_batches=true) and LoaderBatches (real training).

EpisodeWindows:
A window is the observation at t and the actions t..t+chunk-1 (padded past the episode's end, with
action_mask False there). Rank r reads episodes r, r+W, r+2W, ... (episode index order); each step
draws its micro-batches from a generator seeded by (seed, rank, step, micro): no iterator state, so
a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from vla_dist.data import iter_episodes
from vla_dist.errors import ConfigError
from vla_dist.models.policy import PolicyBatch

# EpisodeWindows: train.fixed_batches=true (overfit/debug: seeded draws, no iterator state).
# LoaderBatches: real training (WindowLoader split over ranks, epochs, state in the checkpoint).


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
        self.tasks = [ep.task for ep in episodes]
        self.episode_ids = [ep.episode_id for ep in episodes]
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
        return self.windows_batch([int(i) for i in rng.integers(len(self.index), size=size)])

    def windows_batch(self, indices: Sequence[int]) -> PolicyBatch:
        """The windows `indices` (into self.index) as one batch, in that order."""
        rows = [self.window(i) for i in indices]
        images, states, texts, actions, masks = zip(*rows, strict=True)
        return PolicyBatch(images=torch.from_numpy(np.stack(images)), state=torch.from_numpy(np.stack(states)),
                           instructions=list(texts), actions=torch.from_numpy(np.stack(actions)),
                           action_mask=torch.from_numpy(np.stack(masks)))


class LoaderBatches:
    """Real training batches (train.fixed_batches=false): this rank's split of `WindowLoader`, epoch
    after epoch, with every rank taking the same number of micro-batches.

    Step-count agreement: before using a micro-batch every rank says whether it got one and they
    all_reduce(MIN) the answer (`agree`). When any rank's split is exhausted, the epoch ends on
    EVERY rank (the others drop the rest of their epoch) and all roll over to the next epoch. So an
    epoch lasts the minimum batch count across ranks: no rank ever waits on a collective another
    rank will not join, and every optimizer step has a full batch on every rank (drop_last=True).
    The price: per epoch, the windows past the shortest rank's last batch are not seen (blocks
    differ by at most one episode, so this is at most about one episode's windows per rank; the
    split is re-drawn each epoch, so different windows are dropped each time).

    Resume: `state_dict()` is the loader's (windows delivered in batches the caller took); the
    worker gathers every rank's into the checkpoint's train_state.json (plain JSON, indexed by rank,
    written by rank 0) and a resumed run (same world size) continues at that position: the next
    batch is the one the uninterrupted run took.
    Batches are pulled lazily (only when a step needs one), so the agreement replays identically.
    """

    def __init__(self, cfg: Any, rank: int, world_size: int, batch_size: int,
                 agree: Callable[[float], float], **loader_kwargs: Any) -> None:
        from vla_dist.data.loader import WindowLoader

        self.loader = WindowLoader.from_config(cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                                               drop_last=True, **loader_kwargs)
        self._agree = agree
        self._it: Iterator[Any] | None = None
        self._epoch_started = self.loader.epoch
        self.taken_in_epoch = 0

    def next(self) -> Any:
        """The next batch (a WindowBatch); collective: every rank must call it together."""
        for _ in range(3):
            if self._it is None:
                self._it = iter(self.loader)
                self._epoch_started = self.loader.epoch
            batch = next(self._it, None)
            if self._agree(float(batch is not None)) >= 1:
                self.taken_in_epoch += 1
                return batch
            self._end_epoch()  # at most 3 tries: an epoch end, then two epochs in which some rank had none
        raise ConfigError("train.micro_batch_size", f"epochs end before any batch: some rank's split of "
                          f"{self.loader.data_dir} holds fewer than micro_batch_size windows; use fewer ranks, "
                          "a smaller batch or more episodes")

    def _end_epoch(self) -> None:
        it, self._it = self._it, None
        self.taken_in_epoch = 0
        if self.loader.epoch == self._epoch_started:  # this rank still had batches: drop them, roll over
            if hasattr(it, "close"):
                it.close()  # type: ignore[union-attr]
            state = self.loader.state_dict()
            workers = len(state["windows_delivered"])
            state.update(epoch=state["epoch"] + 1, windows_delivered=[0] * workers, windows_delivered_total=0,
                         next_worker=0)
            self.loader.load_state_dict(state)

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def close(self) -> None:
        """Stop this epoch's DataLoader workers now (they are the generator's: closing it runs the
        loader's `finally`). Without it they outlive the rank until its process is killed, get the
        SIGTERM first, and torch's SIGCHLD handler prints "DataLoader worker ... is killed by signal:
        Terminated" with a traceback after a run that finished. The position is kept: `next()` starts
        again from it, with the batch the run would have taken next (as after a resume)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        return {**self.loader.state_dict(), "taken_in_epoch": self.taken_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None
        self.taken_in_epoch = int(state.get("taken_in_epoch", 0))


def batch_digest(batches: Sequence[Any]) -> str:
    """A short hash of which windows (episode id, t) a step used: compares runs without the data."""
    import hashlib

    h = hashlib.sha256()
    for batch in batches:
        for episode, t in zip(batch.episode_ids, batch.timesteps.tolist(), strict=True):
            h.update(f"{episode}:{t};".encode())
    return h.hexdigest()[:16]
