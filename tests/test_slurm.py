"""The rendered sbatch script on a real SLURM: Debian's slurm-wlm + munge, two slurmd nodes on this
host (cluster/slurm/local-cluster.sh, which installs the packages when missing), everything inside a
private network namespace. One job collects on a two-node Ray cluster; another trains on two nodes,
is signalled before its time limit (the real driver saves a checkpoint), requeued, and restarted
with train.resume=auto, which continues from that checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_dist.cluster.slurm import SCRIPT_NAME, render_sbatch
from vla_dist.config import load_config, validate

from .conftest import REPO_ROOT
from .test_multinode import needs_private_net, run_in_private_net

# Tests with SLURM daemons are marked heavy (slurm_test: minutes of set-up, run after the main suite);
# the rendered script's test needs no daemon and runs in the main suite.

LOCAL_SLURM = REPO_ROOT / "cluster" / "slurm" / "local-cluster.sh"
EPISODES = 4
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs jobs as their user: needs root")


def slurm_config(out: Path, *overrides: str):
    return validate(load_config(None, [
        "cluster.slurm.nodes=2", "cluster.slurm.cpus_per_node=1", f"cluster.slurm.venv={sys.prefix}",
        "cluster.slurm.exclusive=false", "cluster.slurm.join_timeout_s=120", "cluster.slurm.signal_grace_s=0",
        f"run.dir={out / 'run'}", f"data.dir={out / 'data'}", *overrides,
    ]))


def write_files(files: dict[str, str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return out / SCRIPT_NAME


def job_fields(job_id: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def wait_for_job(job_id: str, timeout: float, until=lambda f: f["JobState"] in FINISHED) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if until(fields) or time.monotonic() > deadline:
            return fields
        time.sleep(1.0)


def sbatch(script: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def with_local_slurm(out: Path, body) -> None:
    """Bring the local SLURM up under `out/slurm`, run `body()`, always bring it down."""
    state = out / "slurm"
    subprocess.run([str(LOCAL_SLURM), "up", str(state), "2", "1"], check=True, capture_output=True, timeout=600)
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        body()
    finally:
        subprocess.run(["scancel", "--user=root"], capture_output=True, check=False)
        time.sleep(1.0)
        subprocess.run([str(LOCAL_SLURM), "down", str(state)], capture_output=True, timeout=60, check=False)


def collect_job(out_dir: str) -> None:
    """Child: a two-node SLURM job running `vla-dist collect` over both Ray nodes."""
    out = Path(out_dir)

    def body() -> None:
        cfg = slurm_config(out, "task.image_size=32", f"collect.episodes={EPISODES}", "collect.num_videos=0",
                           "collect.actor_resources={sim: 1}", "cluster.slurm.head_port=26410",
                           "cluster.slurm.dashboard_port=28410")
        script = write_files(render_sbatch(cfg, out / "job", command="collect"), out / "job")
        started = time.monotonic()
        job_id = sbatch(script)
        fields = wait_for_job(job_id, timeout=500)
        shutil.rmtree(f"/tmp/vla-dist-{job_id}", ignore_errors=True)  # the job's Ray state (RAY_TMPDIR) on this host
        result = {"job": fields, "seconds": round(time.monotonic() - started, 1),
                  "log": "\n".join(p.read_text() for p in (out / "job").glob("slurm-*.out"))}
        (out / "result.json").write_text(json.dumps(result))

    with_local_slurm(out, body)


REQUEUE_STEPS, REQUEUE_SAVE_EVERY = 120, 50  # the signal comes a few steps in: the restart does the rest


def requeue_job(out_dir: str) -> None:
    """Child: a two-node `vla-dist train` job (one DeepSpeed rank per SLURM node) whose batch script is
    told the time limit is near (USR1, what --signal=B:USR1@grace does) once training stepped: the
    script sends SIGUSR1 to the driver, which saves a checkpoint and exits; the script requeues the
    job, and the restart runs the same command with train.resume=auto."""
    out = Path(out_dir)
    metrics = out / "run" / "metrics.jsonl"

    def steps_logged() -> int:  # whole lines only: the driver may be appending one
        return metrics.read_text(encoding="utf-8").count("\n") if metrics.exists() else 0

    def body() -> None:
        cfg = slurm_config(out, "cluster.slurm.head_port=26420", "cluster.slurm.dashboard_port=28420",
                           "train.world_size=2", "train.micro_batch_size=4", f"train.steps={REQUEUE_STEPS}",
                           f"train.save_every={REQUEUE_SAVE_EVERY}")
        script = write_files(render_sbatch(cfg, out / "job", command="train"), out / "job")
        started = time.monotonic()
        job_id = sbatch(script)
        deadline = started + 400
        while steps_logged() < 1:  # the ranks are set up and stepping
            if job_fields(job_id)["JobState"] in FINISHED or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        signalled_at_step = steps_logged()
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        fields = wait_for_job(job_id, timeout=400,
                              until=lambda f: f["JobState"] == "COMPLETED" and f.get("Restarts") == "1"
                              or f["JobState"] in ("FAILED", "CANCELLED"))
        shutil.rmtree(f"/tmp/vla-dist-{job_id}", ignore_errors=True)
        result = {"job": fields, "signalled_at_step": signalled_at_step,
                  "seconds": round(time.monotonic() - started, 1),
                  "log": "\n".join(p.read_text() for p in (out / "job").glob("slurm-*.out"))}
        (out / "result.json").write_text(json.dumps(result))

    with_local_slurm(out, body)


def slurm_test(test):
    """Real daemons, real jobs: root, a private network namespace, and slurm-wlm (or apt-get)."""
    for mark in (
        pytest.mark.heavy,
        pytest.mark.timeout(900),
        needs_root,
        needs_private_net,
        pytest.mark.skipif(shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
                           reason="needs slurm-wlm + munge, or apt-get to install them"),
    ):
        test = mark(test)
    return test


@slurm_test
def test_sbatch_script_collects_over_two_slurm_nodes(tmp_path: Path, genesis_kernels: None) -> None:
    result = run_in_private_net("tests.test_slurm.collect_job", tmp_path, timeout=850)
    job = result["job"]
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), result["log"][-4000:]
    assert "ray: 2 nodes up" in result["log"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["episodes_written"] == EPISODES
    assert len({a["node_id"] for a in report["actors"]}) == 2  # one sim actor on each SLURM node


@pytest.mark.ci  # SLURM, its signal, the requeue and the resume: the heavy path CI keeps
@slurm_test
def test_time_limit_signal_saves_requeues_and_resumes(quickstart_run, tmp_path: Path) -> None:
    from vla_dist.checkpoint import manager as ckpt
    from vla_dist.train.metrics import read_metrics

    shutil.copytree(quickstart_run[1], tmp_path / "data")  # the job's data.dir (same host: every node sees it)
    result = run_in_private_net("tests.test_slurm.requeue_job", tmp_path, timeout=850)
    job, log = result["job"], result["log"]
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0"), log[-4000:]
    # the real driver got SIGUSR1 once training stepped, saved a complete checkpoint and exited 0
    assert result["signalled_at_step"] >= 1, log[-4000:]
    assert "asking the driver to save a checkpoint (SIGUSR1)" in log
    stopped = re.search(rf"stopped by SIGUSR1 at step (\d+) of {REQUEUE_STEPS}; checkpoint kept: (\S+);", log)
    assert stopped, log[-4000:]
    stop_step, kept = int(stopped[1]), stopped[2]
    assert result["signalled_at_step"] <= stop_step < REQUEUE_STEPS
    run_dir = tmp_path / "run"
    assert kept == str(ckpt.step_dir(run_dir, stop_step))
    assert "requeueing job" in log and "(restart 1)" in log
    assert re.findall(r"driver exited with (\d+)", log) == ["0", "0"]
    # the restart ran `vla-dist train ... train.resume=auto`: it continued from the saved step
    report = json.loads((run_dir / "report.json").read_text())
    assert report["first_step"] == stop_step and report["resumed_from"] == kept, report
    assert report["stopped_by"] is None and report["last_step"] == REQUEUE_STEPS
    assert len(set(report["rank_nodes"])) == 2  # one rank on each SLURM node
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, REQUEUE_STEPS + 1))
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, REQUEUE_STEPS)
    print(f"SLURM requeue: USR1 at step {result['signalled_at_step']}, saved step {stop_step}, "
          f"resumed and finished {REQUEUE_STEPS} steps; {result['seconds']} s from sbatch to the end")


def test_rendered_sbatch_matches_the_config(tmp_path: Path) -> None:
    from vla_dist.cluster.cli import EXAMPLE_CONFIG
    from vla_dist.cluster.jobspec import cluster_job_config

    cfg = validate(load_config(EXAMPLE_CONFIG, [
        "cluster.slurm.nodes=4", "cluster.slurm.gpus_per_node=8", "cluster.slurm.cpus_per_node=96",
        "cluster.slurm.sim_per_node=64",
        "cluster.slurm.account=robotics", "cluster.slurm.mem_per_node_gb=512",
        "cluster.slurm.extra_sbatch=[--qos=high]",
    ]))
    files = render_sbatch(cfg, tmp_path, command="train")
    script = files[SCRIPT_NAME]
    sbatch_options = re.findall(r"^#SBATCH (\S+)$", script, flags=re.MULTILINE)
    assert sbatch_options == [
        "--job-name=vla-dist", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96", "--time=04:00:00",
        f"--output={tmp_path}/slurm-%j.out", "--open-mode=append", "--gpus-per-node=8", "--mem=512G", "--partition=gpu",
        "--account=robotics", "--exclusive", "--requeue", "--signal=B:USR1@300", "--qos=high",
    ]
    settings = dict(re.findall(r"^([A-Z_]+)=(.*?)(?:\s+#.*)?$", script, flags=re.MULTILINE))
    keys = ("NODES", "CPUS", "GPUS", "SIM", "HEAD_PORT", "DASHBOARD_PORT", "JOIN_TIMEOUT", "REQUEUE")
    assert {k: settings[k] for k in keys} == {
        "NODES": "4", "CPUS": "96", "GPUS": "8", "SIM": "64", "HEAD_PORT": "6379", "DASHBOARD_PORT": "8265",
        "JOIN_TIMEOUT": "300", "REQUEUE": "1"}
    assert settings["VENV"] == "/shared/vla-dist/.venv"
    assert settings["DRIVER"] == f"(vla-dist train --config {tmp_path}/config.yaml)"
    assert settings["RESUME_OVERRIDE"] == "train.resume=auto"
    assert "--dashboard-host=127.0.0.1" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    # The job's config is the user's, joining the job's Ray, with outputs on the shared filesystem.
    (tmp_path / "config.yaml").write_text(files["config.yaml"])
    job = load_config(tmp_path / "config.yaml", [])
    assert job == cluster_job_config(cfg) and job.cluster.address == "auto"
    assert (job.run.dir, job.data.dir) == ("/shared/vla-dist/runs/two-node", "/shared/vla-dist/data/two-node")
    # Collection cannot resume: no requeue override; a stop is SIGINT (finished shards are kept).
    assert "RESUME_OVERRIDE=''" in render_sbatch(cfg, tmp_path, command="collect")[SCRIPT_NAME]
