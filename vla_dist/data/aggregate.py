"""One data directory that reads as the union of several (DAgger's demonstrations plus each round's labels).

The shards are not copied: the aggregate holds symbolic links to them, renumbered `shard-NNNNNN.tar`
in source order, and a manifest listing them with their sizes and checksums from the sources'
manifests, so the loader's checks (size, sha256) still read the real bytes. Every source must have
been recorded alike (cameras, image size, codec, control rate, action and state spaces). The first
source's statistics are kept: a policy that continues training keeps its own normalization anyway.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from vla_dist.data.manifest import read_manifest, write_manifest
from vla_dist.data.shards import SHARD_PREFIX, clear_shards

ALIKE = ("cameras", "image_size", "image_codec", "fps", "action_space", "state_space")


def aggregate_datasets(out: str | os.PathLike[str], sources: list[str | os.PathLike[str]]) -> dict[str, Any]:
    """Write `out` as the union of `sources` (replacing what `out` held); returns its manifest."""
    if not sources:
        raise ValueError("aggregate_datasets needs at least one source")
    out = Path(out)
    manifests = [(Path(source).resolve(), read_manifest(source)) for source in sources]
    first_dir, first = manifests[0]
    for directory, manifest in manifests[1:]:
        for key in ALIKE:
            if manifest[key] != first[key]:
                raise ValueError(f"{directory} differs from {first_dir} in {key}: {manifest[key]!r} vs {first[key]!r}")
    out.mkdir(parents=True, exist_ok=True)
    clear_shards(out)  # an earlier aggregate's links and manifest
    shards: list[dict[str, Any]] = []
    tasks: Counter[str] = Counter()
    for directory, manifest in manifests:
        for record in manifest["shards"]:
            name = f"{SHARD_PREFIX}{len(shards):06d}.tar"
            os.symlink(directory / record["name"], out / name)
            shards.append({**record, "name": name})
        tasks.update({task: int(count) for task, count in manifest["tasks"].items()})
    path = write_manifest(
        out, shards=shards, episodes=sum(int(m["episodes"]) for _, m in manifests),
        frames=sum(int(m["frames"]) for _, m in manifests), tasks=dict(tasks),
        action_space=first["action_space"], state_space=first["state_space"],
        action_stats=first["action_stats"], state_stats=first["state_stats"], cameras=first["cameras"],
        image_size=first["image_size"], image_codec=first["image_codec"], fps=first["fps"],
        extra={"aggregate_of": [str(directory) for directory, _ in manifests], "stats_over": str(first_dir),
               "complete": True},
    )
    return read_manifest(path.parent)
