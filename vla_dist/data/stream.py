"""One consumer's stream of training batches: which episodes it reads, in what order, read
straight from the shards. `WindowLoader` (vla_dist.data.loader) runs one `WindowStream` per rank,
in-process or in DataLoader workers. Imports torch.

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

Starting mid-epoch. Given the windows a worker already delivered (vla_dist.data.position), groups
wholly consumed are read past without decoding their images, and the group holding the position
is rebuilt (same permutation) and cut at it, so the batches that follow are exactly those an
uninterrupted run would have yielded next.

Damaged shards met while reading (tar error, bad video, fewer episodes than the manifest lists)
end that shard for this consumer; each is logged (logger "vla_dist.data") in the worker and
handed to the loader with the next item, which reports it to its caller.

Decoding: our `decode_sample` only (json, npy without pickle, H.264/npz); webdataset supplies tar
iteration and key grouping, never its decoders.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from vla_dist.data.codec import decode_sample
from vla_dist.data.collate import WindowBatch, collate_windows
from vla_dist.data.episode import Episode
from vla_dist.data.manifest import MANIFEST_NAME
from vla_dist.data.reader import OnError, report_shard_error, tar_members
from vla_dist.data.windows import EpisodeRef, consumer_block, epoch_episodes, window_starts

# What a stream yields: (worker, windows delivered after this item, [(shard, message)], batch or
# None); None ends the worker's epoch (its errors still travel with it)
StreamItem = tuple[int, int, list[tuple[str, str]], WindowBatch | None]


@dataclass
class StreamLayout:
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


class WindowStream(IterableDataset):
    """Yields `StreamItem`s: the batches of one epoch of this rank's consumer (one per DataLoader
    worker), after skipping `resume[worker]` windows; DataLoader worker i plays logical worker
    `first_worker + i`."""

    def __init__(self, layout: StreamLayout, epoch: int, resume: list[int], first_worker: int) -> None:
        self.layout, self.epoch, self.resume, self.first_worker = layout, epoch, list(resume), first_worker

    def __iter__(self) -> Iterator[StreamItem]:
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
