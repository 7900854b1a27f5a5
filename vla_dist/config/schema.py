"""The typed run configuration: one dataclass per component, composed into `RunConfig`.

OmegaConf builds a structured config from these classes, so an unknown key or a wrong type is
rejected by OmegaConf itself with the full key path; value ranges and cross-field rules are checked
in `vla_dist.config.validate`. Keys named in `shared/design.md` are a contract: renaming one is a
breaking change (tests/test_config.py freezes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSection:
    dir: str = "runs/quickstart"  # outputs: config.yaml, report.json, videos/, metrics.jsonl, checkpoints/
    seed: int = 0  # base seed; episode i of a collection uses a seed derived from (seed, i)


@dataclass
class TaskSection:
    # one of vla_dist.sim.tasks.TASKS, or "all" to spread episodes round-robin over every task
    name: str = "all"
    image_size: int = 64  # square RGB images for every camera, pixels
    cameras: list[str] = field(default_factory=lambda: ["front", "wrist"])
    control_hz: int = 10  # policy/action rate; physics runs at 1/sim.dt
    max_steps: int = 0  # episode step limit at control_hz; 0: the task's own default


@dataclass
class SimSection:
    backend: str = "cpu"  # "cpu" or "gpu" (Genesis backend)
    dt: float = 0.01  # physics step, seconds
    substeps: int = 2


@dataclass
class CollectSection:
    episodes: int = 12  # successful episodes to write (exact)
    num_actors: int = 2  # Ray sim actors, one Genesis scene each
    envs_per_actor: int = 2  # parallel envs (n_envs) in each actor's scene; also the work-chunk size
    keep_failures: bool = False  # also write failed expert episodes, marked success=false
    max_attempts_factor: float = 3.0  # give up after episodes * factor attempts (expert broken?)
    max_actor_restarts: int = 3  # Ray restarts of a dead sim actor before collection fails
    num_videos: int = 3  # episodes written as mp4 under run.dir/videos/
    cpus_per_actor: float = 1.0  # Ray resources a sim actor reserves
    overwrite: bool = False  # allow collecting into a data.dir that already holds shards


@dataclass
class DataSection:
    dir: str = "data/quickstart"  # shards (*.tar) and manifest.json
    image_codec: str = "mp4"  # "mp4" (H.264, small) or "npz" (lossless, zlib)
    shard_max_episodes: int = 64
    shard_max_bytes: int = 256 * 1024 * 1024


@dataclass
class ClusterSection:
    address: str | None = None  # null: start Ray in-process; else "auto" or "HOST:PORT" to join
    num_cpus: int | None = None  # in-process Ray only: CPUs to offer (null: all)
    cache_dir: str | None = None  # compile caches (Genesis kernels, ...); null: ~/.cache/vla-dist


@dataclass
class BenchSection:
    rollout_actors: int = 2  # N in the N-actor vs 1-actor scaling measurement
    rollout_steps: int = 30  # control steps measured per configuration (after warm-up)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=TaskSection)
    sim: SimSection = field(default_factory=SimSection)
    collect: CollectSection = field(default_factory=CollectSection)
    data: DataSection = field(default_factory=DataSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    bench: BenchSection = field(default_factory=BenchSection)
