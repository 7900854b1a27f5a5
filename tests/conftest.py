"""Session-wide set-up for tests that use the real stack (Genesis, Ray, DeepSpeed).

Compile caches go to one directory (VLA_DIST_CACHE_DIR, default ~/.cache/vla-dist) so Genesis
kernels are compiled once per machine, and a local Ray is started once per test session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vla_dist.runtime import apply_cache_env

REPO_ROOT = Path(__file__).resolve().parents[1]

# Before anything imports Genesis or torch's compilers: every test process and Ray worker shares it.
apply_cache_env(os.environ.get("VLA_DIST_CACHE_DIR"))


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A real in-process Ray cluster for the session (dashboard off, localhost only)."""
    import ray

    from vla_dist.runtime import init_ray

    init_ray(address=None, num_cpus=2, cache_dir=os.environ.get("VLA_DIST_CACHE_DIR"))
    yield
    ray.shutdown()
