"""`vla-dist bench checkpoint`: DeepSpeed checkpoint save throughput against a plain write, one run.

value    = GB/s of `engine.save_checkpoint` on the configured group (train.world_size ranks, ZeRO
           train.zero_stage, after one optimizer step so the optimizer state exists): bytes of the
           step directory / seconds from a barrier before the save until every rank has saved AND
           fsync'd every file of it (durable, as a checkpoint that is marked COMPLETE must be)
baseline = GB/s of one process writing the same number of bytes to the same directory's disk as a
           plain `torch.save` of a dict of float32 tensors (64 MiB each), fsync'd
ratio    = value / baseline (1.0: DeepSpeed saves as fast as a plain write of its bytes)
Each side is timed REPEATS times (files removed in between), the best kept (shared machines). GB = 1e9 bytes.
Written under run.dir/bench_checkpoint/ (removed afterwards): run.dir picks the disk measured.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from vla_dist.bench.common import bench_report
from vla_dist.config.schema import RunConfig
from vla_dist.train.worker import SFTWorker

REPEATS = 3
CHUNK = 64 * 2**20


def _fsync_tree(path: Path) -> int:
    """fsync every file under `path` (and the directories); returns the bytes held."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            total += file.stat().st_size
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return total


class CheckpointWorker(SFTWorker):
    def timed_save(self, root: str, tag: str) -> tuple[float, int]:
        """Collective: (seconds barrier -> saved and fsync'd on every rank, bytes of the step dir)."""
        import torch.distributed as dist

        dist.barrier()
        started = time.perf_counter()
        self.engine.save_checkpoint(root, tag=tag, save_latest=False)
        dist.barrier()  # every rank's files are complete before anyone fsyncs "all of them"
        nbytes = _fsync_tree(Path(root) / tag)
        dist.barrier()
        return time.perf_counter() - started, nbytes

    def timed_plain_write(self, path: str, nbytes: int) -> float:
        """One process: torch.save of float32 tensors totalling `nbytes`, fsync'd; seconds."""
        import torch

        sizes = [CHUNK] * (nbytes // CHUNK) + ([nbytes % CHUNK] if nbytes % CHUNK else [])
        tensors = {f"t{i}": torch.ones(size // 4, dtype=torch.float32) for i, size in enumerate(sizes)}
        started = time.perf_counter()
        with open(path, "wb") as handle:
            torch.save(tensors, handle)
            handle.flush()
            os.fsync(handle.fileno())
        fd = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - started


def run_checkpoint_bench(cfg: RunConfig) -> dict[str, object]:
    from vla_dist.bench.train import bench_config, release_ray
    from vla_dist.data.manifest import read_manifest
    from vla_dist.runtime import init_ray
    from vla_dist.train.sft import start_ranks

    cfg = bench_config(cfg)
    t = cfg.train
    manifest = dict(read_manifest(cfg.data.dir))
    root = Path(cfg.run.dir) / "bench_checkpoint"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    import ray

    started_ray = not ray.is_initialized()
    env = init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    group, info = start_ranks(cfg, manifest, env, CheckpointWorker)
    try:
        group.run(lambda a, r: a.train.remote(1))  # optimizer state exists: a real checkpoint's size
        saves = []
        for i in range(REPEATS):
            results = group.run(lambda a, r, i=i: a.timed_save.remote(str(root), f"save_{i}"))
            saves.append((max(s for s, _ in results), results[0][1]))
            shutil.rmtree(root / f"save_{i}")
        save_s, nbytes = min(saves)
        plain = []
        for i in range(REPEATS):
            target = root / f"plain_{i}.pt"
            plain.append(group.get([group.actors[0].timed_plain_write.remote(str(target), nbytes)])[0])
            target.unlink()
        plain_s = min(plain)
    finally:
        group.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        release_ray(started_ray)
    value, baseline = nbytes / save_s / 1e9, nbytes / plain_s / 1e9
    return bench_report(
        "checkpoint", round(value, 4), "GB/s", round(baseline, 4), round(value / baseline, 3),
        "DeepSpeed save_checkpoint GB/s (all ranks, fsync'd) / plain torch.save of the same bytes GB/s "
        "(one process, fsync'd), same disk",
        disk_path=str(root),
        world_size=t.world_size,
        zero_stage=t.zero_stage,
        lora=t.lora.enabled,
        model=cfg.model.preset,
        parameters=info["parameters"],
        bytes=nbytes,
        save_s=round(save_s, 4),
        plain_write_s=round(plain_s, 4),
        repeats=REPEATS,
    )
