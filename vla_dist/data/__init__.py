"""Episodes, WebDataset shards, manifest and statistics. Imports no torch: sim actors and tools
that only read or write data stay light."""

from vla_dist.data.codec import decode_frames, decode_sample, encode_episode, encode_frames
from vla_dist.data.episode import Episode
from vla_dist.data.manifest import ManifestError, read_manifest, write_manifest
from vla_dist.data.reader import ShardErrors, iter_episodes, list_shards
from vla_dist.data.shards import EpisodeShardWriter, ShardRecord, clear_shards
from vla_dist.data.stats import StatsAccumulator, compute_stats
from vla_dist.data.video import tile_cameras, write_video

__all__ = [
    "Episode",
    "EpisodeShardWriter",
    "ManifestError",
    "ShardErrors",
    "ShardRecord",
    "StatsAccumulator",
    "clear_shards",
    "compute_stats",
    "decode_frames",
    "decode_sample",
    "encode_episode",
    "encode_frames",
    "iter_episodes",
    "list_shards",
    "read_manifest",
    "tile_cameras",
    "write_manifest",
    "write_video",
]
