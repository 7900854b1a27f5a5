"""`vla-dist bench train`: DeepSpeed training throughput of the configured group, one run.

value    = samples/s of `train.world_size` SFTWorker ranks (real DeepSpeed ZeRO `train.zero_stage`,
           gloo on CPU / NCCL on GPU, Ray actors as `vla-dist train` starts them): global batch
           (micro_batch_size x grad_accum x world_size) / median optimizer-step time
baseline = samples/s of ONE process running a plain PyTorch step (forward, backward, grad-norm
           clip, torch.optim.AdamW with the run's hyper-parameters) on the same model (same preset,
           same seed, LoRA if enabled) with the same global batch size per step, in a Ray actor with
           the resources of one rank (train.cpus_per_rank / gpus_per_rank: same thread count)
ratio    = value / baseline: the speed-up of the distributed step over one process (ideal:
           world_size, on world_size free cores/GPUs; on a shared CPU machine expect less)
Timed: train.steps optimizer steps after WARMUP untimed ones, on both sides. Batches are fixed
real windows (train.fixed_batches=true: the data pipeline is `bench data`'s subject, not this).

FLOPs. model_flops_per_sample is counted, not estimated: torch.utils.flop_counter.FlopCounterMode
over one forward + backward of the baseline's batch (matmuls, convolutions, attention; elementwise
ops not counted), divided by the batch size. That is the usual "model FLOPs" of MFU and, unlike
6 x params x tokens, is right for a VLA's mixed image/text/action tokens and for LoRA (frozen
weights get no weight-gradient matmul). achieved_tflops = flops_per_sample x value. On GPU:
mfu = achieved FLOP/s / (world_size x peak dense bf16 FLOP/s of the device, table below); the GPU
path is untested on this project's CPU CI.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from vla_dist.bench.common import bench_report
from vla_dist.config.schema import RunConfig

WARMUP = 2
# peak dense bf16 tensor FLOP/s per device (vendor datasheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def bench_config(cfg: RunConfig) -> RunConfig:
    """The run's config as the bench uses it: fixed batches, no saves, no resume."""
    train = dataclasses.replace(cfg.train, fixed_batches=True, save_every=0, resume="never")
    return dataclasses.replace(cfg, train=train)


class PlainTrainer:
    """One process, plain PyTorch: the baseline step (a Ray actor with one rank's resources)."""

    def setup(self, cfg: RunConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        import torch

        from vla_dist.config.validate import global_batch_size
        from vla_dist.models.policy import build_policy
        from vla_dist.train.batches import EpisodeWindows
        from vla_dist.train.lora import apply_lora

        t = cfg.train
        self.on_gpu = t.gpus_per_rank > 0
        self.device = "cuda:0" if self.on_gpu else "cpu"
        torch.manual_seed(cfg.run.seed)
        policy = build_policy(cfg.model, manifest)
        if t.lora.enabled:
            apply_lora(policy, t.lora)
        self.policy = policy.to(self.device).train()
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=t.weight_decay)
        self.grad_clip = float(t.grad_clip)
        windows = EpisodeWindows(cfg.data.dir, policy.cameras, policy.chunk_size, 0, 1)
        self.batch = windows.batch(global_batch_size(t), (cfg.run.seed, 0, 0))
        if self.on_gpu:
            self.batch = _to(self.batch, self.device)
        return {"threads": torch.get_num_threads(), "batch": int(self.batch.actions.shape[0])}

    def _step(self) -> Any:
        import torch

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu):
            loss = self.policy(self.batch)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def flops_per_sample(self) -> float:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu):
            loss = self.policy(self.batch)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / int(self.batch.actions.shape[0])

    def measure(self, steps: int) -> list[float]:
        import torch

        times = []
        for _ in range(steps):
            if self.on_gpu:
                torch.cuda.synchronize()
            started = time.perf_counter()
            loss = self._step()
            float(loss.detach())  # waits for the step on GPU
            if self.on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return times


def _to(batch: Any, device: str) -> Any:
    import torch

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def run_baseline(cfg: RunConfig, manifest: dict[str, Any], steps: int) -> dict[str, Any]:
    import ray

    t = cfg.train
    actor = ray.remote(PlainTrainer).options(num_cpus=t.cpus_per_rank, num_gpus=t.gpus_per_rank).remote()
    try:
        info = ray.get(actor.setup.remote(cfg, manifest))
        flops = ray.get(actor.flops_per_sample.remote())
        ray.get(actor.measure.remote(WARMUP))
        times = ray.get(actor.measure.remote(steps))
    finally:
        ray.kill(actor, no_restart=True)
    return {**info, "flops_per_sample": flops, "median_step_s": statistics.median(times)}


def release_ray(started_here: bool) -> None:
    """Ray's driver holds repeated worker log lines (deduplication) and prints them when it shuts
    down: a bench that started Ray shuts it down before returning, so the JSON report printed after
    stays stdout's last line. A Ray started by the caller (tests, a cluster job) is left running."""
    import ray

    if started_here and ray.is_initialized():
        ray.shutdown()


def run_train_bench(cfg: RunConfig) -> dict[str, object]:
    from vla_dist.config.validate import global_batch_size
    from vla_dist.data.manifest import read_manifest
    from vla_dist.runtime import init_ray
    from vla_dist.train.sft import start_ranks

    cfg = bench_config(cfg)
    t = cfg.train
    steps = max(t.steps, 1)
    manifest = dict(read_manifest(cfg.data.dir))
    global_batch = global_batch_size(t)
    import ray

    started_ray = not ray.is_initialized()
    env = init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)

    base = run_baseline(cfg, manifest, steps)  # first: the group would hold the CPUs/GPUs
    group, info = start_ranks(cfg, manifest, env)
    try:
        group.run(lambda a, r: a.train.remote(WARMUP))
        rows = group.run(lambda a, r: a.train.remote(steps))[0]
    finally:
        group.shutdown()
        release_ray(started_ray)
    step_s = statistics.median(row["step_time_s"] for row in rows)
    value, baseline = global_batch / step_s, global_batch / base["median_step_s"]
    flops = base["flops_per_sample"]
    report = bench_report(
        "train", round(value, 3), "samples/s", round(baseline, 3), round(value / baseline, 3),
        f"{t.world_size}-rank DeepSpeed ZeRO-{t.zero_stage} samples/s / one-process plain PyTorch AdamW samples/s, "
        "same model and global batch",
        world_size=t.world_size,
        zero_stage=t.zero_stage,
        lora=t.lora.enabled,
        model=cfg.model.preset,
        global_batch_size=global_batch,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        steps_measured=steps,
        median_step_s=round(step_s, 4),
        baseline_median_step_s=round(base["median_step_s"], 4),
        baseline_threads=base["threads"],
        trainable_parameters=info["trainable"],
        parameters=info["parameters"],
        model_flops_per_sample=flops,
        achieved_tflops=round(flops * value / 1e12, 6),
        mfu=None,
    )
    if t.gpus_per_rank > 0:  # untested here (CPU CI): peak bf16 of the device from the table
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
        peak = next((p for key, p in PEAK_BF16.items() if key in name), None)
        if peak is not None:
            report["mfu"] = round(flops * value / (t.world_size * peak), 4)
            report["peak_flops_per_device"] = peak
    return report
