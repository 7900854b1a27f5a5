"""Where a rank's `WindowLoader` stands in its data, as a JSON-able state saved with each
checkpoint, and how a resumed run takes it back. Imports no torch.

The state holds the epoch and, per worker of this rank, the windows it has delivered in batches the
caller received (prefetched batches are not counted), and which worker's batch comes next
(DataLoader takes workers' batches round-robin; a resumed DataLoader's worker 0 plays that worker,
so the interleaving continues as it would have). The stream (vla_dist.data.stream) then continues
at that position with exactly the batches an uninterrupted run would have yielded next.

That needs the same consumer layout: same world_size and num_workers (and seed, shuffle settings,
stride, shard list). When the layout changed (say, a restart on fewer GPUs), the saved epoch is
kept but restarted from its beginning with the new deterministic split, with a warning: windows
of that epoch's consumed part are seen again; epochs after it follow the seed as usual. (Resuming
"at the global sample count" would need every rank's count, which a rank-local state lacks.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vla_dist.data.stream import StreamLayout

logger = logging.getLogger("vla_dist.data")

STATE_VERSION = 1
# the layout fields a saved position is only valid under (with the shard list)
_LAYOUT_KEYS = ("rank", "world_size", "workers", "seed", "shuffle", "shuffle_buffer", "stride")


@dataclass
class LoaderPosition:
    """One rank's position: the epoch, the windows each of its workers delivered in it, and the
    worker whose batch comes next."""

    epoch: int
    delivered: list[int]
    next_worker: int = 0

    @classmethod
    def epoch_start(cls, epoch: int, workers: int) -> LoaderPosition:
        return cls(epoch, [0] * workers, 0)

    def state_dict(self, layout: StreamLayout) -> dict[str, Any]:
        """This position under `layout`, JSON-able."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "windows_delivered": list(self.delivered),  # per worker of this rank, in the current epoch
            "windows_delivered_total": sum(self.delivered),
            "next_worker": self.next_worker,
            "rank": layout.rank,
            "world_size": layout.world_size,
            "workers": layout.workers,
            # the RNG: every permutation is drawn from numpy's default_rng([seed, epoch, ...]), so
            # the seed and the position are the whole generator state
            "seed": layout.seed,
            "shuffle": layout.shuffle,
            "shuffle_buffer": layout.shuffle_buffer,
            "stride": layout.stride,
            "shards": [list(s) for s in layout.shards],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], layout: StreamLayout) -> LoaderPosition:
        """The position `state` saved, under `layout`; the start of its epoch (with a warning) when
        it was saved under another layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        epoch = int(state["epoch"])
        saved = {key: state[key] for key in _LAYOUT_KEYS}
        now = {key: getattr(layout, key) for key in _LAYOUT_KEYS}
        same_shards = [tuple(s) for s in state["shards"]] == [tuple(s) for s in layout.shards]
        if saved == now and same_shards:
            return cls(epoch, [int(n) for n in state["windows_delivered"]], int(state["next_worker"]))
        changed = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if not same_shards:
            changed["shards"] = ("saved list", "current list")
        logger.warning("data loader state from another layout %s: epoch %d restarts from its beginning "
                       "(windows already seen in it are seen again)", changed, epoch)
        return cls.epoch_start(epoch, layout.workers)
