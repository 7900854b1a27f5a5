"""Shards -> shuffled, collated `PolicyBatch`es for one trainer rank: split over ranks and DataLoader
workers, seeded, resumable. Imports torch (the rest of vla_dist.data does not).

    loader = WindowLoader(data_dir, chunk_size=8, batch_size=32, rank=r, world_size=w, num_workers=2)
    loader.load_state_dict(saved)                  # optional: continue where a run stopped
    for epoch in ...:
        for batch in loader:                        # WindowBatch (a PolicyBatch): one epoch per loop
            loss = policy.compute_loss(batch)
        ...
    saved = loader.state_dict()                     # per rank: save it with that rank's checkpoint

Who reads what. Consumers are the (rank, worker) pairs, N = world_size * max(num_workers, 1);
consumer k = rank * workers + worker. Each epoch lists every episode (shards in a seeded order) and
gives consumer k one contiguous block of episodes (vla_dist.data.windows: episode-level split, so
every episode is read exactly once per epoch across all ranks and workers, also with more
consumers than shards). Blocks differ by at most one episode, not in windows: ranks can yield
different numbers of batches per epoch, so a DDP/DeepSpeed loop must agree on the step count
(e.g. stop every rank at the minimum, or run a fixed number of steps per epoch).

Shuffling. A consumer reads its episodes in order and cuts them into groups of consecutive
episodes holding >= `shuffle_buffer` windows; the windows of a group are served in a permutation
drawn from numpy's generator seeded by (seed, epoch, consumer, group). This is a shuffle buffer
whose content and order are functions of those four numbers only: same seed -> same batches, and
no generator state has to be saved. `shuffle=False` serves windows in time order.

Resume. `state_dict()` holds the epoch and, per worker of this rank, the windows it has delivered
in batches the caller received (prefetched batches are not counted), and which worker's batch
comes next (DataLoader takes workers' batches round-robin; a resumed DataLoader's worker 0 plays
that worker, so the interleaving continues as it would have). `load_state_dict` + a new
`for batch in loader` continues at that position: groups wholly consumed are read past without
decoding their images, the group holding the position is rebuilt (same permutation) and cut at
it, so the batches that follow are exactly those an uninterrupted run would have yielded next.
That needs the same consumer layout: same world_size and num_workers (and seed, shuffle settings,
stride, shard list). When the layout changed (say, a restart on fewer GPUs), the saved epoch is
kept but restarted from its beginning with the new deterministic split, with a warning: windows
of that epoch's consumed part are seen again; epochs after it follow the seed as usual. (Resuming
"at the global sample count" would need every rank's count, which a rank-local state lacks.)

Damaged shards. Every shard is checked once when the loader is built, as `iter_episodes` does
(size against manifest.json, sha256 with verify="sha256", the tar end marker); one that fails is
reported (logger "vla_dist.data" and `on_error(shard, message)`, also kept in `loader.errors`)
and left out of the split, so the other episodes are still each served once. A failure while
reading (tar error, bad video) ends that shard for that consumer and is reported the same way,
from the worker, when the batch after it (or the worker's end) reaches the caller.

Decoding: our `decode_sample` only (json, npy without pickle, H.264/npz); webdataset supplies tar
iteration and key grouping, never its decoders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vla_dist.data.codec import decode_sample
from vla_dist.data.episode import Episode
from vla_dist.data.manifest import MANIFEST_NAME, read_manifest
from vla_dist.data.reader import (
    VERIFY_MODES,
    ShardErrors,
    check_shard,
    list_shards,
    report_shard_error,
    tar_members,
)
from vla_dist.data.windows import (
    EpisodeRef,
    consumer_block,
    epoch_episodes,
    make_window,
    window_starts,
)
from vla_dist.models.policy import PolicyBatch

if TYPE_CHECKING:
    from vla_dist.config.schema import RunConfig

logger = logging.getLogger("vla_dist.data")

STATE_VERSION = 1
OnError = Callable[[str, str], None]


@dataclass
class WindowBatch(PolicyBatch):
    """A `PolicyBatch` that also says where each window came from."""

    episode_ids: list[str]
    timesteps: torch.Tensor  # int64 [B]: t of each window in its episode


def collate_windows(episodes: Sequence[Episode | None], index: Sequence[tuple[int, int]], chunk_size: int,
                    cameras: Sequence[str]) -> WindowBatch:
    """Stack the windows (episode i, time t) of `index` into one batch."""
    picked = [(episodes[i], t) for i, t in index]
    if any(ep is None for ep, _ in picked):
        raise ValueError("collate_windows: a window points at an episode that failed to decode")
    parts = [make_window(ep, t, chunk_size, cameras) for ep, t in picked]  # type: ignore[arg-type]
    return WindowBatch(
        images=torch.from_numpy(np.stack([p[0] for p in parts])),
        state=torch.from_numpy(np.stack([p[1] for p in parts])),
        instructions=[ep.instruction for ep, _ in picked],  # type: ignore[union-attr]
        actions=torch.from_numpy(np.stack([p[2] for p in parts])),
        action_mask=torch.from_numpy(np.stack([p[3] for p in parts])),
        episode_ids=[ep.episode_id for ep, _ in picked],  # type: ignore[union-attr]
        timesteps=torch.tensor([t for _, t in picked], dtype=torch.int64),
    )


@dataclass
class _Layout:
    """Everything a consumer needs to compute its stream; picklable (sent to DataLoader workers)."""

    data_dir: str
    shards: list[tuple[str, int]]  # (name, episodes) of the shards that passed the checks, manifest order
    cameras: list[str]
    chunk_size: int
    batch_size: int
    rank: int
    world_size: int
    workers: int  # max(num_workers, 1)
    shuffle: bool
    shuffle_buffer: int
    stride: int
    seed: int
    drop_last: bool


class _WindowStream(IterableDataset):
    """Yields (worker, windows delivered after this item, [(shard, message)], WindowBatch | None)."""

    def __init__(self, layout: _Layout, epoch: int, resume: list[int], first_worker: int) -> None:
        self.layout, self.epoch, self.resume, self.first_worker = layout, epoch, list(resume), first_worker

    def __iter__(self) -> Iterator[tuple[int, int, list[tuple[str, str]], WindowBatch | None]]:
        info = get_worker_info()
        lay = self.layout
        # DataLoader worker i plays logical worker first_worker + i: its round-robin then continues
        # with the worker an uninterrupted run would have asked next
        worker = ((info.id if info is not None else 0) + self.first_worker) % lay.workers
        consumer = lay.rank * lay.workers + worker
        refs = epoch_episodes(lay.shards, lay.seed, self.epoch, lay.shuffle)
        block = [refs[i] for i in consumer_block(len(refs), consumer, lay.world_size * lay.workers)]
        skip = self.resume[worker]
        errors: list[tuple[str, str]] = []

        def report(shard: str, message: str) -> None:
            report_shard_error(shard, message, None)  # the warning is logged here, in the worker
            errors.append((shard, message))

        def flush() -> list[tuple[str, str]]:
            out = list(errors)
            errors.clear()
            return out

        position = 0  # windows of this consumer's epoch stream before the current group
        batch_eps: list[Episode | None] = []
        batch_index: list[tuple[int, int]] = []
        delivered = skip
        for group_number, group in enumerate(self._groups(block, report)):
            lengths = [len(window_starts(ep.num_frames, lay.stride)) for _, ep in group]
            total = sum(lengths)
            if position + total <= skip:  # consumed before the resume point: not even decoded
                position += total
                continue
            episodes: list[Episode | None] = []
            for raw, light in group:
                try:
                    episodes.append(decode_sample(raw, decode_images=True))
                except Exception as exc:  # noqa: BLE001 - a damaged sample must not end the run
                    report(str(raw.get("__url__")), f"episode {light.episode_id!r}: images failed to decode, "
                                                   f"its windows skipped: {exc}")
                    episodes.append(None)
            index = [(i, t) for i, ep in enumerate(group) for t in window_starts(ep[1].num_frames, lay.stride)]
            if lay.shuffle:
                rng = np.random.default_rng([lay.seed, self.epoch, consumer, group_number])
                index = [index[j] for j in rng.permutation(len(index))]
            start = max(0, skip - position)
            position += total
            base = len(batch_eps)
            batch_eps.extend(episodes)
            for i, t in index[start:]:
                delivered += 1
                if episodes[i] is None:
                    continue
                batch_index.append((base + i, t))
                if len(batch_index) == lay.batch_size:
                    yield worker, delivered, flush(), collate_windows(batch_eps, batch_index, lay.chunk_size,
                                                                      lay.cameras)
                    batch_index = []
            # keep only the episodes the unfinished batch still points at
            keep = sorted({i for i, _ in batch_index})
            remap = {old: new for new, old in enumerate(keep)}
            batch_eps = [batch_eps[i] for i in keep]
            batch_index = [(remap[i], t) for i, t in batch_index]
        if batch_index and not lay.drop_last:
            yield worker, delivered, flush(), collate_windows(batch_eps, batch_index, lay.chunk_size, lay.cameras)
        yield worker, delivered, flush(), None

    def _groups(self, block: list[EpisodeRef], report: OnError) -> Iterator[list[tuple[dict[str, Any], Episode]]]:
        """The block's episodes as (raw sample, episode decoded without images), in groups of
        consecutive episodes holding >= shuffle_buffer windows (the last group may hold fewer)."""
        lay = self.layout
        group: list[tuple[dict[str, Any], Episode]] = []
        held = 0
        for raw in self._raw_samples(block, report):
            try:
                light = decode_sample(raw, decode_images=False)
            except Exception as exc:  # noqa: BLE001
                report(str(raw.get("__url__")), f"sample {raw.get('__key__')!r} undecodable, skipped: {exc}")
                continue
            group.append((raw, light))
            held += len(window_starts(light.num_frames, lay.stride))
            if held >= max(lay.shuffle_buffer, 1):
                yield group
                group, held = [], 0
        if group:
            yield group

    def _raw_samples(self, block: list[EpisodeRef], report: OnError) -> Iterator[dict[str, Any]]:
        """Raw samples (bytes) of the block's episodes, in block order; each shard opened once per
        run of consecutive refs (a block lists a shard's episodes consecutively)."""
        from webdataset.tariterators import group_by_keys

        runs: list[tuple[str, list[int]]] = []
        for ref in block:
            if runs and runs[-1][0] == ref.shard:
                runs[-1][1].append(ref.position)
            else:
                runs.append((ref.shard, [ref.position]))
        for shard, positions in runs:
            wanted, last = set(positions), max(positions)
            path = Path(self.layout.data_dir) / shard
            found = 0
            try:
                with open(path, "rb") as stream:
                    samples = group_by_keys(tar_members(stream, shard), lcase=False)
                    for position, sample in enumerate(samples):
                        if position in wanted:
                            found += 1
                            yield sample
                        if position >= last:
                            break
            except Exception as exc:  # noqa: BLE001 - any failure inside a shard ends that shard only
                report(shard, f"read failed after {found} of this reader's episodes, rest skipped: {exc}")
                continue
            if found != len(wanted):
                report(shard, f"holds fewer episodes than {MANIFEST_NAME} lists: {len(wanted) - found} missing")


class WindowLoader:
    """Batches of training windows for one rank; see the module docstring for the split, the
    shuffle, resume and damaged shards. One `for batch in loader` runs (the rest of) one epoch."""

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
        self.layout = _Layout(
            data_dir=str(self.data_dir), shards=self._good_shards(verify), cameras=list(self.manifest["cameras"]),
            chunk_size=chunk_size, batch_size=batch_size, rank=rank, world_size=world_size,
            workers=max(num_workers, 1), shuffle=shuffle, shuffle_buffer=shuffle_buffer, stride=stride, seed=seed,
            drop_last=drop_last,
        )
        self._epoch = 0
        self._delivered = [0] * self.layout.workers
        self._next_worker = 0  # the worker whose batch comes next (DataLoader serves workers round-robin)

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
        return self._epoch

    @property
    def cameras(self) -> list[str]:
        return list(self.layout.cameras)

    def __iter__(self) -> Iterator[WindowBatch]:
        stream = _WindowStream(self.layout, self._epoch, self._delivered, self._next_worker)
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
                self._delivered[worker] = delivered
                self._next_worker = (worker + 1) % self.layout.workers
                yield batch
        finally:
            del items  # shuts DataLoader workers down now when the caller stops early
        self._epoch += 1
        self._delivered, self._next_worker = [0] * self.layout.workers, 0

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position (JSON-able). Save one per rank, beside that rank's checkpoint."""
        lay = self.layout
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "windows_delivered": list(self._delivered),  # per worker of this rank, in the current epoch
            "windows_delivered_total": sum(self._delivered),
            "next_worker": self._next_worker,
            "rank": lay.rank,
            "world_size": lay.world_size,
            "workers": lay.workers,
            # the RNG: every permutation is drawn from numpy's default_rng([seed, epoch, ...]), so
            # the seed and the position are the whole generator state
            "seed": lay.seed,
            "shuffle": lay.shuffle,
            "shuffle_buffer": lay.shuffle_buffer,
            "stride": lay.stride,
            "shards": [list(s) for s in lay.shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (see the module docstring for a changed world size)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        lay = self.layout
        self._epoch = int(state["epoch"])
        saved = {key: state[key] for key in ("rank", "world_size", "workers", "seed", "shuffle", "shuffle_buffer",
                                             "stride")}
        now = {"rank": lay.rank, "world_size": lay.world_size, "workers": lay.workers, "seed": lay.seed,
               "shuffle": lay.shuffle, "shuffle_buffer": lay.shuffle_buffer, "stride": lay.stride}
        same_shards = [tuple(s) for s in state["shards"]] == [tuple(s) for s in lay.shards]
        if saved == now and same_shards:
            self._delivered = [int(n) for n in state["windows_delivered"]]
            self._next_worker = int(state["next_worker"])
            return
        changed = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if not same_shards:
            changed["shards"] = ("saved list", "current list")
        logger.warning("data loader state from another layout %s: epoch %d restarts from its beginning "
                       "(windows already seen in it are seen again)", changed, self._epoch)
        self._delivered, self._next_worker = [0] * lay.workers, 0

    def _good_shards(self, verify: str) -> list[tuple[str, int]]:
        """(name, episodes) of manifest shards that pass the reader's checks; the others reported."""
        records = {record["name"]: record for record in self.manifest["shards"]}
        on_disk = {path.name for path in list_shards(self.data_dir)}
        for name in sorted(on_disk - set(records)):
            self._record(name, f"skipped: not listed in {MANIFEST_NAME} (left over from another collection?)", log=True)
        good = []
        for record in self.manifest["shards"]:
            name = record["name"]
            if name not in on_disk:
                self._record(name, f"listed in {MANIFEST_NAME} but missing from {self.data_dir}", log=True)
                continue
            problem = check_shard(self.data_dir / name, records, verify)
            if problem is not None:
                self._record(name, f"skipped: {problem}", log=True)
                continue
            good.append((name, int(record["episodes"])))
        return good

    def _record(self, shard: str, message: str, log: bool = False) -> None:
        if log:
            report_shard_error(shard, message, None)
        self.errors(shard, message)
        if self._on_error is not None:
            self._on_error(shard, message)
