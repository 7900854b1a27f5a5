"""Session-wide set-up for tests that use the real stack (Genesis, Ray, DeepSpeed).

Compile caches go to one directory (VLA_DIST_CACHE_DIR, default ~/.cache/vla-dist) so Genesis
kernels are compiled once per machine, and a local Ray is started once per test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vla_dist.runtime import apply_cache_env

REPO_ROOT = Path(__file__).resolve().parents[1]

# Before anything imports Genesis or torch's compilers: every test process and Ray worker shares it.
apply_cache_env(os.environ.get("VLA_DIST_CACHE_DIR"))


WARM_GENESIS = """
from vla_dist.sim.scene import TabletopScene
scene = TabletopScene(n_envs=2, image_size=32)
scene.render()
"""


@pytest.fixture(scope="session")
def genesis_kernels() -> None:
    """Compile Genesis' kernels into the shared cache once, in one process, before any test starts
    several sim actors at once (each would otherwise compile the same kernels cold, side by side)."""
    proc = subprocess.run([sys.executable, "-c", WARM_GENESIS], capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def local_ray(genesis_kernels: None) -> Iterator[None]:
    """A real in-process Ray cluster for the session (dashboard off, localhost only)."""
    import ray

    from vla_dist.runtime import init_ray

    init_ray(address=None, num_cpus=2, cache_dir=os.environ.get("VLA_DIST_CACHE_DIR"))
    yield
    ray.shutdown()


QUICKSTART_EPISODES = 8


@pytest.fixture(scope="session")
def quickstart_run(
    tmp_path_factory: pytest.TempPathFactory, genesis_kernels: None
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """`vla-dist collect` as a user runs it from the README (quickstart config, 2 sim actors), in
    its own process; its dataset is the one later tests (data, models, eval) read."""
    root = tmp_path_factory.mktemp("quickstart")
    run_dir, data_dir = root / "run", root / "data"
    command = [
        sys.executable, "-m", "vla_dist", "collect", f"run.dir={run_dir}", f"data.dir={data_dir}",
        f"collect.episodes={QUICKSTART_EPISODES}", "data.shard_max_episodes=3",
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, data_dir, proc
