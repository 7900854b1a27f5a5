"""Shards -> episodes, streaming, with damaged shards reported and skipped instead of crashing a run.

We use webdataset's tar iteration (tar member -> sample grouping) but none of its decoders: those pick
a decoder by file extension, and `.pyd`/`.pickle` members would be unpickled. Every sample goes
through `decode_sample`, which knows our keys only and refuses anything else.

What happens to a damaged shard:
- listed in manifest.json with another size (verify="size") or sha256 (verify="sha256"): skipped
  whole, before any of it is read;
- not ending where its tar index says it should (truncated or cut short; checked on every shard,
  manifest or not, by reading the tar headers only): skipped whole;
- failing while read (tar error, bad npy, bad video, unexpected key): the episodes before the
  failure are kept, the rest of that shard is skipped.
Each case is logged as a warning (logger "vla_dist.data") and passed to `on_error(shard, message)`;
the other shards are read as usual.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from vla_dist.data.codec import decode_sample
from vla_dist.data.episode import Episode
from vla_dist.data.manifest import MANIFEST_NAME, read_manifest
from vla_dist.data.shards import PARTIAL_SUFFIX, SHARD_PREFIX, file_sha256

logger = logging.getLogger("vla_dist.data")

OnError = Callable[[str, str], None]
VERIFY_MODES = ("none", "size", "sha256")


@dataclass
class ShardErrors:
    """An `on_error` callback that keeps what it was told: `errors` is [(shard name, message)]."""

    errors: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, shard: str, message: str) -> None:
        self.errors.append((shard, message))

    @property
    def shards(self) -> list[str]:
        return sorted({shard for shard, _ in self.errors})

    def __bool__(self) -> bool:
        return bool(self.errors)


def list_shards(data_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete shards of `data_dir`, sorted by name; `.partial` files are never data."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data directory")
    return sorted(
        path for path in data_dir.glob(f"{SHARD_PREFIX}*.tar")
        if path.is_file() and not path.name.endswith(PARTIAL_SUFFIX)
    )


def iter_episodes(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    decode_images: bool = True,
    verify: str = "size",
    on_error: OnError | None = None,
) -> Iterator[Episode]:
    """Episodes from a data directory (all its shards) or from an explicit list of shard paths.

    A shard is checked against the manifest.json of its directory when there is one; a shard the
    manifest does not list is skipped unless verify="none". `decode_images=False` leaves
    `Episode.frames` empty and skips video decoding (e.g. to compute statistics). Arguments are
    checked here, before the first episode is asked for."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    data_dir: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        if Path(source).is_dir():
            data_dir = Path(source)
            shard_paths = list_shards(data_dir)
        elif Path(source).is_file():
            shard_paths = [Path(source)]
        else:
            raise FileNotFoundError(f"{source}: neither a data directory nor a shard file")
    else:
        shard_paths = [Path(path) for path in source]
    manifests: dict[Path, dict[str, dict[str, Any]] | None] = {}
    if data_dir is not None and verify != "none":
        _manifest_records(data_dir, manifests)  # a broken manifest.json raises now, not mid-iteration
    return _iter_episodes(shard_paths, data_dir, decode_images, verify, on_error, manifests)


def _iter_episodes(
    shard_paths: list[Path],
    data_dir: Path | None,
    decode_images: bool,
    verify: str,
    on_error: OnError | None,
    manifests: dict[Path, dict[str, dict[str, Any]] | None],
) -> Iterator[Episode]:
    if data_dir is not None and manifests.get(data_dir) is not None:
        present = {path.name for path in shard_paths}
        for name in sorted(set(manifests[data_dir]) - present):
            report_shard_error(name, f"listed in {MANIFEST_NAME} but missing from {data_dir}", on_error)

    seen_keys: dict[str, str] = {}  # episode id -> shard it was read from
    for path in shard_paths:
        records = _manifest_records(path.parent, manifests) if verify != "none" else None
        problem = check_shard(path, records, verify)
        if problem is not None:
            report_shard_error(path.name, f"skipped: {problem}", on_error)
            continue
        read, failed = 0, False
        episodes = _read_shard(path, decode_images)
        try:
            while True:
                try:
                    episode = next(episodes)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - any failure inside a shard ends that shard only
                    report_shard_error(path.name, f"read failed after {read} episodes, rest of shard skipped: {exc}",
                            on_error)
                    failed = True
                    break
                if episode.episode_id in seen_keys:
                    report_shard_error(path.name, f"episode {episode.episode_id!r} already read from "
                                       f"{seen_keys[episode.episode_id]}; duplicate skipped", on_error)
                    continue
                seen_keys[episode.episode_id] = path.name
                read += 1
                yield episode
        finally:
            episodes.close()  # closes the shard file now if our caller stopped early
        if records is not None and not failed and read != records[path.name]["episodes"]:
            listed = records[path.name]["episodes"]
            report_shard_error(path.name, f"read {read} episodes, {MANIFEST_NAME} lists {listed}", on_error)


