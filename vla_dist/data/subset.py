"""A dataset holding some episodes of another, chosen by id (active data selection's choice).

The chosen episodes' samples are copied byte for byte into new shards (no re-encoding: the frames a
policy trains on are the ones the pool recorded), in the pool's order, and the manifest's statistics
are recomputed over them. What the pool recorded about how it was collected (appearance, phrasings,
noise, physics) is carried over, so the checks that compare a dataset with a config still hold.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from vla_dist.data.codec import decode_sample
from vla_dist.data.manifest import read_manifest, write_manifest
from vla_dist.data.reader import list_shards, tar_members
from vla_dist.data.shards import EpisodeShardWriter, clear_shards
from vla_dist.data.stats import StatsAccumulator


def subset_dataset(src: str | os.PathLike[str], out: str | os.PathLike[str], episode_ids: list[str],
                   extra: dict[str, Any] | None = None, shard_max_episodes: int = 64) -> dict[str, Any]:
    """Write `out` (replacing what it held) with the episodes of `src` whose ids are `episode_ids`;
    returns its manifest. Every id must be in `src`."""
    from webdataset.tariterators import group_by_keys

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ValueError(f"a subset of {src} cannot be written over it")
    source = read_manifest(src)
    wanted = set(episode_ids)
    if len(wanted) != len(episode_ids):
        raise ValueError("episode ids listed twice in a subset")
    out.mkdir(parents=True, exist_ok=True)
    clear_shards(out)
    found: list[str] = []
    tasks: Counter[str] = Counter()
    actions, states = StatsAccumulator(), StatsAccumulator()
    writer = EpisodeShardWriter(out, max_episodes=shard_max_episodes)
    try:
        for shard in list_shards(src):
            with open(shard, "rb") as stream:
                for sample in group_by_keys(tar_members(stream, shard.name), lcase=False):
                    if sample["__key__"] not in wanted:
                        continue
                    episode = decode_sample(sample, decode_images=False)  # checks the sample, gives the arrays
                    writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("_")})
                    found.append(episode.episode_id)
                    tasks[episode.task] += 1
                    actions.add(episode.actions)
                    states.add(episode.state)
    except BaseException:
        writer.abort()
        raise
    records = writer.close()
    missing = wanted - set(found)
    if missing:
        clear_shards(out)
        raise ValueError(f"{len(missing)} episode(s) are not in {src}, e.g. {sorted(missing)[:3]}")
    carried = {k: v for k, v in (source.get("extra") or {}).items() if k not in ("complete", "successful_episodes",
                                                                             "failed_episodes")}
    path = write_manifest(
        out, shards=records, episodes=len(found), frames=actions.num_frames, tasks=dict(tasks),
        action_space=source["action_space"], state_space=source["state_space"], action_stats=actions.result(),
        state_stats=states.result(), cameras=source["cameras"], image_size=source["image_size"],
        image_codec=source["image_codec"], fps=source["fps"],
        extra={**carried, "subset_of": str(src.resolve()), "complete": True, **(extra or {})},
    )
    return read_manifest(path.parent)
