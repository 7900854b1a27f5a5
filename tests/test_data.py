"""vla_dist.data: codecs, shards, reader, stats, manifest, videos; real webdataset shards in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vla_dist.bench.codec import bench_codec, synthetic_video
from vla_dist.data import (
    Episode,
    EpisodeShardWriter,
    ManifestError,
    ShardErrors,
    StatsAccumulator,
    compute_stats,
    decode_frames,
    decode_sample,
    encode_episode,
    encode_frames,
    iter_episodes,
    list_shards,
    read_manifest,
    tile_cameras,
    write_manifest,
    write_video,
)
from vla_dist.data.stats import STAT_NAMES

# H.264 at crf 18 on smooth sim-like frames: mean abs pixel error measured ~3 (mostly 4:2:0 colour at
# object edges); 6 leaves room for encoder differences and still catches a wrong colour conversion
# or a frame shift (those give errors of tens).
MP4_MEAN_ABS_TOLERANCE = 6.0
NUM_FRAMES = 12
IMAGE_SIZE = 32


def make_episode(index: int, codec: str = "npz", num_frames: int = NUM_FRAMES) -> Episode:
    rng = np.random.default_rng(index)
    if codec == "mp4":  # lossy: smooth content, as a renderer makes; noise would be all error
        front = synthetic_video(IMAGE_SIZE, num_frames, "front", seed=index)
        wrist = synthetic_video(IMAGE_SIZE, num_frames, "wrist", seed=index)
    else:
        front = rng.integers(0, 256, (num_frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        wrist = rng.integers(0, 256, (num_frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Episode(
        episode_id=f"pick_cube-{index:06d}",
        task="pick_cube",
        instruction="pick up the red cube",
        seed=1000 + index,
        success=index % 3 != 0,
        fps=10.0,
        frames={"front": front, "wrist": wrist},
        state=rng.normal(size=(num_frames, 7)).astype(np.float32),
        actions=rng.normal(size=(num_frames, 4)).astype(np.float32),
    )


def write_shards(data_dir: Path, episodes: list[Episode], codec: str = "npz", max_episodes: int = 2) -> list:
    with EpisodeShardWriter(data_dir, max_episodes=max_episodes) as writer:
        for episode in episodes:
            writer.write(encode_episode(episode, codec))
    return writer.records


def write_test_manifest(data_dir: Path, records: list, episodes: list[Episode]) -> Path:
    stats = compute_stats([episode.actions for episode in episodes])
    return write_manifest(
        data_dir,
        shards=records,
        episodes=len(episodes),
        frames=sum(episode.num_frames for episode in episodes),
        tasks={"pick_cube": len(episodes)},
        action_space={"dim": 4, "kind": "ee_delta+gripper"},
        state_space={"dim": 7},
        action_stats=stats,
        state_stats=compute_stats([episode.state for episode in episodes]),
        cameras=["front", "wrist"],
        image_size=IMAGE_SIZE,
        image_codec="npz",
        fps=10.0,
    )


def assert_same_episode(got: Episode, want: Episode, codec: str) -> None:
    assert (got.episode_id, got.task, got.instruction, got.seed, got.success, got.fps) == (
        want.episode_id, want.task, want.instruction, want.seed, want.success, want.fps)
    np.testing.assert_array_equal(got.state, want.state)
    np.testing.assert_array_equal(got.actions, want.actions)
    assert got.state.dtype == got.actions.dtype == np.float32
    assert list(got.frames) == list(want.frames)
    for cam, frames in want.frames.items():
        assert got.frames[cam].shape == frames.shape and got.frames[cam].dtype == np.uint8
        if codec == "npz":
            np.testing.assert_array_equal(got.frames[cam], frames)
        else:
            error = np.abs(got.frames[cam].astype(np.int16) - frames.astype(np.int16))
            assert error.mean() < MP4_MEAN_ABS_TOLERANCE, (cam, error.mean())


# ---------------------------------------------------------------------------------------------
# codecs


def test_npz_frames_are_lossless() -> None:
    frames = make_episode(0).frames["front"]
    np.testing.assert_array_equal(decode_frames(encode_frames(frames, "npz", 10.0), "npz"), frames)


def test_mp4_frames_keep_shape_and_are_close() -> None:
    frames = synthetic_video(64, 20)
    data = encode_frames(frames, "mp4", 10.0)
    decoded = decode_frames(data, "mp4")
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - frames).mean() < MP4_MEAN_ABS_TOLERANCE
    assert len(data) < frames.nbytes / 10


def test_mp4_bytes_are_deterministic() -> None:
    # this small moving-camera clip gave 3 different encodings in 25 before x264 was kept off AVX-512
    frames = synthetic_video(32, 12, "wrist", seed=3)
    encodings = {encode_frames(frames, "mp4", 10.0) for _ in range(6)}
    assert len(encodings) == 1


def test_mp4_refuses_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        encode_frames(np.zeros((3, 33, 32, 3), np.uint8), "mp4", 10.0)


def test_episode_validation() -> None:
    episode = make_episode(0)
    bad_id = Episode(**{**episode.__dict__, "episode_id": "a.b"})
    with pytest.raises(ValueError, match="episode_id"):
        encode_episode(bad_id, "npz")
    short_camera = Episode(**{**episode.__dict__, "frames": {"front": episode.frames["front"][:-1]}})
    with pytest.raises(ValueError, match="frames"):
        encode_episode(short_camera, "npz")
    short_state = Episode(**{**episode.__dict__, "state": episode.state[:-1]})
    with pytest.raises(ValueError, match="state"):
        encode_episode(short_state, "npz")
    with pytest.raises(ValueError, match="codec"):
        encode_episode(episode, "gif")


def test_sample_layout_and_meta() -> None:
    sample = encode_episode(make_episode(4), "npz")
    assert sorted(sample) == ["__key__", "actions.npy", "front.npz", "meta.json", "state.npy", "wrist.npz"]
    assert sample["__key__"] == "pick_cube-000004"
    meta = json.loads(sample["meta.json"])
    assert meta["cameras"] == ["front", "wrist"] and meta["num_frames"] == NUM_FRAMES
    assert (meta["state_dim"], meta["action_dim"], meta["image_codec"]) == (7, 4, "npz")
    assert np.load(io.BytesIO(sample["actions.npy"]), allow_pickle=False).dtype == np.float32


def test_object_positions_and_look_round_trip_only_when_recorded() -> None:
    """Episode.object_pos (the object head's targets) and Episode.look (what the cameras saw) go into
    the sample when set (object_pos.npy, meta.json) and come back; episodes without them keep the
    layout older datasets have, and a sample that says it holds positions must hold them."""
    plain = make_episode(2)
    assert "object_pos.npy" not in encode_episode(plain, "npz")
    assert decode_sample(encode_episode(plain, "npz")).object_pos.size == 0
    rng = np.random.default_rng(5)
    recorded = make_episode(3)
    recorded.object_pos = rng.normal(size=(NUM_FRAMES, 3)).astype(np.float32)
    recorded.look = {"camera_offset": [0.0, 0.01, 0.0], "light_intensity": 3.2}
    sample = encode_episode(recorded, "npz")
    assert json.loads(sample["meta.json"])["object_dim"] == 3
    back = decode_sample(sample)
    assert np.array_equal(back.object_pos, recorded.object_pos) and back.look == recorded.look
    with pytest.raises(ValueError, match="missing keys"):
        decode_sample({k: v for k, v in sample.items() if k != "object_pos.npy"})
    recorded.object_pos = recorded.object_pos[:-1]
    with pytest.raises(ValueError, match="object_pos"):
        encode_episode(recorded, "npz")


def test_decode_sample_rejects_unknown_and_missing_keys(tmp_path: Path) -> None:
    sample = encode_episode(make_episode(1), "npz")
    marker = tmp_path / "unpickled"
    evil = dict(sample, **{"extra.pyd": pickle.dumps(_Touch(marker))})
    with pytest.raises(ValueError, match="unexpected keys"):
        decode_sample(evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="missing keys"):
        decode_sample({k: v for k, v in sample.items() if k != "wrist.npz"})
    no_images = decode_sample(sample, decode_images=False)
    assert no_images.frames == {} and no_images.num_frames == NUM_FRAMES


class _Touch:
    """Unpickling this creates a file: proof that a payload was (not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ---------------------------------------------------------------------------------------------
# shards: write and read back


@pytest.mark.parametrize("codec", ["npz", "mp4"])
def test_round_trip_through_shards(tmp_path: Path, codec: str) -> None:
    episodes = [make_episode(i, codec) for i in range(5)]
    records = write_shards(tmp_path, episodes, codec, max_episodes=2)

    assert [r.name for r in records] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [r.episodes for r in records] == [2, 2, 1]  # rollover by max_episodes
    for record in records:
        data = (tmp_path / record.name).read_bytes()
        assert record.bytes == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(tmp_path)) == [r.name for r in records]  # no .partial left

    errors = ShardErrors()
    read = list(iter_episodes(tmp_path, on_error=errors))
    assert not errors, errors.errors
    assert [e.episode_id for e in read] == [e.episode_id for e in episodes]
    for got, want in zip(read, episodes, strict=True):
        assert_same_episode(got, want, codec)


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    with EpisodeShardWriter(tmp_path) as writer:
        writer.write(encode_episode(make_episode(0), "npz"))
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(encode_episode(make_episode(0), "npz"))
        writer.write(encode_episode(make_episode(1), "npz"))  # the refusal did not break the writer
    assert [r.episodes for r in writer.records] == [2]
    assert [e.episode_id for e in iter_episodes(tmp_path)] == ["pick_cube-000000", "pick_cube-000001"]


def test_max_bytes_bounds_the_file_size(tmp_path: Path) -> None:
    samples = [encode_episode(make_episode(i), "npz") for i in range(6)]
    sample_bytes = sum(len(v) for k, v in samples[0].items() if k != "__key__")
    max_bytes = int(2.5 * sample_bytes) + 20_000  # room for two episodes and the tar overhead
    with EpisodeShardWriter(tmp_path, max_episodes=100, max_bytes=max_bytes) as writer:
        for sample in samples:
            writer.write(sample)
    assert [r.episodes for r in writer.records] == [2, 2, 2]
    assert all(r.bytes <= max_bytes for r in writer.records)


def test_exception_inside_writer_keeps_only_complete_shards(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(5)]
    with pytest.raises(RuntimeError, match="sim crashed"), EpisodeShardWriter(tmp_path, max_episodes=2) as writer:
        for episode in episodes:
            writer.write(encode_episode(episode, "npz"))
        raise RuntimeError("sim crashed")  # the 3rd shard (1 episode) is open here
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar"]
    assert [r.episodes for r in writer.records] == [2, 2]
    assert [e.episode_id for e in iter_episodes(tmp_path)] == [e.episode_id for e in episodes[:4]]


def test_writer_refuses_a_directory_with_shards(tmp_path: Path) -> None:
    write_shards(tmp_path, [make_episode(0)])
    with pytest.raises(FileExistsError, match="shard-000000.tar"):
        EpisodeShardWriter(tmp_path)


def test_list_shards_ignores_partial_files(tmp_path: Path) -> None:
    write_shards(tmp_path, [make_episode(i) for i in range(3)])
    (tmp_path / "shard-000009.tar.partial").write_bytes(b"half a shard")
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000.tar", "shard-000001.tar"]


# ---------------------------------------------------------------------------------------------
# damaged shards


@pytest.mark.parametrize("with_manifest", [False, True])
def test_truncated_shard_is_reported_and_skipped(tmp_path: Path, with_manifest: bool) -> None:
    episodes = [make_episode(i) for i in range(6)]
    records = write_shards(tmp_path, episodes, max_episodes=2)
    if with_manifest:
        write_test_manifest(tmp_path, records, episodes)
    victim = tmp_path / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])

    errors = ShardErrors()
    read = [e.episode_id for e in iter_episodes(tmp_path, on_error=errors)]
    assert errors.shards == ["shard-000001.tar"]
    message = errors.errors[0][1]
    if with_manifest:
        assert f"size {len(data) // 2} bytes, manifest.json says {len(data)}" in message
    else:  # found by the tar header walk before any episode of it was yielded
        assert "not a complete tar" in message or "truncated" in message
    assert read == [e.episode_id for e in episodes[:2] + episodes[4:]]


