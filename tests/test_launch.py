"""Ray Jobs: a real head (`ray start --head`, Jobs server on 127.0.0.1, token auth) takes a tiny
collect job with the working directory and config attached; we follow its logs and read its status
and outputs. The head and the client run in a child inside a private network namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_dist.config import ConfigError, load_config, validate
from vla_dist.launch import job_entrypoint, submit

from .conftest import REPO_ROOT
from .test_multinode import needs_private_net, run_in_private_net

# The Ray Jobs head test is marked heavy (minutes of set-up: run after the main suite); the
# validation and entrypoint tests need no cluster and run in the main suite.

DASHBOARD = "http://127.0.0.1:8265"
JOB_EPISODES = 4


def start_head(ray_tmp: str) -> subprocess.Popen:
    """`ray start --head --block` as cluster/README.md documents it, in its own process group."""
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen(
        [ray, "start", "--head", "--block", "--port=6379", "--dashboard-host=127.0.0.1", "--dashboard-port=8265",
         "--num-cpus=2", '--resources={"sim": 2}', "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops the node's processes; KILL the group if it lingers."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)


def wait_for_jobs_server(address: str, timeout: float) -> None:
    from vla_dist.errors import VlaDistError
    from vla_dist.launch import job_client

    deadline = time.monotonic() + timeout
    while True:
        try:
            job_client(address)
            return
        except VlaDistError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def jobs_on_a_real_head(out_dir: str) -> None:
    """Child: start a head, submit a collect job (with the checkout as working directory), follow it;
    then submit it again without one (the installed package runs) and watch it fail with exit 2."""
    from vla_dist.launch import logs, status, submit_and_follow

    out = Path(out_dir)
    head = start_head(os.environ["RAY_TMPDIR"])
    try:
        wait_for_jobs_server(DASHBOARD, timeout=120)
        cfg = validate(load_config(None, [
            f"run.dir={out / 'run'}", f"data.dir={out / 'data'}", f"collect.episodes={JOB_EPISODES}",
            "collect.num_videos=0",
            "task.image_size=32", "collect.actor_resources={sim: 1}", f"cluster.dashboard_address={DASHBOARD}",
        ]))
        lines: list[str] = []
        first = submit_and_follow(cfg, "collect", working_dir=REPO_ROOT, job_id="vla-dist-test-collect",
                                  on_line=lines.append)
        again = submit_and_follow(cfg, "collect", job_id="vla-dist-test-again", on_line=lambda line: None)
        result = {
            "first": first.to_dict(), "first_exit": first.command_exit_code(), "lines": lines,
            "status_later": status(DASHBOARD, first.job_id).to_dict(),
            "again": again.to_dict(), "again_exit": again.command_exit_code(),
            "again_logs": logs(DASHBOARD, again.job_id),
        }
        (out / "result.json").write_text(json.dumps(result))
    finally:
        stop_head(head)


@pytest.mark.heavy
@pytest.mark.ci
@pytest.mark.timeout(600)
@needs_private_net
def test_submit_collect_job_follow_it_and_read_outputs(tmp_path: Path, genesis_kernels: None) -> None:
    token = tmp_path / "ray_auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           # the job's `python -m vla_dist` must be this environment's python
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = run_in_private_net("tests.test_launch.jobs_on_a_real_head", tmp_path, timeout=560, env=env)

    first = result["first"]
    assert (first["status"], first["exit_code"], result["first_exit"]) == ("SUCCEEDED", 0, 0), result["lines"][-30:]
    assert result["status_later"]["status"] == "SUCCEEDED"
    assert any(line.startswith("collect done:") for line in result["lines"])  # the logs were followed
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["episodes_written"] == JOB_EPISODES
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["episodes"] == JOB_EPISODES

    # The same job again: the driver refuses to overwrite the dataset, and its exit code 2 (bad
    # config) comes back to the submitter.
    again = result["again"]
    assert (again["status"], again["exit_code"], result["again_exit"]) == ("FAILED", 2, 2)
    assert "collect.overwrite" in result["again_logs"]


def test_submit_rejects_outputs_no_node_can_share(tmp_path: Path) -> None:
    """Validated before anything is sent: a relative run.dir would land in Ray's temporary copy."""
    cfg = validate(load_config(None, ["cluster.dashboard_address=http://127.0.0.1:9"]))
    with pytest.raises(ConfigError, match="run.dir.*cluster.shared_dir"):
        submit(cfg, "collect")
    with pytest.raises(ConfigError, match="cannot submit 'export'"):
        submit(cfg, "export")
    shared = validate(load_config(None, ["cluster.shared_dir=/shared", "data.dir=/elsewhere/data"]))
    with pytest.raises(ConfigError, match="data.dir.*not under cluster.shared_dir"):
        submit(shared, "collect")


def test_entrypoint_writes_the_shipped_config_and_runs_the_command(tmp_path: Path) -> None:
    """The entrypoint Ray runs, run here by a shell: the command sees the shipped config, its exit
    code is the job's, and the config file is gone afterwards."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PATH": path}
    entrypoint = ["sh", "-c", job_entrypoint("config", working_dir=True)]
    proc = subprocess.run(entrypoint, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                          env={**env, "VLA_DIST_JOB_CONFIG": "collect:\n  episodes: 7\n"})
    assert proc.returncode == 0, proc.stderr
    assert "episodes: 7" in proc.stdout
    bad = subprocess.run(entrypoint, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                         env={**env, "VLA_DIST_JOB_CONFIG": "collect:\n  episodes: 0\n"})
    assert bad.returncode == 2 and "collect.episodes" in bad.stderr
    assert not list(tmp_path.glob("vla-dist-job-*.yaml"))
