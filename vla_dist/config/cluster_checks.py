"""Value rules for `collect` placement keys and the `cluster` section (appended to
`vla_dist.config.validate.CHECKS`). Plain functions on the RunConfig; no Ray, no I/O. What they
check is rendered and placed by `vla_dist/cluster/`; the rules live with the other config rules."""

from __future__ import annotations

import re
from collections.abc import Callable

from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

# Ray's own resource names have their own keys (cpus_per_actor, memory_per_actor_gb); a custom
# resource spelled like one would silently double-book or be ignored.
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CLOUD_PROVIDERS = ("aws",)


def _actor_resources(cfg: RunConfig) -> None:
    for name, amount in cfg.collect.actor_resources.items():
        if name in RESERVED_RESOURCES:
            raise ConfigError("collect.actor_resources", f"{name!r} is Ray's own resource; use collect.cpus_per_actor "
                              "or collect.memory_per_actor_gb (GPU sim actors are not supported yet)")
        if not amount > 0:
            raise ConfigError("collect.actor_resources", f"{name}: must be > 0, got {amount!r}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(key, f"must be >= 0, got {value!r}")


def _positive(key: str, value: float) -> None:
    if value < 1:
        raise ConfigError(key, f"must be >= 1, got {value!r}")


def _collect_memory(cfg: RunConfig) -> None:
    _non_negative("collect.memory_per_actor_gb", cfg.collect.memory_per_actor_gb)


def _dashboard_address(cfg: RunConfig) -> None:
    address = cfg.cluster.dashboard_address
    if not re.match(r"^https?://[^/\s]+(:\d+)?/?$", address):
        raise ConfigError("cluster.dashboard_address", f"must be http(s)://HOST:PORT of the Ray Jobs server, "
                          f"got {address!r}")


def _shared_dir(cfg: RunConfig) -> None:
    shared = cfg.cluster.shared_dir
    if shared is not None and not shared.startswith("/"):
        raise ConfigError("cluster.shared_dir", f"must be an absolute path (the same on every node), got {shared!r}")


def _slurm(cfg: RunConfig) -> None:
    s = cfg.cluster.slurm
    _positive("cluster.slurm.nodes", s.nodes)
    _positive("cluster.slurm.cpus_per_node", s.cpus_per_node)
    _non_negative("cluster.slurm.gpus_per_node", s.gpus_per_node)
    _non_negative("cluster.slurm.mem_per_node_gb", s.mem_per_node_gb)
    _non_negative("cluster.slurm.signal_grace_s", s.signal_grace_s)
    if s.sim_per_node is not None:
        _non_negative("cluster.slurm.sim_per_node", s.sim_per_node)
    if s.join_timeout_s < 10:
        raise ConfigError("cluster.slurm.join_timeout_s",
                          f"must be >= 10 (nodes take seconds to start Ray), got {s.join_timeout_s}")
    if not SLURM_TIME.match(s.time):
        raise ConfigError("cluster.slurm.time",
                          f"must be a SLURM time limit like 04:00:00 or 1-00:00:00, got {s.time!r}")
    for key, port in (("head_port", s.head_port), ("dashboard_port", s.dashboard_port)):
        if not 1024 <= port <= 65535:
            raise ConfigError(f"cluster.slurm.{key}", f"must be in 1024..65535, got {port}")
    if s.venv is not None and s.container is not None:
        raise ConfigError("cluster.slurm.container",
                          "set either cluster.slurm.venv or cluster.slurm.container, not both")
    for option in s.extra_sbatch:
        if not option.startswith("--"):
            raise ConfigError("cluster.slurm.extra_sbatch",
                              f"each entry is a long sbatch option like '--qos=high', got {option!r}")


def _kuberay(cfg: RunConfig) -> None:
    k = cfg.cluster.kuberay
    for key in ("name", "namespace", "shared_pvc", "operator_namespace"):
        if not DNS_1123.match(getattr(k, key)):
            raise ConfigError(f"cluster.kuberay.{key}",
                              f"must be a DNS-1123 label (lowercase, digits, '-'), got {getattr(k, key)!r}")
    for key in ("gpu_workers", "gpus_per_worker", "sim_workers"):
        _non_negative(f"cluster.kuberay.{key}", getattr(k, key))
    for key in ("head_cpus", "head_memory_gb", "gpu_worker_cpus", "gpu_worker_memory_gb", "sim_worker_cpus",
                "sim_worker_memory_gb"):
        _positive(f"cluster.kuberay.{key}", getattr(k, key))


def _cloud(cfg: RunConfig) -> None:
    c = cfg.cluster.cloud
    if c.provider not in CLOUD_PROVIDERS:
        raise ConfigError("cluster.cloud.provider", f"must be one of {', '.join(CLOUD_PROVIDERS)}; got {c.provider!r}")
    _non_negative("cluster.cloud.gpu_workers_max", c.gpu_workers_max)
    _non_negative("cluster.cloud.sim_workers_min", c.sim_workers_min)
    if c.sim_workers_max < c.sim_workers_min:
        raise ConfigError("cluster.cloud.sim_workers_max",
                          f"must be >= cluster.cloud.sim_workers_min={c.sim_workers_min}, got {c.sim_workers_max}")
    _positive("cluster.cloud.idle_timeout_minutes", c.idle_timeout_minutes)
    _positive("cluster.cloud.sim_per_node", c.sim_per_node)


CLUSTER_CHECKS: list[Callable[[RunConfig], None]] = [
    _actor_resources,
    _collect_memory,
    _dashboard_address,
    _shared_dir,
    _slurm,
    _kuberay,
    _cloud,
]
