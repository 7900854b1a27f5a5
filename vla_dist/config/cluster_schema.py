"""The cluster section of the run configuration (`cluster.*`: where Ray runs, and the SLURM, KubeRay
and cloud renderers' settings), composed into `RunConfig` by `vla_dist.config.schema`, which
re-exports it. Validated in `vla_dist.config.cluster_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlurmSection:
    """`vla-dist cluster render slurm`: the sbatch script that brings Ray up on an allocation."""

    nodes: int = 2  # Ray nodes, one per SLURM node; the first also runs the head and the driver
    gpus_per_node: int = 0
    cpus_per_node: int = 8  # CPUs Ray offers on each node (sbatch --cpus-per-task)
    mem_per_node_gb: int = 0  # sbatch --mem; 0: the partition's default
    sim_per_node: int | None = None  # "sim" resource each node advertises; null: cpus_per_node
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"  # sbatch --time ([D-]HH:MM:SS)
    job_name: str = "vla-dist"
    venv: str | None = ".venv"  # activated on every node (relative: to the submit directory)
    container: str | None = None  # enroot/pyxis image for srun --container-image (instead of venv)
    exclusive: bool = True  # whole nodes: Ray assumes it owns the node's CPUs and GPUs
    requeue: bool = True  # sbatch --requeue: node failure or preemption restarts with train.resume=auto
    signal_grace_s: int = 300  # USR1 this long before the time limit: the trainer saves, the job requeues
    join_timeout_s: int = 300  # every node must join Ray within this, or the job fails naming the missing
    head_port: int = 6379  # GCS port on the first node
    dashboard_port: int = 8265  # bound to 127.0.0.1 on the first node (ssh -L to reach it)
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. ["--qos=high"]


@dataclass
class KubeRaySection:
    """`vla-dist cluster render kuberay`: RayCluster + RayJob for the KubeRay operator (>= 1.5.1)."""

    name: str = "vla-dist"  # RayCluster/RayJob name (DNS-1123)
    namespace: str = "default"
    ray_version: str = "2.60.0"  # must match the image's Ray
    head_cpus: int = 4
    head_memory_gb: int = 16
    gpu_workers: int = 1  # GPU worker group (trainer ranks)
    gpus_per_worker: int = 1
    gpu_worker_cpus: int = 8
    gpu_worker_memory_gb: int = 64
    sim_workers: int = 2  # CPU sim worker group (advertises the "sim" resource)
    sim_worker_cpus: int = 8
    sim_worker_memory_gb: int = 32
    shared_pvc: str = "vla-dist-shared"  # ReadWriteMany claim mounted at cluster.shared_dir on every pod
    # The dashboard (and Jobs API) listens on 127.0.0.1 in the head pod: reach it with kubectl
    # port-forward. A RayJob needs the operator to poll it over the head Service: rendering one asks
    # for a pod-network address here (e.g. 0.0.0.0), protected by token auth and a NetworkPolicy.
    dashboard_host: str = "127.0.0.1"
    operator_namespace: str = "kuberay-system"  # the only namespace the NetworkPolicy lets reach 8265


@dataclass
class CloudSection:
    """`vla-dist cluster render autoscaler`: a Ray autoscaler (`ray up`) cluster YAML, AWS."""

    provider: str = "aws"
    region: str = "us-west-2"
    head_instance: str = "m6i.2xlarge"
    gpu_instance: str = "g5.2xlarge"
    sim_instance: str = "c6i.8xlarge"
    gpu_workers_max: int = 4
    sim_workers_min: int = 1  # >= 1: sim actors fail fast when no node offers the "sim" resource
    sim_workers_max: int = 8
    sim_per_node: int = 32  # "sim" resource a sim node advertises (its vCPUs: 32 on a c6i.8xlarge)
    idle_timeout_minutes: int = 10


@dataclass
class ClusterSection:
    address: str | None = None  # null: start Ray in-process; else "auto" or "HOST:PORT" to join
    num_cpus: int | None = None  # in-process Ray only: CPUs to offer (null: all)
    cache_dir: str | None = None  # compile caches (Genesis kernels, ...); null: ~/.cache/vla-dist
    # Ray Jobs server (the head's dashboard) that `vla-dist submit` talks to; tunnel it to localhost
    dashboard_address: str = "http://127.0.0.1:8265"
    # A directory every node sees at the same path (NFS/Lustre, the KubeRay PVC mount); on cluster
    # runs a relative run.dir/data.dir is placed under it. null: the submit directory (SLURM only).
    shared_dir: str | None = None
    image: str = "vla-dist:latest"  # the project's Docker image (Dockerfile), for KubeRay and the cloud
    slurm: SlurmSection = field(default_factory=SlurmSection)
    kuberay: KubeRaySection = field(default_factory=KubeRaySection)
    cloud: CloudSection = field(default_factory=CloudSection)
