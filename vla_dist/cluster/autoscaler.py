"""`vla-dist cluster render autoscaler`: a Ray cluster launcher / autoscaler YAML (`ray up`) for AWS.

Node types: a head that only runs drivers (CPU 0), GPU workers for trainer ranks (0..max, scaled on
demand), CPU sim workers advertising "sim" (at least `sim_workers_min`, so sim actors find the
resource from the start). Every node runs the project's image with the shared directory mounted,
token auth on (the token file is copied from the machine running `ray up`), and the dashboard on
127.0.0.1 of the head (`ray dashboard cluster.yaml` tunnels it).
"""

from __future__ import annotations

from typing import Any

import yaml

from vla_dist.config.schema import RunConfig

TOKEN_PATH = "/root/.ray/auth_token"


def autoscaler_config(cfg: RunConfig) -> dict[str, Any]:
    c = cfg.cluster.cloud
    shared = cfg.cluster.shared_dir or "/shared"
    env = ["--env RAY_AUTH_MODE=token", f"--env RAY_AUTH_TOKEN_PATH={TOKEN_PATH}",
           f"--env VLA_DIST_CACHE_DIR={shared}/.cache/vla-dist"]
    return {
        "cluster_name": cfg.cluster.kuberay.name,
        "max_workers": c.gpu_workers_max + c.sim_workers_max,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": c.idle_timeout_minutes,
        "docker": {
            "image": cfg.cluster.image,
            "container_name": "vla-dist",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536", f"--volume {shared}:{shared}", *env],
            "worker_run_options": [],
        },
        "provider": {"type": c.provider, "region": c.region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        # Token file from the machine running `ray up` (`ray get-auth-token --generate` makes one).
        "file_mounts": {TOKEN_PATH: "~/.ray/auth_token"},
        "available_node_types": {
            "head": {"node_config": {"InstanceType": c.head_instance}, "resources": {"CPU": 0}, "min_workers": 0,
                     "max_workers": 0},
            "gpu_worker": {"node_config": {"InstanceType": c.gpu_instance}, "resources": {}, "min_workers": 0,
                           "max_workers": c.gpu_workers_max, "docker": {"worker_run_options": ["--gpus all"]}},
            "sim_worker": {"node_config": {"InstanceType": c.sim_instance}, "resources": {"sim": c.sim_per_node},
                           "min_workers": c.sim_workers_min, "max_workers": c.sim_workers_max},
        },
        "head_node_type": "head",
        # The shared filesystem (EFS, FSx, NFS) must be mounted at `shared` on every host; add your
        # mount command here (e.g. `sudo mount -t efs fs-XXXX:/ <shared>` with amazon-efs-utils).
        "initialization_commands": [f"sudo mkdir -p {shared}"],
        "setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            (
                "ulimit -n 65536; ray start --head --port=6379 --dashboard-host=127.0.0.1 "
                "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats"
            ),
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --disable-usage-stats",
        ],
    }


def render_autoscaler(cfg: RunConfig) -> dict[str, str]:
    header = ("# Rendered by `vla-dist cluster render autoscaler`; re-render rather than edit.\n"
              "# ray up ray-cluster.yaml; ray dashboard ray-cluster.yaml (tunnels 8265 to this machine);\n"
              "# then: vla-dist submit collect collect.actor_resources={sim: 1} cluster.dashboard_address=http://127.0.0.1:8265\n")
    return {"ray-cluster.yaml": header + yaml.safe_dump(autoscaler_config(cfg), sort_keys=False, width=120)}
