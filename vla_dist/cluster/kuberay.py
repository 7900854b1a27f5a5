"""`vla-dist cluster render kuberay`: manifests for the KubeRay operator (>= 1.5.1: token auth, the
group-level `resources` field, RayJob SidecarMode).

- raycluster.yaml: ConfigMap (the job's config) + RayCluster: a head that only runs drivers
  (num-cpus 0), a GPU worker group for trainer ranks, a CPU sim group advertising "sim" so sim
  actors with collect.actor_resources={sim: 1} land there; every pod mounts the shared claim at
  cluster.shared_dir (data.dir, run.dir and the compile cache). The dashboard listens on 127.0.0.1
  in the head pod: `kubectl port-forward` to it, then `vla-dist submit`.
- rayjob.yaml: ConfigMap + RayJob (its own cluster, torn down when the job ends) + NetworkPolicy.
  The operator polls the job's status over the head Service, so a RayJob needs the dashboard on the
  pod network: rendered only when cluster.kuberay.dashboard_host asks for that, with token auth and
  a NetworkPolicy that lets only the operator's namespace reach port 8265.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from vla_dist.cluster.jobspec import cluster_job_config, driver_argv, shell_join
from vla_dist.config import to_yaml
from vla_dist.config.schema import RunConfig

DEFAULT_SHARED_DIR = "/shared"
CONFIG_MOUNT = "/etc/vla-dist"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PORTS = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
         {"containerPort": 10001, "name": "client"}]


def shared_dir(cfg: RunConfig) -> str:
    return cfg.cluster.shared_dir or DEFAULT_SHARED_DIR


def _container(cfg: RunConfig, name: str, cpus: int, memory_gb: int, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gb}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": cfg.cluster.image,
        "resources": {"limits": limits, "requests": dict(limits)},
        # One compile cache on the shared volume: Genesis kernels are compiled once per cluster.
        "env": [{"name": "VLA_DIST_CACHE_DIR", "value": f"{shared_dir(cfg)}/.cache/vla-dist"}],
        "volumeMounts": [{"name": "shared", "mountPath": shared_dir(cfg)}],
    }
    if name == "ray-head":
        container["ports"] = copy.deepcopy(PORTS)
        container["volumeMounts"].append({"name": "job-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    return container


def _pod(cfg: RunConfig, role: str, container: dict[str, Any]) -> dict[str, Any]:
    k = cfg.cluster.kuberay
    volumes: list[dict[str, Any]] = [{"name": "shared", "persistentVolumeClaim": {"claimName": k.shared_pvc}}]
    if role == "head":
        volumes.append({"name": "job-config", "configMap": {"name": f"{k.name}-config"}})
    return {"metadata": {"labels": {"vla-dist/cluster": k.name, "vla-dist/role": role}},
            "spec": {"containers": [container], "volumes": volumes}}


def _group(
    cfg: RunConfig, name: str, replicas: int, container: dict[str, Any], resources: dict[str, str]
) -> dict[str, Any]:
    group: dict[str, Any] = {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": replicas,  # >= 1 sim node from the start: sim actors fail fast if none offers "sim"
        "maxReplicas": replicas,
        "rayStartParams": {},
        "template": _pod(cfg, name, container),
    }
    if resources:
        group["resources"] = resources
    return group


def cluster_spec(cfg: RunConfig, dashboard_host: str) -> dict[str, Any]:
    k = cfg.cluster.kuberay
    head = _container(cfg, "ray-head", k.head_cpus, k.head_memory_gb)
    groups = []
    if k.gpu_workers:
        gpu = _container(cfg, "ray-worker", k.gpu_worker_cpus, k.gpu_worker_memory_gb, k.gpus_per_worker)
        groups.append(_group(cfg, "gpu", k.gpu_workers, gpu, {}))
    if k.sim_workers:
        sim = _container(cfg, "ray-worker", k.sim_worker_cpus, k.sim_worker_memory_gb)
        groups.append(_group(cfg, "sim", k.sim_workers, sim, {"sim": str(k.sim_worker_cpus)}))
    return {
        "rayVersion": k.ray_version,
        "authOptions": {"mode": "token"},  # KubeRay makes a Secret and sets RAY_AUTH_* on every pod
        "headGroupSpec": {
            # num-cpus 0: the head runs drivers only; actors and ranks go to the worker groups.
            "rayStartParams": {"dashboard-host": dashboard_host, "num-cpus": "0"},
            "template": _pod(cfg, "head", head),
        },
        "workerGroupSpecs": groups,
    }


def _config_map(cfg: RunConfig) -> dict[str, Any]:
    k = cfg.cluster.kuberay
    job_cfg = cluster_job_config(cfg, shared_dir=shared_dir(cfg), require_shared=True)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{k.name}-config", "namespace": k.namespace},
            "data": {"config.yaml": to_yaml(job_cfg)}}


def ray_cluster(cfg: RunConfig) -> dict[str, Any]:
    k = cfg.cluster.kuberay
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": k.name, "namespace": k.namespace, "labels": {"vla-dist/cluster": k.name}},
            "spec": cluster_spec(cfg, "127.0.0.1")}


def ray_job(cfg: RunConfig, command: str) -> dict[str, Any]:
    k = cfg.cluster.kuberay
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"{k.name}-{command.split()[0]}", "namespace": k.namespace},
        "spec": {
            "entrypoint": shell_join(driver_argv(command, f"{CONFIG_MOUNT}/config.yaml")),
            "submissionMode": "SidecarMode",  # the submitter runs in the head pod, reaching it on localhost
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": cluster_spec(cfg, k.dashboard_host),
        },
    }


def dashboard_policy(cfg: RunConfig) -> dict[str, Any]:
    """Head pods: the cluster's own pods reach every port; the operator's namespace only 8265."""
    k = cfg.cluster.kuberay
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{k.name}-head", "namespace": k.namespace},
        "spec": {
            "podSelector": {"matchLabels": {"vla-dist/cluster": k.name, "vla-dist/role": "head"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"vla-dist/cluster": k.name}}}]},
                {"from": [{"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": k.operator_namespace}}}],
                 "ports": [{"port": 8265, "protocol": "TCP"}]},
            ],
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable `|` blocks, not escaped lines."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def _dump(documents: list[dict[str, Any]], header: str) -> str:
    return header + "".join(
        "---\n" + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120) for doc in documents)


def render_kuberay(cfg: RunConfig, command: str = "collect") -> tuple[dict[str, str], list[str]]:
    """({file name: text}, notes for the user)."""
    k = cfg.cluster.kuberay
    config_map = _config_map(cfg)
    header = (f"# Rendered by `vla-dist cluster render kuberay` (KubeRay >= 1.5.1); re-render rather than edit.\n"
              f"# Needs a ReadWriteMany PersistentVolumeClaim {k.shared_pvc!r} in namespace {k.namespace!r}.\n")
    files = {
        "raycluster.yaml": _dump([config_map, ray_cluster(cfg)], header + (
            f"# kubectl apply -f raycluster.yaml; "
            f"kubectl -n {k.namespace} port-forward svc/{k.name}-head-svc 8265:8265\n"
            f"# then: vla-dist submit {command} cluster.dashboard_address=http://127.0.0.1:8265 ...\n")),
    }
    notes = []
    if k.dashboard_host in LOOPBACK:
        notes.append("rayjob.yaml not rendered: the KubeRay operator polls a RayJob over the head Service, which a "
                     "dashboard on 127.0.0.1 cannot answer. Use raycluster.yaml + `vla-dist submit`, or set "
                     "cluster.kuberay.dashboard_host=0.0.0.0 (token auth + a NetworkPolicy admitting only "
                     f"namespace {k.operator_namespace!r} to port 8265).")
    else:
        files["rayjob.yaml"] = _dump([config_map, dashboard_policy(cfg), ray_job(cfg, command)], header + (
            f"# The dashboard listens on {k.dashboard_host} in the head pod (the operator polls the job there);\n"
            f"# the NetworkPolicy admits only namespace {k.operator_namespace!r} to port 8265, and token auth is on.\n"
            "# kubectl apply -f rayjob.yaml  (needs a CNI that enforces NetworkPolicy)\n"))
    return files, notes
