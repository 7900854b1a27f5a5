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
Where the time goes, in the same JSON: `breakdown_ms` (rank 0's median step split into data,
forward, NaN check, backward = compute + gradient reduction by DeepSpeed's own timers, optimizer
step, other: train/breakdown.py), `baseline_breakdown_ms` (the plain step's forward, backward,
step), `share_step_s` / `ceiling_ratio` (the plain step on one rank's share of the batch: the ratio
the group would reach if communication and every overhead were free), `collectives_ms` (one
all_reduce, reduce_scatter and all_gather of the trainable parameters' bytes on the ranks' process
group, alone: the transport's floor).
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
    """The run's config as the bench uses it: fixed batches, no saves, no resume, the per-step
    breakdown on (on CPU it only reads clocks; on GPU it synchronizes, so GPU figures are a little low)."""
    train = dataclasses.replace(cfg.train, fixed_batches=True, save_every=0, resume="never", breakdown=True)
    return dataclasses.replace(cfg, train=train)


class PlainTrainer:
    """One process, plain PyTorch: the baseline step (a Ray actor with one rank's resources)."""

    def setup(self, cfg: RunConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        import torch

        from vla_dist.config.train_checks import global_batch_size
        from vla_dist.models.build import build_policy
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
        # the ranks' optimizer (distributed/ds_config.py): torch's fused AdamW kernel with train.fused_optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=t.weight_decay, fused=t.fused_optimizer or None)
        self.grad_clip = float(t.grad_clip)
        windows = EpisodeWindows(cfg.data.dir, policy.cameras, policy.chunk_size, 0, 1)
        self.batches = {size: windows.batch(size, (cfg.run.seed, 0, 0))
                        for size in (global_batch_size(t), t.micro_batch_size * t.grad_accum)}
        if self.on_gpu:
            self.batches = {size: _to(batch, self.device) for size, batch in self.batches.items()}
        self.batch = self.batches[global_batch_size(t)]
        return {"threads": torch.get_num_threads(), "batch": int(self.batch.actions.shape[0])}

    def _sync(self) -> None:
        if self.on_gpu:
            import torch

            torch.cuda.synchronize()

    def _step(self, ms: dict[str, float]) -> Any:
        import torch

        marks = [time.perf_counter()]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu):
            loss = self.policy(self.batch)
        self._sync()
        marks.append(time.perf_counter())
        loss.backward()
        self._sync()
        marks.append(time.perf_counter())
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        marks.append(time.perf_counter())
        for name, begin, end in zip(("forward", "backward", "step"), marks, marks[1:], strict=False):
            ms[name] = (end - begin) * 1e3
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

    def measure(self, steps: int, batch_size: int | None = None) -> tuple[list[float], dict[str, float]]:
        """Step times (s) of `steps` plain steps on the global batch (or `batch_size` windows: one
        rank's share), and the median breakdown (ms: forward, backward, step = clip + optimizer)."""
        if batch_size is not None:
            self.batch = self.batches[batch_size]
        times, phases = [], []
        for _ in range(steps):
            self._sync()
            started = time.perf_counter()
            ms: dict[str, float] = {}
            loss = self._step(ms)
            float(loss.detach())  # waits for the step on GPU
            times.append(time.perf_counter() - started)
            phases.append(ms)
        return times, _median_rows(phases)


def _median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over the rows that have it (ms, rounded)."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: round(statistics.median(row[key] for row in rows if key in row), 3) for key in keys}


def _to(batch: Any, device: str) -> Any:
    import torch

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def run_baseline(cfg: RunConfig, manifest: dict[str, Any], steps: int) -> dict[str, Any]:
    import ray

    t = cfg.train
    share = t.micro_batch_size * t.grad_accum  # one rank's windows per step
    actor = ray.remote(PlainTrainer).options(num_cpus=t.cpus_per_rank, num_gpus=t.gpus_per_rank).remote()
    try:
        info = ray.get(actor.setup.remote(cfg, manifest))
        flops = ray.get(actor.flops_per_sample.remote())
        ray.get(actor.measure.remote(WARMUP))
        times, breakdown = ray.get(actor.measure.remote(steps))
        ray.get(actor.measure.remote(WARMUP, share))
        share_times, _ = ray.get(actor.measure.remote(steps, share))
    finally:
        ray.kill(actor, no_restart=True)
    return {**info, "flops_per_sample": flops, "median_step_s": statistics.median(times), "breakdown_ms": breakdown,
            "share_step_s": statistics.median(share_times)}


def release_ray(started_here: bool) -> None:
    """Ray's driver holds repeated worker log lines (deduplication) and prints them when it shuts
    down: a bench that started Ray shuts it down before returning, so the JSON report printed after
    stays stdout's last line. A Ray started by the caller (tests, a cluster job) is left running."""
    import ray

    if started_here and ray.is_initialized():
        ray.shutdown()


def run_train_bench(cfg: RunConfig) -> dict[str, object]:
    from vla_dist.config.train_checks import global_batch_size
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
        floor = group.run(lambda a, r: a.time_collectives.remote(info["trainable"]))[0]
    finally:
        group.shutdown()
        release_ray(started_ray)
    step_s = statistics.median(row["step_time_s"] for row in rows)
    value, baseline = global_batch / step_s, global_batch / base["median_step_s"]
    ceiling = global_batch / base["share_step_s"]  # every rank as fast as one plain process on its share
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
        # where a rank's step goes (rank 0, median ms; train/breakdown.py) and the plain step's
        breakdown_ms=_median_rows([row["breakdown_ms"] for row in rows]),
        baseline_breakdown_ms=base["breakdown_ms"],
        # the plain step on one rank's share of the batch: no rank computes its share faster, so
        # ceiling_ratio is what the group would reach with no communication or overhead at all
        share_step_s=round(base["share_step_s"], 4),
        ceiling_ratio=round(ceiling / baseline, 3),
        # one all_reduce / reduce_scatter / all_gather of the trainable parameters' float32 bytes on
        # this process group, alone: the transport's floor for a gradient reduction
        collectives_ms={**floor, "bytes": 4 * info["trainable"]},
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
