"""Shards -> shuffled, collated `PolicyBatch`es for one trainer rank: split over ranks and DataLoader
workers, seeded, resumable. Imports torch (the rest of vla_dist.data does not).

    loader = WindowLoader(data_dir, chunk_size=8, batch_size=32, rank=r, world_size=w, num_workers=2)
    loader.load_state_dict(saved)                  # optional: continue where a run stopped
    for epoch in ...:
        for batch in loader:                        # WindowBatch (a PolicyBatch): one epoch per loop
            loss = policy.compute_loss(batch)
        ...
    saved = loader.state_dict()                     # per rank: save it with that rank's checkpoint

The parts, one concern each:
- which shards are read: every shard is checked once when the loader is built, as `iter_episodes`
  does (vla_dist.data.reader.checked_shards: size against manifest.json, sha256 with
  verify="sha256", the tar end marker); one that fails is reported (logger "vla_dist.data" and
  `on_error(shard, message)`, also kept in `loader.errors`) and left out of the split, so the other
  episodes are still each served once;
- who reads what, the shuffle, and damaged shards met while reading: vla_dist.data.stream (the
  stream's errors reach `on_error` and `loader.errors` the same way, when the batch after them, or
  the worker's end, reaches the caller);
- the resumable position (`state_dict`/`load_state_dict`, also after a change of world size):
  vla_dist.data.position;
- windows -> batch: vla_dist.data.collate (`WindowBatch`, `collate_windows`, importable from here too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from vla_dist.data.collate import WindowBatch, collate_windows
from vla_dist.data.manifest import read_manifest
from vla_dist.data.position import STATE_VERSION, LoaderPosition
from vla_dist.data.reader import VERIFY_MODES, OnError, ShardErrors, checked_shards, report_shard_error
from vla_dist.data.stream import StreamLayout, WindowStream

if TYPE_CHECKING:
    from vla_dist.config.schema import RunConfig

__all__ = ["STATE_VERSION", "OnError", "WindowBatch", "WindowLoader", "collate_windows"]


class WindowLoader:
    """Batches of training windows for one rank; see the module docstring for the shard checks,
    the split, the shuffle and resume. One `for batch in loader` runs (the rest of) one epoch."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        chunk_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        stride: int = 1,
        seed: int = 0,
        drop_last: bool = False,
        verify: str = "size",
        on_error: OnError | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        if verify not in VERIFY_MODES or verify == "none":
            raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
        for name, value, low in (("chunk_size", chunk_size, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("num_workers", num_workers, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("stride", stride, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.errors = ShardErrors()
        self._on_error = on_error
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        shards = checked_shards(self.data_dir, self.manifest, verify, lambda shard, message:
                                self._record(shard, message, log=True))
        self.layout = StreamLayout(
            data_dir=str(self.data_dir), shards=shards, cameras=list(self.manifest["cameras"]),
            chunk_size=chunk_size, batch_size=batch_size, rank=rank, world_size=world_size,
            workers=max(num_workers, 1), shuffle=shuffle, shuffle_buffer=shuffle_buffer, stride=stride, seed=seed,
            drop_last=drop_last,
        )
        self._position = LoaderPosition.epoch_start(0, self.layout.workers)

    @classmethod
    def from_config(cls, cfg: RunConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                    **kwargs: Any) -> WindowLoader:
        """The loader of a run: data.dir, model.chunk_size, run.seed and the data.* loader keys."""
        data = cfg.data
        options: dict[str, Any] = {
            "chunk_size": cfg.model.chunk_size, "num_workers": data.num_workers, "shuffle": data.shuffle_buffer > 0,
            "shuffle_buffer": data.shuffle_buffer, "stride": data.window_stride, "seed": cfg.run.seed,
        }
        options.update(kwargs)  # explicit arguments win over the config
        return cls(data.dir, batch_size=batch_size, rank=rank, world_size=world_size, **options)

    @property
    def epoch(self) -> int:
        return self._position.epoch

    @property
    def cameras(self) -> list[str]:
        return list(self.layout.cameras)

    def __iter__(self) -> Iterator[WindowBatch]:
        pos = self._position
        stream = WindowStream(self.layout, pos.epoch, pos.delivered, pos.next_worker)
        if self.num_workers == 0:
            items: Iterator[Any] = iter(stream)
        else:
            items = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                    prefetch_factor=self.prefetch_factor, persistent_workers=False))
        try:
            for worker, delivered, errors, batch in items:
                for shard, message in errors:
                    self._record(shard, message)
                if batch is None:
                    continue
                pos.delivered[worker] = delivered
                # the worker whose batch comes next (DataLoader serves workers round-robin)
                pos.next_worker = (worker + 1) % self.layout.workers
                yield batch
        finally:
            del items  # shuts DataLoader workers down now when the caller stops early
        self._position = LoaderPosition.epoch_start(pos.epoch + 1, self.layout.workers)

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position (JSON-able). Save one per rank, beside that rank's checkpoint."""
        return self._position.state_dict(self.layout)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (vla_dist.data.position: also when the world size changed)."""
        self._position = LoaderPosition.from_state(state, self.layout)

    def _record(self, shard: str, message: str, log: bool = False) -> None:
        if log:
            report_shard_error(shard, message, None)
        self.errors(shard, message)
        if self._on_error is not None:
            self._on_error(shard, message)
