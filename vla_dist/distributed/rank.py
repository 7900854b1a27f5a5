"""What every DeepSpeed rank does, whatever it trains: `DeepSpeedRank`, the base of the SFT rank
(train/worker.py) and the RL rank (rl/worker.py).

A rank is a Ray actor that looks like a torchrun process (distributed/group.py gives it its
rendezvous env). The base owns the process group (gloo on CPU, NCCL on GPU), the engine over
whatever module the subclass builds, the small collectives the drivers' bookkeeping needs, saving
the engine's state, and gathering the trainable weights (ZeRO-3 partitions them) for a weight sync.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vla_dist.config.schema import RunConfig
from vla_dist.distributed.group import node_address_and_free_port


def reset_peak_rss() -> None:
    """Start a new peak for `peak_rss_mb` (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def process_memory_mb(field: str = "VmHWM") -> float | None:
    """A memory field of this process's /proc/self/status in MiB (VmHWM: the peak resident memory
    since start or `reset_peak_rss`; VmRSS, RssAnon: now); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    return process_memory_mb("VmHWM")


def held_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The parameter data this process holds: a ZeRO-3 partitioned parameter's own partition."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module.parameters())


def held_elements(module: torch.nn.Module) -> int:
    """Parameter elements this process holds: a ZeRO-3 partitioned parameter counts its own partition."""
    return sum(int(tensor.numel()) for tensor in held_tensors(module))


class DeepSpeedRank:
    cfg: RunConfig
    engine: Any
    rank: int
    world_size: int
    on_gpu: bool

    def address_and_port(self) -> tuple[str, int, str]:
        return node_address_and_free_port()

    def release(self) -> None:
        """Let go of what this rank started besides itself (a trainer's DataLoader workers) before the
        group kills it; TrainerGroup.shutdown calls it, briefly, on every rank."""

    def init_distributed(self, env: dict[str, str], cfg: RunConfig) -> str:
        """Join the process group described by `env` (distributed/group.py's rank_env); -> the device."""
        os.environ.update(env)
        import deepspeed  # after DS_ACCELERATOR and the rendezvous variables are set

        from vla_dist.runtime import captured_output

        self.cfg = cfg
        self.on_gpu = cfg.train.gpus_per_rank > 0
        with captured_output():  # "DeepSpeed ...shm_comm_op built successfully" on every start, cached or not
            deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", auto_mpi_discovery=False)
        self.rank, self.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if not self.on_gpu:
            self._unlink_shm_buffer(env)
        device = f"cuda:{env['LOCAL_RANK']}" if self.on_gpu else "cpu"
        if self.on_gpu:
            torch.cuda.set_device(device)
        return device

    @contextmanager
    def partitioned_loading(self, ds_config: dict[str, Any]) -> Iterator[None]:
        """Inside: at ZeRO-3, a checkpoint that transformers' `from_pretrained` loads (a plain HF
        checkpoint or a saved policy) is built already partitioned (`deepspeed.zero.Init`) and filled
        one module at a time, rank 0 copying each module's weights from the memory-mapped
        safetensors into the gathered module before it is re-partitioned: no rank ever holds the
        whole model (measured in docs/benchmarks.md). transformers does this while an
        `HfDeepSpeedConfig` of stage 3 is alive; outside this block none is. Other stages, and a
        random init of a preset (no model.pretrained: built whole, so that its seeded values are the
        same at every stage; DeepSpeed partitions it when the engine starts): nothing."""
        from vla_dist.models.files import check_adapter_dir

        pretrained = self.cfg.model.pretrained
        # An unmerged LoRA export is merged into its base as it loads: peft merges whole weights only.
        if self.cfg.train.zero_stage != 3 or not pretrained or check_adapter_dir(Path(pretrained)) is not None:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # zero.Init partitions in the config's precision: the model's own (a bf16 checkpoint stays bf16
        # on CPU ranks too, whose training config is otherwise fp32: half the memory while loading).
        bf16 = self.cfg.model.dtype == "bfloat16" or bool(ds_config.get("bf16", {}).get("enabled"))
        keep_alive = HfDeepSpeedConfig({**ds_config, "bf16": {"enabled": bf16}})  # transformers keeps a weakref
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del keep_alive

    def measured_load(self, build: Callable[[], torch.nn.Module]) -> tuple[Any, dict[str, Any]]:
        """(build(), what building it cost this rank: parameter elements held, peak resident MiB)."""
        reset_peak_rss()
        policy = build()
        return policy, {"held_elements": held_elements(policy), "peak_rss_mb": peak_rss_mb()}

    def _unlink_shm_buffer(self, env: dict[str, str]) -> None:
        """DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp, used when all ranks
        share a node) creates one ~66 MB /dev/shm segment per rank and never unlinks it: every run,
        and every rank killed, left world_size segments in RAM until reboot (hundreds of them on a
        shared test machine, then Ray's OOM killer). init_distributed returns on a rank only once it
        has mapped every rank's segment, so after a barrier the names are no longer needed: each rank
        unlinks its own, and the memory goes with the last process that maps it (exit or kill -9)."""
        import torch.distributed as dist

        dist.barrier()
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{self.rank}"
        Path("/dev/shm", name).unlink(missing_ok=True)

    def _all_min(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return float(tensor.item())

    def _all_mean(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def _save_engine(self, path: Path) -> None:
        """This rank's part of the engine's state in `path`: DeepSpeed's shards and, at ZeRO stage 0
        (no ZeRO partitions), our own safetensors copy for export and elastic resume."""
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if self.cfg.train.zero_stage == 0:
            from vla_dist.checkpoint.stage0 import save_stage0

            save_stage0(self.engine, path, self.rank)

    def gathered_trainable(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Collective: `module`'s trainable parameters, whole (ZeRO-3 gathers them), as float32 CPU
        copies keyed like module.named_parameters(), on rank 0; {} on the others."""
        import deepspeed

        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if self.rank != 0:
                return {}
            return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in named}

    def save_gathered_pretrained(self, module: Any, out_dir: str | Path) -> None:
        """Collective: `module.save_pretrained(out_dir)` on rank 0 with every parameter gathered
        (ZeRO-3 partitions them; a no-op at stages 0-2)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank == 0:
                module.save_pretrained(out_dir)

    def time_collectives(self, numel: int, repeats: int = 3) -> dict[str, float]:
        """Collective: median ms of one all_reduce, reduce_scatter and all_gather of `numel` float32
        elements over this process group, ranks lined up by a barrier before each: the floor of a
        gradient reduction on this transport (`vla-dist bench train` reports it beside the step)."""
        import statistics
        import time

        import torch.distributed as dist

        device = "cuda" if self.on_gpu else "cpu"
        numel -= numel % self.world_size
        whole = torch.zeros(numel, dtype=torch.float32, device=device)
        part = torch.zeros(numel // self.world_size, dtype=torch.float32, device=device)
        calls = {"all_reduce": lambda: dist.all_reduce(whole),
                 "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, whole),
                 "all_gather": lambda: dist.all_gather_into_tensor(whole, part)}
        out: dict[str, float] = {}
        for name, call in calls.items():
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                dist.barrier()
                started = time.perf_counter()
                call()
                if self.on_gpu:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - started) * 1e3)
            out[name] = round(statistics.median(times[1:]), 3)
        return out
