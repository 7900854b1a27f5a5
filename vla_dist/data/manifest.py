"""`manifest.json`: what a data directory holds (shards with sizes and checksums, counts,
normalization statistics). Written last and atomically: a directory whose manifest exists was
completely written; the reader checks every shard against it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vla_dist import atomic
from vla_dist.data.shards import ShardRecord
from vla_dist.data.stats import STAT_NAMES

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_SHARD_FIELDS = {"name": str, "episodes": int, "bytes": int, "sha256": str}
_REQUIRED = (
    "format_version", "episodes", "frames", "shards", "tasks", "cameras", "image_size", "image_codec",
    "fps", "action_space", "state_space", "action_stats", "state_stats",
)


class ManifestError(ValueError):
    """manifest.json is missing or malformed; the message names the file."""


def write_manifest(
    data_dir: str | os.PathLike[str],
    *,
    shards: Sequence[ShardRecord | Mapping[str, Any]],
    episodes: int,
    frames: int,
    tasks: Mapping[str, int],
    action_space: Mapping[str, Any],
    state_space: Mapping[str, Any],
    action_stats: Mapping[str, Any],
    state_stats: Mapping[str, Any],
    cameras: Sequence[str],
    image_size: int,
    image_codec: str,
    fps: float,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `data_dir/manifest.json` atomically; counts must agree with the shard records."""
    shard_dicts = [record.to_dict() if isinstance(record, ShardRecord) else dict(record) for record in shards]
    for record in shard_dicts:
        _check_shard_record(record, "write_manifest")
    if sum(record["episodes"] for record in shard_dicts) != episodes:
        raise ValueError(f"write_manifest: shards hold {sum(r['episodes'] for r in shard_dicts)} episodes, "
                         f"episodes={episodes}")
    if sum(tasks.values()) != episodes:
        raise ValueError(f"write_manifest: tasks count {sum(tasks.values())} episodes, episodes={episodes}")
    names = [record["name"] for record in shard_dicts]
    if len(set(names)) != len(names):
        raise ValueError(f"write_manifest: duplicate shard names in {names}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "episodes": int(episodes),
        "frames": int(frames),
        "shards": shard_dicts,
        "tasks": {str(task): int(count) for task, count in sorted(tasks.items())},
        "cameras": list(cameras),
        "image_size": int(image_size),
        "image_codec": str(image_codec),
        "fps": float(fps),
        "action_space": dict(action_space),
        "state_space": dict(state_space),
        "action_stats": dict(action_stats),
        "state_stats": dict(state_stats),
        "extra": dict(extra or {}),
    }
    # allow_nan=False: a NaN statistic is a bug upstream, and not valid JSON for other readers
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    return atomic.write_text(Path(data_dir) / MANIFEST_NAME, text, fsync=True)


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of `data_dir` (or a path to a manifest file), checked for its required fields."""
    path = Path(data_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (was the collection finished?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing fields {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest['format_version']!r}, this code reads {FORMAT_VERSION}"
        )
    if not isinstance(manifest["shards"], list):
        raise ManifestError(f"{path}: 'shards' must be a list")
    try:
        for record in manifest["shards"]:
            _check_shard_record(record, str(path))
        for key in ("action_stats", "state_stats"):
            stats = manifest[key]
            if not isinstance(stats, dict) or any(name not in stats for name in STAT_NAMES):
                raise ValueError(f"{key} must hold {STAT_NAMES}")
    except ValueError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    return manifest


def recorded_labels(manifest: Mapping[str, Any]) -> str:
    """Whose actions a dataset records (collect.labels): "expert" (demonstrations, or DAgger's labels of a
    policy's states; also every dataset written before the key existed) or "own" (a policy's executed
    actions in its successful rollouts)."""
    return str((manifest.get("extra") or {}).get("labels") or "expert")


def _check_shard_record(record: object, where: str) -> None:
    # ValueError for wrong types too (TRY004 would want TypeError): this is malformed file content, and
    # read_manifest turns every ValueError into a ManifestError naming the file.
    if not isinstance(record, dict):
        raise ValueError(f"{where}: shard record {record!r} is not an object")  # noqa: TRY004 (see above)
    for field, kind in _SHARD_FIELDS.items():
        if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
            raise ValueError(f"{where}: shard record {record!r}: '{field}' must be {kind.__name__}")  # noqa: TRY004
    if "/" in record["name"] or record["name"] in ("", ".", ".."):
        raise ValueError(f"{where}: shard name {record['name']!r} must be a plain file name")
