"""`vla-dist bench load`: host memory per rank to load `model.pretrained` under ZeRO-3 (partitioned as
it is built) against the same ranks loading it whole, in one run.

value    = MiB: the largest rank's peak resident memory (VmHWM, reset just before) from building the
           policy from the checkpoint at ZeRO-3 (DeepSpeedRank.partitioned_loading) until it has
           read every weight it holds once (as a first forward pass does: transformers maps
           safetensors lazily, so a whole load is only resident once used), minus what the rank
           held before it started; `loaded_peak_mb_per_rank`: the same right after building
baseline = the same for the same ranks at ZeRO-2, which build the whole model on every rank
ratio    = baseline / value (2 ranks sharing the weights: at most about 2)
Also per rank: peaks, parameter elements held, and `rss_anon_mb` (private memory held after
loading; the rest of a peak is the checkpoint's memory-mapped file pages, which the kernel can
drop). Only loading is measured (no engine, no optimizer state): run it with the model's real
checkpoint (a pi0-3b-shaped one needs about 7 GB per whole copy) and `data.dir` of its dataset.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from vla_dist.bench.common import bench_report
from vla_dist.config.schema import RunConfig
from vla_dist.distributed.rank import (
    DeepSpeedRank,
    held_elements,
    held_tensors,
    peak_rss_mb,
    process_memory_mb,
    reset_peak_rss,
)
from vla_dist.errors import ConfigError


def _import_model_code(checkpoint: str) -> None:
    import transformers

    from vla_dist.models import processing
    from vla_dist.models.files import HF_CLASSES

    config = transformers.AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    getattr(transformers, HF_CLASSES[config.model_type])  # transformers imports model modules lazily
    processing.load_tokenizer(Path(checkpoint))


class LoadWorker(DeepSpeedRank):
    def load(self, env: dict[str, str], cfg: RunConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        """Join the group, then build the policy as a training rank does; what that cost this rank."""
        self.init_distributed(env, cfg)
        import torch.distributed as dist

        from vla_dist.distributed.ds_config import build_ds_config
        from vla_dist.models.build import build_policy

        _import_model_code(cfg.model.pretrained)  # the peak is then the weights', not the imports'
        dist.barrier()
        before = process_memory_mb("VmRSS")
        reset_peak_rss()
        started = time.perf_counter()
        with self.partitioned_loading(build_ds_config(cfg.train, on_gpu=self.on_gpu)):
            policy = build_policy(cfg.model, manifest)
        dist.barrier()
        seconds, loaded_peak = time.perf_counter() - started, peak_rss_mb()
        with torch.no_grad():  # read every weight this rank holds once, as a first forward pass does: a
            for tensor in held_tensors(policy):  # memory-mapped whole load then becomes resident too
                tensor.sum()
        return {"seconds": seconds, "rss_before_mb": before, "loaded_peak_mb": loaded_peak,
                "peak_rss_mb": peak_rss_mb(), "rss_anon_mb": process_memory_mb("RssAnon"),
                "held_elements": held_elements(policy),
                "held_bytes": sum(tensor.numel() * tensor.element_size() for tensor in held_tensors(policy))}


def _load_on_ranks(cfg: RunConfig, manifest: dict[str, Any], env: dict[str, str]) -> list[dict[str, Any]]:
    from vla_dist.cluster.placement import TrainerPlacement
    from vla_dist.distributed.group import TrainerGroup

    group = TrainerGroup(LoadWorker, TrainerPlacement.from_train(cfg.train),
                         env={**env, "DS_ACCELERATOR": "cuda" if cfg.train.gpus_per_rank else "cpu"})
    try:
        return group.run(lambda a, r: a.load.remote(group.rank_envs[r], cfg, manifest))
    finally:
        group.shutdown()


def run_load_bench(cfg: RunConfig) -> dict[str, object]:
    from vla_dist.bench.train import release_ray
    from vla_dist.data.manifest import read_manifest
    from vla_dist.runtime import init_ray

    if not cfg.model.pretrained:
        raise ConfigError("model.pretrained", "bench load measures loading a checkpoint: set model.pretrained")
    manifest = dict(read_manifest(cfg.data.dir))
    import ray

    started_ray = not ray.is_initialized()
    env = init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    try:
        runs = {stage: _load_on_ranks(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage)),
                                      manifest, env) for stage in (3, 2)}
    finally:
        release_ray(started_ray)

    def cost(rank: dict[str, Any]) -> float:
        return rank["peak_rss_mb"] - rank["rss_before_mb"]

    value, baseline = max(map(cost, runs[3])), max(map(cost, runs[2]))
    return bench_report(
        "load", round(value, 1), "MiB", round(baseline, 1), round(baseline / max(value, 1e-9), 3),
        "peak resident MiB per rank (largest rank) loading the checkpoint whole (ZeRO-2) / partitioned (ZeRO-3)",
        checkpoint=cfg.model.pretrained,
        checkpoint_bytes=sum(file.stat().st_size for file in Path(cfg.model.pretrained).glob("*.safetensors")),
        world_size=cfg.train.world_size, dtype=cfg.model.dtype,
        **{f"zero{stage}": {"peak_mb_per_rank": [round(cost(r), 1) for r in ranks],
                            "loaded_peak_mb_per_rank": [round(r["loaded_peak_mb"] - r["rss_before_mb"], 1)
                                                        for r in ranks],
                            "rss_anon_mb_per_rank": [r["rss_anon_mb"] for r in ranks],
                            "held_elements_per_rank": [r["held_elements"] for r in ranks],
                            "held_bytes_per_rank": [r["held_bytes"] for r in ranks],
                            "seconds": round(max(r["seconds"] for r in ranks), 2)} for stage, ranks in runs.items()},
    )
