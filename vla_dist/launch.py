"""Put a vla-dist command onto a running Ray cluster through Ray Jobs, follow it, report it.

`submit` validates the config here (a bad key fails on your laptop, not on the cluster), ships the
resolved config with the job (in an environment variable the entrypoint writes to a file, so it
works with or without an uploaded working directory) and runs `python -m vla_dist COMMAND --config
<that file>` as the job's driver on the head node, joining the cluster (`cluster.address=auto`).
With a working directory, Ray uploads it and the job runs that code (`python -m` from the
directory); without one, the cluster's installed vla-dist runs.

The Jobs server is the head's dashboard, bound to 127.0.0.1 on the head (cluster/): reach it through
`ssh -L 8265:127.0.0.1:8265 HEAD` or `kubectl port-forward`, then use http://127.0.0.1:8265
(`cluster.dashboard_address`). With token auth, the client reads the same token as the cluster
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token).
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vla_dist.cluster.jobspec import JOB_COMMANDS, cluster_job_config
from vla_dist.config import to_yaml
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError, VlaDistError, error_line

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

CONFIG_ENV = "VLA_DIST_JOB_CONFIG"
# Never uploaded with a working directory: environments, datasets, outputs, history.
UPLOAD_EXCLUDES = [".venv", "venv", ".git", "data", "runs", "*.tar", "*.mp4", "__pycache__", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobReport:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    exit_code: int | None  # the driver's exit code once it ran (2: bad config, 1: runtime failure)
    message: str
    address: str

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def command_exit_code(self) -> int:
        """What `vla-dist submit` exits with: the job's own code, else 0 for success and 1 otherwise."""
        if self.exit_code is not None:
            return self.exit_code
        return 0 if self.status == "SUCCEEDED" else 1


def job_client(address: str) -> JobSubmissionClient:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as error:  # ray without the [default] extra has no job SDK
        raise VlaDistError(f"Ray Jobs needs ray[default] installed here: {error}") from error
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise VlaDistError(f"no Ray Jobs server answered at {address} (cluster.dashboard_address): "
                           f"{error_line(error)}; is the head up and its dashboard port tunnelled to this machine?"
                           ) from error


def job_entrypoint(command: str, working_dir: bool) -> str:
    """Shell line Ray runs on the head: write the shipped config to a file, run the command with
    it, remove the file, exit with the command's code."""
    argv = ["python", "-m", "vla_dist", *command.split(), "--config", '"$cfg"']
    where = '"$PWD"' if working_dir else '"${TMPDIR:-/tmp}"'
    return (f'cfg=$(mktemp -p {where} vla-dist-job-XXXXXX.yaml) && printf "%s" "${CONFIG_ENV}" > "$cfg" && '
            f'{{ {" ".join(argv)}; rc=$?; rm -f "$cfg"; exit $rc; }}')


def submit(
    cfg: RunConfig,
    command: str,
    address: str | None = None,
    working_dir: str | Path | None = None,
    job_id: str | None = None,
) -> str:
    """Submit `vla-dist COMMAND` with `cfg` to the Jobs server; return the job id."""
    name = command.split()[0] if command.strip() else ""
    if name not in JOB_COMMANDS:
        raise ConfigError(None, f"cannot submit {command!r}; one of: {', '.join(JOB_COMMANDS)}")
    job_cfg = cluster_job_config(cfg, require_shared=True)
    runtime_env: dict[str, object] = {"env_vars": {CONFIG_ENV: to_yaml(job_cfg)}}
    if working_dir is not None:
        directory = Path(working_dir).expanduser().resolve()
        if not directory.is_dir():
            raise ConfigError(None, f"--working-dir {working_dir}: not a directory")
        runtime_env.update(working_dir=str(directory), excludes=UPLOAD_EXCLUDES)
    client = job_client(address or cfg.cluster.dashboard_address)
    metadata = {"vla_dist_command": command, "run_dir": job_cfg.run.dir, "data_dir": job_cfg.data.dir}
    try:
        return client.submit_job(
            entrypoint=job_entrypoint(command, working_dir is not None),
            runtime_env=runtime_env,
            submission_id=job_id,
            metadata=metadata,
        )
    except RuntimeError as error:
        raise VlaDistError(f"the Jobs server refused the job: {error_line(error)}") from error


def status(address: str, job_id: str) -> JobReport:
    client = job_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        raise VlaDistError(f"no job {job_id!r} at {address}: {error_line(error)}") from error
    return JobReport(job_id, str(info.status.value), info.driver_exit_code, info.message or "", address)


def follow_logs(address: str, job_id: str, on_line: Callable[[str], None] = print) -> None:
    """Stream the job's output until it ends (every line from the start)."""
    client = job_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                on_line(line)

    asyncio.run(tail())


def logs(address: str, job_id: str) -> str:
    return job_client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return job_client(address).stop_job(job_id)


def submit_and_follow(
    cfg: RunConfig,
    command: str,
    address: str | None = None,
    working_dir: str | Path | None = None,
    job_id: str | None = None,
    wait: bool = True,
    on_line: Callable[[str], None] = print,
) -> JobReport:
    """`vla-dist submit`: submit, then (with `wait`) stream the logs and return the final status."""
    address = address or cfg.cluster.dashboard_address
    submitted = submit(cfg, command, address, working_dir, job_id)
    on_line(f"submitted {submitted} to {address}: vla-dist {command}  (follow: vla-dist job logs {submitted} --follow)")
    if not wait:
        return status(address, submitted)
    follow_logs(address, submitted, on_line)
    report = status(address, submitted)
    while report.status not in TERMINAL:  # logs can end a moment before the status is final
        time.sleep(0.5)
        report = status(address, submitted)
    return report




def describe(report: JobReport) -> str:
    code = "" if report.exit_code is None else f", exit code {report.exit_code}"
    message = f": {report.message}" if report.message else ""
    return f"job {shlex.quote(report.job_id)} {report.status}{code}{message}"