def test_corrupt_member_skips_the_rest_of_its_shard(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(5)]
    records = write_shards(tmp_path, episodes, max_episodes=3)
    write_test_manifest(tmp_path, records, episodes)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as archive:
        target = archive.getmember("pick_cube-000001.actions.npy")
    data = bytearray(shard.read_bytes())
    data[target.offset_data : target.offset_data + 6] = b"NOTNPY"  # same size: passes verify="size"
    shard.write_bytes(bytes(data))

    errors = ShardErrors()
    read = [e.episode_id for e in iter_episodes(tmp_path, on_error=errors)]
    assert read == ["pick_cube-000000", "pick_cube-000003", "pick_cube-000004"]
    assert errors.shards == ["shard-000000.tar"]
    assert "read failed after 1 episodes" in errors.errors[0][1] and "actions.npy" in errors.errors[0][1]


def test_shard_cut_between_members_is_detected(tmp_path: Path) -> None:
    """Python's tar reader ends silently when a file stops exactly at a member boundary."""
    episodes = [make_episode(i) for i in range(3)]
    write_shards(tmp_path, episodes, max_episodes=3)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    cut = members[5].offset  # the header of episode 1's second member
    shard.write_bytes(shard.read_bytes()[:cut])

    errors = ShardErrors()
    assert list(iter_episodes(tmp_path, verify="none", on_error=errors)) == []
    assert errors.shards == ["shard-000000.tar"] and "truncated" in errors.errors[0][1]


