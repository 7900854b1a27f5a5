"""Process-level setup shared by the driver and every Ray actor: compile caches and Ray start-up.

Genesis compiles its physics kernels (minutes, cold), inductor its graphs and DeepSpeed its comm
ops; all of them cache on disk. Pointing every process (Ray actors included, through `runtime_env`)
at one cache directory means each is compiled once per machine, not once per actor.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "vla-dist"


def cache_env(cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """Environment variables that send every compile cache under `cache_dir`."""
    root = Path(cache_dir or os.environ.get("VLA_DIST_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser().resolve()
    return {
        "VLA_DIST_CACHE_DIR": str(root),
        "XDG_CACHE_HOME": str(root / "xdg"),  # Genesis assets and quadrants kernel cache (qdcache)
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
    }


def apply_cache_env(cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """Set the cache variables in this process (before Genesis/torch compile anything)."""
    env = cache_env(cache_dir)
    os.environ.update(env)
    return env


def init_ray(address: str | None, num_cpus: int | None, cache_dir: str | None) -> dict[str, str]:
    """Join the configured Ray cluster, or start one in this process when `address` is null.

    Every worker inherits the compile-cache variables through the job's `runtime_env`. The dashboard
    is never exposed beyond this host: disabled for an in-process Ray (nothing to look at that the
    progress bar does not show); a cluster's own dashboard is set up by `cluster/`.
    Returns the cache environment that was applied.
    """
    import ray

    env = apply_cache_env(cache_dir)
    if ray.is_initialized():
        return env
    runtime_env = {"env_vars": env}
    if address is None:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            logging_level="warning",
            log_to_driver=True,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env, logging_level="warning")
    return env