def _read_shard(path: Path, decode_images: bool) -> Iterator[Episode]:
    # imported here: webdataset imports torch (see vla_dist.data.shards), readers may not want it
    from webdataset.tariterators import group_by_keys

    with open(path, "rb") as stream:
        for sample in group_by_keys(tar_members(stream, path.name), lcase=False):
            yield decode_sample(sample, decode_images=decode_images)


def tar_members(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    from webdataset.tariterators import tar_file_iterator

    # group_by_keys wants each member tagged with where it came from
    for member in tar_file_iterator(stream):
        member["__url__"] = url
        yield member


def check_shard(path: Path, records: dict[str, dict[str, Any]] | None, verify: str) -> str | None:
    """Why `path` must be skipped without reading it, or None."""
    try:
        size = path.stat().st_size
        if records is not None:
            record = records.get(path.name)
            if record is None:
                return f"not listed in {MANIFEST_NAME} (left over from another collection?)"
            if size != record["bytes"]:
                return f"size {size} bytes, {MANIFEST_NAME} says {record['bytes']} (truncated or replaced?)"
            if verify == "sha256" and file_sha256(path) != record["sha256"]:
                return f"sha256 differs from {MANIFEST_NAME} (corrupted or replaced)"
        return _check_tar_end(path, size)
    except OSError as exc:
        return f"cannot read: {exc}"


def checked_shards(
    data_dir: str | os.PathLike[str], manifest: dict[str, Any], verify: str, on_error: OnError
) -> list[tuple[str, int]]:
    """(name, episodes) of the shards of `manifest` (read from `data_dir`), in its order, that pass
    `check_shard` (size, sha256 with verify="sha256", the tar end marker); every other shard,
    listed but missing or failing a check, or on disk but not listed, is passed to
    `on_error(shard, message)` instead."""
    data_dir = Path(data_dir)
    records = {record["name"]: record for record in manifest["shards"]}
    on_disk = {path.name for path in list_shards(data_dir)}
    for name in sorted(on_disk - set(records)):
        on_error(name, f"skipped: not listed in {MANIFEST_NAME} (left over from another collection?)")
    good = []
    for record in manifest["shards"]:
        name = record["name"]
        if name not in on_disk:
            on_error(name, f"listed in {MANIFEST_NAME} but missing from {data_dir}")
            continue
        problem = check_shard(data_dir / name, records, verify)
        if problem is not None:
            on_error(name, f"skipped: {problem}")
            continue
        good.append((name, int(record["episodes"])))
    return good


def _check_tar_end(path: Path, size: int) -> str | None:
    """A complete tar has its end-of-archive marker (two zero blocks) right after the last member.
    Python's tar reader stops silently at a cut that falls between members, so we look: this reads
    the 512-byte headers only (seeking over the data) and the two blocks after the last member."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            end = 0
            for member in archive:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError) as exc:
        return f"not a complete tar: {exc}"
    if end + 2 * tarfile.BLOCKSIZE > size:
        return f"truncated: {size} bytes, its last member ends at {end} and the end marker is missing"
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
            return f"damaged: no end-of-archive marker after the last member (offset {end})"
    return None


def _manifest_records(
    data_dir: Path, cache: dict[Path, dict[str, dict[str, Any]] | None]
) -> dict[str, dict[str, Any]] | None:
    """Shard records by name from `data_dir`'s manifest, None when it has none. A manifest that
    exists but cannot be read raises: silently reading unverified data would hide the problem."""
    if data_dir not in cache:
        if (data_dir / MANIFEST_NAME).exists():
            cache[data_dir] = {record["name"]: record for record in read_manifest(data_dir)["shards"]}
        else:
            cache[data_dir] = None
    return cache[data_dir]


def report_shard_error(shard: str, message: str, on_error: OnError | None) -> None:
    logger.warning("shard %s: %s", shard, message)
    if on_error is not None:
        on_error(shard, message)