def test_checksum_mismatch_is_skipped_with_sha256(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(4)]
    records = write_shards(tmp_path, episodes, max_episodes=2)
    write_test_manifest(tmp_path, records, episodes)
    victim = tmp_path / "shard-000000.tar"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF  # inside the first member's data: same size, different content
    victim.write_bytes(bytes(data))

    errors = ShardErrors()
    read = [e.episode_id for e in iter_episodes(tmp_path, verify="sha256", on_error=errors)]
    assert errors.shards == ["shard-000000.tar"] and "sha256" in errors.errors[0][1]
    assert read == [e.episode_id for e in episodes[2:]]


def test_shards_unknown_to_or_missing_from_the_manifest(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(4)]
    records = write_shards(tmp_path, episodes, max_episodes=2)
    write_test_manifest(tmp_path, records[:1], episodes[:2])  # manifest from before shard 1 existed
    errors = ShardErrors()
    assert len(list(iter_episodes(tmp_path, on_error=errors))) == 2
    assert errors.shards == ["shard-000001.tar"] and "not listed" in errors.errors[0][1]

    (tmp_path / "shard-000000.tar").unlink()
    errors = ShardErrors()
    assert list(iter_episodes(tmp_path, on_error=errors)) == []
    assert {shard for shard, _ in errors.errors} == {"shard-000000.tar", "shard-000001.tar"}
    assert any("missing" in message for _, message in errors.errors)


