"""Episode samples -> WebDataset shards, each published atomically.

A shard is written as `shard-NNNNNN.tar.partial` and renamed (os.replace) to `shard-NNNNNN.tar`
only after its tar is complete and fsynced, so a crash can leave a stray `.partial` but never a
truncated file with a shard's name; readers list only `*.tar`. Every published shard gets a
`ShardRecord` (name, episodes, bytes, sha256) that the manifest stores and the reader verifies.

webdataset 1.0.2's ShardWriter, read for this: it opens its first shard in __init__, so we build it
on the first `write` (no empty shard when nothing is written). Its `post(fname)` runs after each
shard's tar is closed, also from `close()` and therefore from `__exit__` on an exception, which is
why we never use it as a context manager and tell `post` whether to publish or discard. Its
`maxsize` counts payload bytes only (not the 512-byte tar headers) and is checked before a write,
so a shard could exceed it by a whole episode; we decide the rollover ourselves (`next_stream()`)
so that `max_bytes` bounds the final file size.

webdataset is imported when the first shard is opened, not with this module: `import webdataset`
(1.0.2) imports torch whenever torch is installed (webdataset.pytorch), 1.5 s and a few hundred MB,
which `import vla_dist.data` must not cost a process that only needs episodes or the manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    import webdataset as wds

SHARD_PREFIX = "shard-"
PARTIAL_SUFFIX = ".partial"
_SHARD_FILE_RE = re.compile(r"^shard-(\d{6,})\.tar(\.partial)?$")
# A fixed member mtime makes a shard's bytes (and sha256) a function of its episodes alone. It must
# be an int: tarfile writes a float mtime (e.g. time.time(), webdataset's default) as an extra PAX
# header per member, 1 KiB more per file.
_TAR_MTIME = 0
# Member names up to 100 ASCII bytes fit a plain USTAR header (one 512-byte block); longer ones need
# PAX headers, which our size accounting does not count, so they are refused.
_MAX_MEMBER_NAME = 100


@dataclass(frozen=True)
class ShardRecord:
    name: str  # file name inside the data directory, e.g. "shard-000003.tar"
    episodes: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


class EpisodeShardWriter:
    """Writes samples from `encode_episode` into size- and count-limited shards.

        with EpisodeShardWriter(data_dir, max_episodes=64) as writer:
            for episode in episodes:
                writer.write(encode_episode(episode, "mp4"))
        records = writer.records

    An exception inside the `with` block keeps the shards already published and deletes the one
    being written. The directory must not already hold shard files numbered >= `start_shard`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_episodes: int = 64,
        max_bytes: int = 256 * 1024 * 1024,
        start_shard: int = 0,
    ) -> None:
        if max_episodes < 1:
            raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
        if max_bytes < 2 * tarfile.RECORDSIZE:
            raise ValueError(f"max_bytes must be >= {2 * tarfile.RECORDSIZE}, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.max_episodes = max_episodes
        self.max_bytes = max_bytes
        self.start_shard = start_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(
            path.name
            for path in self.out_dir.iterdir()
            if (match := _SHARD_FILE_RE.match(path.name)) and int(match.group(1)) >= start_shard
        )
        if existing:
            shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise FileExistsError(
                f"{self.out_dir} already holds shard files ({shown}); "
                "remove them (clear_shards) or write with a higher start_shard"
            )
        self._writer: wds.ShardWriter | None = None
        self._records: list[ShardRecord] = []
        self._keys: set[str] = set()
        self._shard_episodes = 0
        self._shard_tar_bytes = 0  # headers + padded payload of the open shard, end marker excluded
        self._discard_open_shard = False  # set on abort or after a failed write
        self._closed = False

    @property
    def records(self) -> list[ShardRecord]:
        """Shards published so far (all of them once closed)."""
        return list(self._records)

    @property
    def episodes_written(self) -> int:
        return len(self._keys)

    def write(self, sample: Mapping[str, str | bytes]) -> None:
        if self._closed:
            raise RuntimeError("EpisodeShardWriter is closed")
        if self._discard_open_shard:
            raise RuntimeError("an earlier write failed; the open shard is discarded, start a new writer")
        key = sample.get("__key__")
        if not isinstance(key, str) or not key:
            raise ValueError(f"sample needs a non-empty string __key__, got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate episode key {key!r}: every episode id must be unique")
        for name, value in sample.items():
            if name.startswith("_"):
                continue  # __key__, and metadata webdataset does not write
            if not isinstance(value, bytes):  # a malformed sample: ValueError like the checks around it
                raise ValueError(  # noqa: TRY004
                    f"sample {key!r}: {name} is {type(value).__name__}, expected bytes (encode with encode_episode)")
            member = f"{key}.{name}"
            if not member.isascii() or len(member) > _MAX_MEMBER_NAME:
                raise ValueError(f"tar member name {member!r} must be ASCII and <= {_MAX_MEMBER_NAME} bytes")
        sample_bytes = _tar_member_bytes(sample)

        if self._writer is None:
            import webdataset as wds  # lazily: it imports torch, see the module docstring

            directory = str(self.out_dir).replace("%", "%%")  # the pattern is %-formatted
            self._writer = wds.ShardWriter(
                os.path.join(directory, f"{SHARD_PREFIX}%06d.tar{PARTIAL_SUFFIX}"),
                maxcount=sys.maxsize,  # rollover is ours, see the module docstring
                maxsize=float("inf"),
                post=self._finish_shard,
                start_shard=self.start_shard,
                verbose=0,
                encoder=False,  # values are already bytes: no extension-based encoding
                mtime=_TAR_MTIME,
            )
        elif self._shard_episodes >= self.max_episodes or (
            _tar_file_bytes(self._shard_tar_bytes + sample_bytes) > self.max_bytes
        ):
            self._writer.next_stream()  # closes the open shard: _finish_shard publishes it

        try:
            self._writer.write(dict(sample))
        except BaseException:
            # part of the sample may be in the tar: the open shard can no longer be published
            self._discard_open_shard = True
            raise
        self._keys.add(key)
        self._shard_episodes += 1
        self._shard_tar_bytes += sample_bytes

    def close(self) -> list[ShardRecord]:
        """Publish the open shard (if it holds episodes) and return every shard's record."""
        if not self._closed:
            self._closed = True
            if self._writer is not None:
                current = Path(self._writer.fname) if self._writer.fname else None
                try:
                    self._writer.close()
                finally:
                    # if closing the tar failed, _finish_shard never ran: drop the half-written file
                    if current is not None and current.exists():
                        current.unlink()
            _fsync_dir(self.out_dir)
        return list(self._records)

    def abort(self) -> list[ShardRecord]:
        """Delete the shard being written, keep the published ones."""
        self._discard_open_shard = True
        return self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _finish_shard(self, partial_name: str) -> None:
        """ShardWriter's `post`: the tar at `partial_name` is closed; publish or discard it."""
        partial = Path(partial_name)
        if self._discard_open_shard or self._shard_episodes == 0:
            partial.unlink(missing_ok=True)
        else:
            final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
            size, digest = _fsync_and_hash(partial)
            os.replace(partial, final)
            self._records.append(ShardRecord(final.name, self._shard_episodes, size, digest))
        self._shard_episodes = 0
        self._shard_tar_bytes = 0


def clear_shards(data_dir: str | os.PathLike[str]) -> int:
    """Delete every shard file (complete or partial) and the manifests in `data_dir`; returns how
    many files were removed. For callers that were told to overwrite a previous collection."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return 0
    removed = 0
    for path in data_dir.iterdir():
        if _SHARD_FILE_RE.match(path.name) or path.name in ("manifest.json", "manifest.partial.json"):
            path.unlink()
            removed += 1
    return removed


def file_sha256(path: str | os.PathLike[str]) -> str:
    return _fsync_and_hash(Path(path), fsync=False)[1]


def _tar_member_bytes(sample: Mapping[str, str | bytes]) -> int:
    """Bytes the sample adds to a USTAR tar: a 512-byte header per member plus padded data."""
    total = 0
    for name, value in sample.items():
        if not name.startswith("_"):
            total += tarfile.BLOCKSIZE + -(-len(value) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


def _tar_file_bytes(member_bytes: int) -> int:
    """File size once closed: two zero blocks end the archive, then padding to a whole record."""
    end = member_bytes + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _fsync_and_hash(path: Path, fsync: bool = True) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if fsync:  # the data must be on disk before the rename makes it look complete
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
