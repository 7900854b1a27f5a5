"""What every cluster file agrees on: the config a cluster job runs with and its driver command.

A job on a cluster runs `vla-dist COMMAND --config <resolved config>` on one node, joining the Ray
cluster the job brought up (`cluster.address=auto`; the SLURM script exports RAY_ADDRESS, KubeRay
and Ray Jobs set it themselves). Its run.dir and data.dir must be on storage every node sees:
relative ones are placed under `cluster.shared_dir`.
"""

from __future__ import annotations

import copy
import posixpath
import shlex

from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError

# Commands that can continue from their last checkpoint: a requeued/restarted job adds their
# resume=auto override (the trainer's contract, shared/design.md). Others start over.
RESUMABLE_COMMANDS = {"train": "train.resume=auto", "rl": "rl.resume=auto"}
JOB_COMMANDS = ("collect", "train", "eval", "rl", "bench")


def cluster_job_config(cfg: RunConfig, shared_dir: str | None = None, require_shared: bool = False) -> RunConfig:
    """A copy of `cfg` for a job on a cluster: joins the job's Ray, outputs on shared storage.

    `shared_dir` overrides `cfg.cluster.shared_dir`. With `require_shared`, a relative run.dir or
    data.dir and no shared directory is an error (each pod/node would write its own copy).
    """
    job = copy.deepcopy(cfg)
    job.cluster.address = "auto"
    shared = shared_dir if shared_dir is not None else cfg.cluster.shared_dir
    for key in ("run.dir", "data.dir"):
        section, name = key.split(".")
        value = getattr(getattr(job, section), name)
        if posixpath.isabs(value):
            if shared and require_shared and not _under(value, shared):
                raise ConfigError(key, f"{value!r} is not under cluster.shared_dir={shared!r}, the only storage every "
                                  "node of the cluster sees; use a path under it (or a relative one)")
            continue
        if shared:
            setattr(getattr(job, section), name, posixpath.normpath(posixpath.join(shared, value)))
        elif require_shared:
            raise ConfigError(key, f"{value!r} is relative and cluster.shared_dir is null: set cluster.shared_dir to "
                              "the mount every node sees, or give an absolute path on it")
    return job


def driver_argv(command: str, config_path: str, extra_overrides: list[str] | None = None) -> list[str]:
    """`vla-dist COMMAND --config PATH [overrides]`, the job's Ray driver."""
    if command.split()[0] not in JOB_COMMANDS:
        raise ConfigError(None, f"cannot run {command!r} as a cluster job; one of: {', '.join(JOB_COMMANDS)}")
    return ["vla-dist", *command.split(), "--config", config_path, *(extra_overrides or [])]


def resume_override(command: str) -> str:
    """The override a restarted job adds, or "" when the command cannot resume."""
    return RESUMABLE_COMMANDS.get(command.split()[0], "")


def shell_join(argv: list[str]) -> str:
    return " ".join(shlex.quote(arg) for arg in argv)


def _under(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")