def test_pyd_member_is_rejected_never_unpickled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [encode_episode(make_episode(i), "npz") for i in range(2)]
    marker = tmp_path / "unpickled"
    evil = dict(encode_episode(make_episode(7), "npz"), **{"payload.pyd": pickle.dumps(_Touch(marker))})
    shard = tmp_path / "data" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as archive:
        for sample in (good[0], evil, good[1]):
            for name, value in sample.items():
                if name != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                    info.size = len(value)
                    archive.addfile(info, io.BytesIO(value))

    errors = ShardErrors()
    with caplog.at_level("WARNING", logger="vla_dist.data"):
        read = [e.episode_id for e in iter_episodes(shard.parent, on_error=errors)]
    assert read == ["pick_cube-000000"]  # the rest of the shard after the bad sample is skipped
    assert errors.shards == ["shard-000000.tar"] and "payload.pyd" in errors.errors[0][1]
    assert "shard-000000.tar" in caplog.text
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# stats, manifest, videos


def test_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(n, 3)).astype(np.float32) * [1, 10, 100] for n in (5, 17, 40)]
    stats = compute_stats(arrays)
    frames = np.concatenate(arrays).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], frames.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], frames.std(0), rtol=1e-12)
    np.testing.assert_array_equal(stats["min"], frames.min(0))
    np.testing.assert_array_equal(stats["max"], frames.max(0))
    np.testing.assert_allclose(stats["q01"], np.percentile(frames, 1, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["q99"], np.percentile(frames, 99, axis=0), rtol=1e-12)
    assert stats["count"] == 62 and all(isinstance(stats[name][0], float) for name in STAT_NAMES)

    accumulator = StatsAccumulator()
    for array in arrays:
        buffer = array.copy()
        accumulator.add(buffer)
        buffer[:] = 0  # the accumulator keeps its own copy
    assert accumulator.result() == stats


def test_stats_refuse_empty_and_ragged_input() -> None:
    with pytest.raises(ValueError, match="no arrays"):
        compute_stats([])
    with pytest.raises(ValueError, match="no arrays"):
        StatsAccumulator().result()
    with pytest.raises(ValueError, match="no frames"):
        compute_stats([np.zeros((0, 3))])
    with pytest.raises(ValueError, match="different dims"):
        compute_stats([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="non-finite"):
        compute_stats([np.array([[0.0, np.nan]])])


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(3)]
    records = write_shards(tmp_path, episodes, max_episodes=2)
    path = write_test_manifest(tmp_path, records, episodes)
    manifest = read_manifest(tmp_path)
    assert path == tmp_path / "manifest.json" and manifest["format_version"] == 1
    assert manifest["episodes"] == 3 and manifest["frames"] == 3 * NUM_FRAMES
    assert manifest["shards"] == [r.to_dict() for r in records]
    assert manifest["action_stats"] == compute_stats([e.actions for e in episodes])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    with pytest.raises(ValueError, match="episodes"):
        write_manifest(tmp_path, **{**_manifest_kwargs(records), "episodes": 4})
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "episodes": ')
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(tmp_path)


def _manifest_kwargs(records: list) -> dict:
    stats = compute_stats([np.zeros((1, 1))])
    return {"shards": records, "episodes": 3, "frames": 36, "tasks": {"pick_cube": 3}, "action_space": {},
            "state_space": {}, "action_stats": stats, "state_stats": stats, "cameras": ["front"],
            "image_size": 32, "image_codec": "npz", "fps": 10.0}


def test_write_video_and_tile_cameras(tmp_path: Path) -> None:
    episode = make_episode(0)
    tiled = tile_cameras(episode.frames)
    assert tiled.shape == (NUM_FRAMES, IMAGE_SIZE, 2 * IMAGE_SIZE, 3)
    np.testing.assert_array_equal(tiled[:, :, IMAGE_SIZE:], episode.frames["wrist"])
    path = write_video(tmp_path / "videos" / "ep.mp4", tiled[:, :31], fps=10.0, scale=3)  # odd height
    assert os.listdir(path.parent) == ["ep.mp4"]
    frames = decode_frames(path.read_bytes(), "mp4")
    assert frames.shape == (NUM_FRAMES, 94, 6 * IMAGE_SIZE, 3)  # 31*3 = 93, padded to even
    with pytest.raises(ValueError, match="height"):
        tile_cameras({"a": np.zeros((2, 4, 4, 3), np.uint8), "b": np.zeros((2, 6, 4, 3), np.uint8)})


def test_bench_codec_reports_every_codec() -> None:
    result = bench_codec(synthetic_video(32, 8), fps=10.0)
    assert result["name"] == "codec" and result["unit"] == "bytes/episode"
    assert result["value"] == result["details"]["mp4"]["bytes"]
    assert result["ratio"] == pytest.approx(result["baseline"] / result["value"])
    assert result["details"]["npz"]["max_abs_error"] == 0


def test_import_does_not_load_torch() -> None:
    code = "import sys, vla_dist.data; print('torch' in sys.modules, 'webdataset' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
