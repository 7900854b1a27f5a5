"""vla_dist.data.windows / loader: training windows from the real quickstart shards, split over
ranks and workers exactly once, seeded, resumable, damaged shards skipped; `vla-dist bench data`."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_dist.config import load_config
from vla_dist.data import ShardErrors, iter_episodes, list_shards, read_manifest
from vla_dist.data.loader import WindowBatch, WindowLoader
from vla_dist.data.windows import (
    consumer_block,
    episode_windows,
    epoch_episodes,
    make_window,
)
from vla_dist.models import build_policy

Quickstart = tuple[Path, Path, subprocess.CompletedProcess]
CHUNK = 8


@pytest.fixture(scope="module")
def data_dir(quickstart_run: Quickstart) -> Path:
    return quickstart_run[1]


@pytest.fixture(scope="module")
def episodes(data_dir: Path) -> dict[str, object]:
    return {ep.episode_id: ep for ep in iter_episodes(data_dir)}


def all_windows(episodes: dict[str, object], stride: int = 1) -> set[tuple[str, int]]:
    return {(eid, t) for eid, ep in episodes.items() for t in range(0, ep.num_frames, stride)}


def keys(batches: list[WindowBatch]) -> list[tuple[str, int]]:
    return [(eid, int(t)) for b in batches for eid, t in zip(b.episode_ids, b.timesteps, strict=True)]


def same_batches(a: list[WindowBatch], b: list[WindowBatch]) -> bool:
    return len(a) == len(b) and all(
        x.episode_ids == y.episode_ids and x.instructions == y.instructions and torch.equal(x.images, y.images)
        and torch.equal(x.actions, y.actions) and torch.equal(x.action_mask, y.action_mask)
        and torch.equal(x.state, y.state) for x, y in zip(a, b, strict=True)
    )


def test_windows_pad_and_mask_at_episode_end(episodes: dict[str, object], data_dir: Path) -> None:
    cameras = read_manifest(data_dir)["cameras"]
    ep = next(iter(episodes.values()))
    T = ep.num_frames
    assert T > CHUNK
    windows = episode_windows(ep, CHUNK, cameras)
    assert len(windows) == T
    images, state, actions, mask = windows[0]
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert state.dtype == np.float32 and actions.shape == (CHUNK, 7) and mask.dtype == bool
    np.testing.assert_array_equal(images[1], ep.frames[cameras[1]][0])
    np.testing.assert_array_equal(actions, ep.actions[:CHUNK])
    assert mask.all()
    assert windows[T - CHUNK][3].all()  # the last full chunk
    for k in range(1, CHUNK):  # the last CHUNK-1 windows run past the end: padded with zeros, masked
        _, _, actions, mask = windows[T - CHUNK + k]
        assert mask.sum() == CHUNK - k and mask[: CHUNK - k].all()
        np.testing.assert_array_equal(actions[: CHUNK - k], ep.actions[T - CHUNK + k :])
        assert not actions[CHUNK - k :].any()
    assert len(episode_windows(ep, CHUNK, cameras, stride=3)) == len(range(0, T, 3))
    with pytest.raises(IndexError):
        make_window(ep, T, CHUNK, cameras)


def test_unshuffled_loader_serves_every_window_in_order(episodes: dict[str, object], data_dir: Path) -> None:
    loader = WindowLoader(data_dir, chunk_size=CHUNK, batch_size=10, shuffle=False)
    batches = list(loader)
    assert loader.epoch == 1 and not loader.errors
    served = keys(batches)
    assert set(served) == all_windows(episodes) and len(served) == len(set(served))
    assert sum(len(ep.actions) for ep in episodes.values()) == read_manifest(data_dir)["frames"] == len(served)
    batch = batches[-1]
    assert isinstance(batch.images, torch.Tensor) and batch.images.dtype == torch.uint8
    assert batch.images.shape[1:] == (2, 64, 64, 3) and batch.state.dtype == torch.float32
    assert batch.actions.shape[1:] == (CHUNK, 7) and batch.action_mask.dtype == torch.bool
    ep = episodes[batch.episode_ids[-1]]  # unshuffled: the very last window of the epoch
    assert int(batch.timesteps[-1]) == ep.num_frames - 1 and batch.action_mask[-1].sum() == 1
    assert batch.instructions[-1] == ep.instruction
    torch.testing.assert_close(batch.actions[-1, 0], torch.from_numpy(ep.actions[-1]))
    assert torch.equal(batch.images[-1, 0], torch.from_numpy(ep.frames["front"][-1]))


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (5, 0), (5, 2)])
def test_every_window_exactly_once_across_ranks_and_workers(
    world_size: int, num_workers: int, episodes: dict[str, object], data_dir: Path
) -> None:
    """2 ranks x 2 workers; more ranks than shards (5 > 3); more consumers than episodes (10 > 8)."""
    assert len(list_shards(data_dir)) == 3 and len(episodes) == 8
    served: list[tuple[str, int]] = []
    episodes_of_rank = []
    for rank in range(world_size):
        loader = WindowLoader(data_dir, chunk_size=CHUNK, batch_size=16, rank=rank, world_size=world_size,
                              num_workers=num_workers, shuffle_buffer=40, seed=3)
        mine = keys(list(loader))
        served += mine
        episodes_of_rank.append({eid for eid, _ in mine})
    assert len(served) == len(set(served)) and set(served) == all_windows(episodes)
    for i, a in enumerate(episodes_of_rank):  # an episode is read by one rank only
        for b in episodes_of_rank[i + 1 :]:
            assert not a & b


def test_episode_split_tiles_every_epoch() -> None:
    shards = [("a.tar", 3), ("b.tar", 3), ("c.tar", 2)]
    for epoch in range(3):
        refs = epoch_episodes(shards, seed=1, epoch=epoch, shuffle=True)
        for n in (1, 2, 3, 4, 8, 11):
            blocks = [refs[i] for k in range(n) for i in consumer_block(len(refs), k, n)]
            assert blocks == refs
    assert epoch_episodes(shards, 1, 0, True) == epoch_episodes(shards, 1, 0, True)
    orders = {tuple(r.shard for r in epoch_episodes(shards, 1, e, True)) for e in range(8)}
    assert len(orders) > 1  # the shard order changes with the epoch


def test_shuffle_is_seeded(data_dir: Path) -> None:
    def run(seed: int, epochs: int = 1) -> list[list[WindowBatch]]:
        loader = WindowLoader(data_dir, chunk_size=CHUNK, batch_size=16, num_workers=2, shuffle_buffer=64, seed=seed)
        return [list(loader) for _ in range(epochs)]

    first, again, other = run(7, epochs=2), run(7, epochs=2), run(8)
    assert same_batches(first[0], again[0]) and same_batches(first[1], again[1])
    assert keys(first[0]) != keys(other[0])
    assert keys(first[0]) != keys(first[1])  # a new order every epoch
    assert sorted(keys(first[0])) == sorted(keys(first[1])) == sorted(keys(other[0]))
    ordered = keys(list(WindowLoader(data_dir, chunk_size=CHUNK, batch_size=16, shuffle=False)))
    assert keys(first[0]) != ordered


@pytest.mark.parametrize("stop_after", [1, 5, -1])  # -1: the last batch but one (a worker already done)
def test_resume_yields_the_batches_an_uninterrupted_run_yields(stop_after: int, data_dir: Path) -> None:
    options = {"chunk_size": CHUNK, "batch_size": 8, "rank": 1, "world_size": 2, "num_workers": 2,
               "shuffle_buffer": 30, "seed": 5}
    uninterrupted = WindowLoader(data_dir, **options)
    epoch0, epoch1 = list(uninterrupted), list(uninterrupted)
    stop_after = stop_after % (len(epoch0) - 1) if stop_after < 0 else stop_after
    assert len(epoch0) > stop_after

    interrupted = WindowLoader(data_dir, **options)
    it = iter(interrupted)
    head = [next(it) for _ in range(stop_after)]
    it.close()  # the run dies here; prefetched batches are not counted as consumed
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == 0 and state["windows_delivered_total"] == sum(b.actions.shape[0] for b in head)

    resumed = WindowLoader(data_dir, **options)
    resumed.load_state_dict(state)
    assert same_batches(head + list(resumed), epoch0)
    assert resumed.epoch == 1 and resumed.state_dict()["windows_delivered_total"] == 0
    assert same_batches(list(resumed), epoch1)  # the next epoch too


def test_resume_with_another_world_size_restarts_the_epoch(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = WindowLoader(data_dir, chunk_size=CHUNK, batch_size=8, world_size=2, seed=5)
    list(old)
    it = iter(old)
    next(it)
    it.close()
    state = old.state_dict()
    assert state["epoch"] == 1 and state["windows_delivered_total"] == 8
    new = WindowLoader(data_dir, chunk_size=CHUNK, batch_size=8, world_size=1, seed=5)
    with caplog.at_level(logging.WARNING, logger="vla_dist.data"):
        new.load_state_dict(state)
    assert "restarts from its beginning" in caplog.text
    assert new.epoch == 1
    reference = WindowLoader(data_dir, chunk_size=CHUNK, batch_size=8, world_size=1, seed=5)
    list(reference)
    assert same_batches(list(new), list(reference))  # epoch 1 of the new layout, from its start


def test_damaged_shards_are_skipped_and_reported(tmp_path: Path, data_dir: Path, episodes: dict[str, object]) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shards = list_shards(copy)
    # shard 1 truncated: skipped whole when the loader is built
    truncated = shards[1]
    lost = {ep.episode_id for ep in iter_episodes([truncated], verify="none")}
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    # shard 2, same size but its first meta.json garbled: that episode is reported by the worker reading it
    with tarfile.open(shards[2]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".meta.json"))
    with open(shards[2], "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"{" * member.size)
    garbled = member.name.split(".")[0]

    errors = ShardErrors()
    served = []
    for rank in range(2):
        loader = WindowLoader(copy, chunk_size=CHUNK, batch_size=16, rank=rank, world_size=2, num_workers=2,
                              on_error=errors)
        served += keys(list(loader))
    assert errors.shards == [shards[1].name, shards[2].name]
    messages = {shard: " ".join(m for s, m in errors.errors if s == shard) for shard in errors.shards}
    assert "truncated" in messages[shards[1].name] or "size" in messages[shards[1].name]
    assert garbled in messages[shards[2].name]
    expected = {(eid, t) for eid, t in all_windows(episodes) if eid not in lost and eid != garbled}
    assert len(served) == len(set(served)) and set(served) == expected


def test_batches_train_a_policy(data_dir: Path) -> None:
    cfg = load_config(None, ["model.preset=tiny-pi0", f"data.dir={data_dir}", "data.num_workers=0"])
    torch.manual_seed(0)
    policy = build_policy(cfg.model, read_manifest(data_dir))
    loader = WindowLoader.from_config(cfg, batch_size=6)
    assert loader.layout.chunk_size == policy.chunk_size == cfg.model.chunk_size
    batch = next(iter(loader))
    loss = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    # a batch that reaches past episode ends trains too (masked steps)
    tail = next(b for b in WindowLoader.from_config(cfg, batch_size=6, shuffle=False) if not b.action_mask.all())
    assert torch.isfinite(policy.compute_loss(tail))


def test_data_bench_reports_both_paths(data_dir: Path) -> None:
    from vla_dist.bench.data import run_data_bench

    cfg = load_config(None, [f"data.dir={data_dir}", "data.num_workers=1"])
    report = run_data_bench(cfg)
    for key in ("name", "value", "unit", "baseline", "ratio", "device"):
        assert key in report
    assert report["name"] == "data" and report["value"] > 0 and report["baseline"] > 0
    assert report["windows"] == read_manifest(data_dir)["frames"]
    assert report["ratio"] == pytest.approx(report["value"] / report["baseline"], rel=0.01)
