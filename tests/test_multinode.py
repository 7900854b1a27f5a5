"""Collection on a real multi-node Ray cluster (two worker raylets on this machine, with separate
resources), including losing a node mid-collection.

The cluster runs in a child process inside a private network namespace
(cluster/local/private-net.sh): it cannot collide with the session's in-process Ray, and none of
its ports is reachable from outside. The child writes what it saw to a JSON file; the test asserts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO_ROOT

# The multi-node cluster test is marked heavy (minutes of set-up: run after the main suite); the
# placement and rendered-manifest tests below need no cluster and run in the main suite.

PRIVATE_NET = REPO_ROOT / "cluster" / "local" / "private-net.sh"
EPISODES = 8  # four chunks of two: each actor gets two chunks in flight from the start
TINY = ["task.image_size=32", "collect.envs_per_actor=2", "collect.num_actors=2", "collect.num_videos=0",
        "collect.actor_resources={sim: 1}", f"collect.episodes={EPISODES}", "collect.max_actor_restarts=1"]


def private_net_available() -> bool:
    try:
        proc = subprocess.run([str(PRIVATE_NET), "--check"], capture_output=True, timeout=30, check=False)
        return proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_private_net = pytest.mark.skipif(
    not private_net_available(), reason="needs a private network namespace (unshare --net) to keep Ray off the network"
)


def run_in_private_net(function: str, out: Path, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `tests.<module>.<function>(out)` in a child inside a private network namespace."""
    module, name = function.rsplit(".", 1)
    code = f"import sys; from {module} import {name}; {name}(sys.argv[1])"
    ray_tmp = tempfile.mkdtemp(prefix="vd-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    child_env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    child_env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(PRIVATE_NET), sys.executable, "-c", code, str(out)], cwd=REPO_ROOT, env=child_env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    result = out / "result.json"
    assert proc.returncode == 0 and result.exists(), (
        f"child failed ({proc.returncode}; Ray logs in {ray_tmp}):\n{proc.stderr[-5000:]}")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return json.loads(result.read_text())


def collect_on_two_nodes(out_dir: str) -> None:
    """Child: head (no CPUs: only the driver) + two sim nodes of 1 CPU and {"sim": 1} each.

    Run 1 collects undisturbed; run 2 collects the same episodes and loses a sim node after the
    first finished chunk. Writes result.json with what the driver and Ray's state API saw."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    from vla_dist.config import load_config, validate
    from vla_dist.data import iter_episodes
    from vla_dist.rollout.collect import CollectProgress, run_collect

    out = Path(out_dir)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
    })
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"sim": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        result: dict[str, object] = {"worker_node_ids": [w.node_id for w in workers]}

        def config(name: str):
            return validate(load_config(None, [
                *TINY, f"run.dir={out / name / 'run'}", f"data.dir={out / name / 'data'}",
                f"cluster.address={cluster.address}",
            ]))

        result["undisturbed"] = run_collect(config("undisturbed"))
        chunk_tasks = list_tasks(filters=[("func_or_class_name", "=", "SimActor.run_chunk")], detail=True, limit=1000,
                                 raise_on_missing_output=False)
        result["chunk_task_nodes"] = sorted({t.node_id for t in chunk_tasks if t.state == "FINISHED"})

        removed: list[str] = []

        def lose_a_node(progress: CollectProgress) -> None:
            if removed or progress.chunks_done < 1:
                return
            victim = next(w for w in workers if w.node_id == progress.actors[0]["node_id"])
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(victim.node_id)

        result["node_lost"] = run_collect(config("node_lost"), on_progress=lose_a_node)
        result["removed"] = removed
        result["episodes"] = {
            name: [{"id": ep.episode_id, "actions": ep.actions.tolist()}
                   for ep in iter_episodes(out / name / "data", decode_images=False)]
            for name in ("undisturbed", "node_lost")
        }
        (out / "result.json").write_text(json.dumps(result, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.heavy
@pytest.mark.timeout(900)
@needs_private_net
def test_collection_spreads_over_nodes_and_survives_losing_one(tmp_path: Path, genesis_kernels: None) -> None:
    result = run_in_private_net("tests.test_multinode.collect_on_two_nodes", tmp_path, timeout=850)
    workers = set(result["worker_node_ids"])

    # Spread: each sim actor was placed on its own sim node, and both nodes ran episode chunks.
    undisturbed = result["undisturbed"]
    assert {a["node_id"] for a in undisturbed["actors"]} == workers
    assert set(result["chunk_task_nodes"]) == workers
    assert undisturbed["episodes_written"] == EPISODES and undisturbed["actor_failures"] == 0

    # Node lost mid-collection: its chunk was redone on the surviving node; the dataset is exactly the
    # undisturbed one (same episode ids, same actions), none missing, none twice.
    lost = result["node_lost"]
    assert len(result["removed"]) == 1 and result["removed"][0] in workers
    assert lost["actor_failures"] >= 1 and lost["chunks_retried"] >= 1
    assert lost["episodes_written"] == EPISODES
    got = result["episodes"]["node_lost"]
    want = {ep["id"]: ep for ep in result["episodes"]["undisturbed"]}
    ids = [ep["id"] for ep in got]
    assert len(ids) == len(set(ids)) == EPISODES
    assert sorted(ids) == sorted(want)
    for ep in got:
        np.testing.assert_allclose(ep["actions"], want[ep["id"]]["actions"], atol=1e-5)


# --- placement and rendered manifests (no cluster needed: the main suite) ----------------------

def test_sim_actor_placement_from_config() -> None:
    from vla_dist.cluster.placement import GIB, ActorPlacement, TrainerPlacement, check_fits, trainer_bundles
    from vla_dist.config import load_config, validate
    from vla_dist.errors import VlaDistError

    cfg = validate(load_config(None, ["collect.actor_resources={sim: 1}", "collect.memory_per_actor_gb=1.5",
                                      "collect.cpus_per_actor=2"]))
    placement = ActorPlacement.from_collect(cfg.collect)
    assert placement.ray_options() == {"num_cpus": 2.0, "resources": {"sim": 1.0}, "memory": int(1.5 * GIB)}
    assert placement.demand(4) == {"CPU": 8.0, "sim": 4.0, "memory": float(4 * int(1.5 * GIB))}
    with pytest.raises(VlaDistError, match="'sim'.*offers 0"):
        check_fits(placement, 4, {"CPU": 64.0, "memory": 1e12})  # no sim node: fail fast, do not hang
    check_fits(placement, 4, {"CPU": 64.0, "sim": 4.0, "memory": 1e12})
    assert ActorPlacement().ray_options() == {"num_cpus": 1.0, "resources": {}}  # the default: any node
    placement = TrainerPlacement(world_size=2, gpus_per_rank=1, cpus_per_rank=4, resources={"trainer": 1})
    bundles = trainer_bundles(placement)
    assert bundles == [{"CPU": 4, "trainer": 1, "GPU": 1}] * 2


@pytest.mark.parametrize(("override", "key"), [
    ("collect.actor_resources={GPU: 1}", "collect.actor_resources"),
    ("collect.actor_resources={sim: 0}", "collect.actor_resources"),
    ("collect.memory_per_actor_gb=-1", "collect.memory_per_actor_gb"),
    ("cluster.slurm.nodes=0", "cluster.slurm.nodes"),
    ("cluster.slurm.time=soon", "cluster.slurm.time"),
    ("cluster.slurm.container=img.sqsh", "cluster.slurm.container"),
    ("cluster.kuberay.name=Vla_Dist", "cluster.kuberay.name"),
    ("cluster.shared_dir=shared", "cluster.shared_dir"),
    ("cluster.dashboard_address=127.0.0.1:8265", "cluster.dashboard_address"),
    ("cluster.cloud.sim_workers_max=0", "cluster.cloud.sim_workers_max"),
])
def test_cluster_config_errors_name_the_key(override: str, key: str) -> None:
    from vla_dist.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError) as error:
        validate(load_config(None, [override]))
    assert error.value.key == key


def _two_node(*overrides: str):
    from vla_dist.cluster.cli import EXAMPLE_CONFIG
    from vla_dist.config import load_config, validate

    return validate(load_config(EXAMPLE_CONFIG, list(overrides)))


def test_kuberay_manifests_match_the_config() -> None:
    import yaml

    from vla_dist.cluster.jobspec import cluster_job_config
    from vla_dist.cluster.kuberay import render_kuberay
    from vla_dist.config import load_config

    cfg = _two_node(
        "cluster.kuberay.gpu_workers=3", "cluster.kuberay.gpus_per_worker=8", "cluster.kuberay.sim_workers=5")
    files, notes = render_kuberay(cfg, command="collect")
    assert set(files) == {"raycluster.yaml"} and "rayjob.yaml not rendered" in notes[0]  # dashboard stays on 127.0.0.1
    config_map, cluster = yaml.safe_load_all(files["raycluster.yaml"])
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "127.0.0.1", "num-cpus": "0"}
    assert spec["authOptions"] == {"mode": "token"} and spec["rayVersion"] == cfg.cluster.kuberay.ray_version
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert (groups["gpu"]["replicas"], groups["sim"]["replicas"], groups["sim"]["minReplicas"]) == (3, 5, 5)
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "8" and "resources" not in groups["gpu"]  # no "sim": actors stay off GPUs
    assert groups["sim"]["resources"] == {"sim": str(cfg.cluster.kuberay.sim_worker_cpus)}
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in groups.values())]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] == cfg.cluster.image
        assert {"name": "shared", "mountPath": cfg.cluster.shared_dir} in container["volumeMounts"]
        claim = {"claimName": cfg.cluster.kuberay.shared_pvc}
        assert {"name": "shared", "persistentVolumeClaim": claim} in pod["spec"]["volumes"]
    # The job's config: the user's, joining the cluster, outputs on the shared volume.
    shipped = Path(tempfile.mkdtemp()) / "config.yaml"
    shipped.write_text(config_map["data"]["config.yaml"])
    job = load_config(shipped, [])
    assert job == cluster_job_config(cfg)
    assert job.cluster.address == "auto" and job.run.dir.startswith(cfg.cluster.shared_dir + "/")
    assert job.data.dir == f"{cfg.cluster.shared_dir}/data/two-node"

    opted_in = _two_node("cluster.kuberay.dashboard_host=0.0.0.0")
    files, notes = render_kuberay(opted_in, command="train")
    _, policy, rayjob = yaml.safe_load_all(files["rayjob.yaml"])
    assert rayjob["spec"]["entrypoint"] == "vla-dist train --config /etc/vla-dist/config.yaml"
    assert rayjob["spec"]["submissionMode"] == "SidecarMode" and rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    operator_rule = policy["spec"]["ingress"][1]
    assert operator_rule["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert operator_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": opted_in.cluster.kuberay.operator_namespace}


def test_autoscaler_yaml_matches_the_config() -> None:
    import yaml

    from vla_dist.cluster.autoscaler import render_autoscaler

    cfg = _two_node("cluster.cloud.sim_workers_max=6", "cluster.cloud.gpu_workers_max=2")
    doc = yaml.safe_load(render_autoscaler(cfg)["ray-cluster.yaml"])
    types = doc["available_node_types"]
    assert doc["max_workers"] == 8 and doc["docker"]["image"] == cfg.cluster.image
    assert (types["sim_worker"]["min_workers"], types["sim_worker"]["max_workers"]) == (1, 6)
    assert types["sim_worker"]["resources"] == {"sim": cfg.cluster.cloud.sim_per_node}
    assert types["gpu_worker"]["max_workers"] == 2 and types["head"]["resources"] == {"CPU": 0}
    assert f"--volume {cfg.cluster.shared_dir}:{cfg.cluster.shared_dir}" in doc["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    assert "--dashboard-host=127.0.0.1" in doc["head_start_ray_commands"][1]


def test_committed_examples_are_current() -> None:
    """cluster/*/example/ are what `python -m vla_dist.cluster.cli examples` renders from
    cluster/two-node.yaml (the ConfigMap's embedded config aside: it follows every new config key)."""
    import yaml

    from vla_dist.cluster.cli import example_files

    def comparable(text: str, name: str) -> object:
        if not name.endswith(".yaml"):
            return text
        docs = list(yaml.safe_load_all(text))
        for doc in docs:
            if doc and doc.get("kind") == "ConfigMap":
                doc["data"] = "<config>"
        return docs

    for relative, text in example_files().items():
        committed = REPO_ROOT / "cluster" / relative
        assert committed.exists(), f"{committed} missing: run python -m vla_dist.cluster.cli examples"
        assert comparable(committed.read_text(), relative.name) == comparable(text, relative.name), (
            f"{committed} is stale: run python -m vla_dist.cluster.cli examples")
