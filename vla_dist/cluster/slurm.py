"""`vla-dist cluster render slurm`: an sbatch script that brings Ray up on the allocation, runs one
vla-dist command as the Ray driver, and tears Ray down; requeue-friendly.

The script (template below, bash) does, in order:
1. per-job Ray state: RAY_TMPDIR=/tmp/vla-dist-<jobid> on each node, token auth with a 0600 token
   file on shared storage (every node reads it);
2. `ray start --head --block` on the first node (dashboard on 127.0.0.1 only), `ray start --block`
   on the others, each in its own `srun` step with all the node's CPUs/GPUs and a "sim" resource;
3. waits until every node joined (`python -m vla_dist.cluster.wait_nodes`), or fails naming them;
4. runs the driver on the first node; on SIGUSR1 (`--signal=B:USR1@grace`, i.e. the time limit is
   near) it sends SIGUSR1 to a resumable driver (`train`: it saves a complete checkpoint at the step
   it reached and exits 0, see vla_dist/train/stop.py), waits for it, and requeues the job, which
   restarts with `train.resume=auto` and continues from that checkpoint; other commands get SIGINT
   (collect keeps finished shards), or SIGTERM when the driver runs in a container step (srun does
   not forward a single SIGINT);
5. on exit, stops the Ray steps (SIGTERM to the `srun`s, which forward it to `ray start --block`).
"""

from __future__ import annotations

import os
from pathlib import Path

from vla_dist.cluster.jobspec import cluster_job_config, driver_argv, resume_override, shell_join
from vla_dist.config import to_yaml
from vla_dist.config.schema import RunConfig

SCRIPT_NAME = "vla-dist.sbatch"
CONFIG_NAME = "config.yaml"

TEMPLATE = r"""#!/usr/bin/env bash
# vla-dist on SLURM: Ray head on the first node, Ray workers on the others, then the driver.
# Rendered by `vla-dist cluster render slurm`; change the config and re-render rather than edit.
# Submit: sbatch {{OUT_DIR}}/{{SCRIPT_NAME}}        log: {{OUT_DIR}}/slurm-<jobid>.out
{{SBATCH_LINES}}
set -uo pipefail

# --- from the config -------------------------------------------------------------------------
NODES={{NODES}}
CPUS={{CPUS}}                 # CPUs Ray offers per node
GPUS={{GPUS}}                 # GPUs Ray offers per node
SIM={{SIM}}                  # "sim" resource per node (sim actors with collect.actor_resources={sim: 1})
HEAD_PORT={{HEAD_PORT}}
# the dashboard listens on 127.0.0.1 only: ssh -L {{DASHBOARD_PORT}}:127.0.0.1:{{DASHBOARD_PORT}} <first node>
DASHBOARD_PORT={{DASHBOARD_PORT}}
JOIN_TIMEOUT={{JOIN_TIMEOUT}}
OUT_DIR={{OUT_DIR_Q}}
VENV={{VENV}}
CONTAINER={{CONTAINER}}
CONTAINER_MOUNTS={{CONTAINER_MOUNTS}}
REQUEUE={{REQUEUE}}
DRIVER=({{DRIVER}})
RESUME_OVERRIDE={{RESUME_OVERRIDE}}   # added to the driver when SLURM restarts the job

log() { echo "[vla-dist $(date +%H:%M:%S)] $*"; }
die() { echo "error: $*" >&2; exit 1; }

cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot enter the submit directory"
if [ -n "$VENV" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate" || die "cannot activate cluster.slurm.venv=$VENV"
fi

# One srun step on the given nodes; inside the container when one is set. --overlap: the Ray
# steps, the driver and the helpers share the nodes' CPUs instead of queueing for them.
STEP=(srun --overlap --ntasks-per-node=1 --kill-on-bad-exit=0)
if [ -n "$CONTAINER" ]; then
  STEP+=(--container-image="$CONTAINER" --container-mounts="$CONTAINER_MOUNTS" --container-workdir="$PWD")
fi
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${HOSTS[0]}
on_head() { "${STEP[@]}" --nodes=1 --ntasks=1 -w "$HEAD_NODE" "$@"; }

# Per-job Ray state: jobs sharing a node never see each other's ray_current_cluster or sockets.
export RAY_TMPDIR="/tmp/vla-dist-${SLURM_JOB_ID}"
# Token auth (Ray >= 2.52): every node and the driver read the same 0600 token on shared storage.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$OUT_DIR/.ray-auth-token}"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH") \
    || die "cannot write $RAY_AUTH_TOKEN_PATH"
fi

HEAD_PID=""
WORKERS_PID=""
DRIVER_PID=""
teardown() {
  # SIGTERM to the srun steps; srun forwards it to `ray start --block`, which stops its node.
  for pid in $WORKERS_PID $HEAD_PID; do kill -TERM "$pid" 2>/dev/null; done
  for pid in $WORKERS_PID $HEAD_PID; do wait "$pid" 2>/dev/null; done
  WORKERS_PID=""
  HEAD_PID=""
}
trap teardown EXIT

# The address Ray itself would pick on the head node (VLA_DIST_HEAD_IP overrides, e.g. an IB address).
HEAD_IP=${VLA_DIST_HEAD_IP:-$(on_head python -c 'import ray.util; print(ray.util.get_node_ip_address())' | tail -n1)}
[ -n "$HEAD_IP" ] || die "could not find the IP of $HEAD_NODE (is Ray installed there? set VLA_DIST_HEAD_IP)"
export RAY_ADDRESS="$HEAD_IP:$HEAD_PORT"
log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${NODES} nodes ${HOSTS[*]};" \
  "Ray head ${RAY_ADDRESS} on ${HEAD_NODE}"

# Random agent and worker ports: several Ray nodes may share a host. Behind a firewall between
# nodes, replace them with fixed ranges (ray start --help).
RAY_NODE_ARGS=(--num-cpus="$CPUS" --num-gpus="$GPUS" --resources="{\"sim\": $SIM}" --disable-usage-stats
  --dashboard-agent-listen-port=0 --min-worker-port=0 --max-worker-port=0)
on_head ray start --head --block --node-ip-address="$HEAD_IP" --port="$HEAD_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" "${RAY_NODE_ARGS[@]}" &
HEAD_PID=$!
on_head python -m vla_dist.cluster.wait_nodes --address "$RAY_ADDRESS" --nodes 1 --timeout "$JOIN_TIMEOUT" \
  || die "the Ray head did not start on $HEAD_NODE; its output is above"
if [ "$NODES" -gt 1 ]; then
  "${STEP[@]}" --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --exclude="$HEAD_NODE" \
    ray start --block --address="$RAY_ADDRESS" "${RAY_NODE_ARGS[@]}" &
  WORKERS_PID=$!
fi
on_head python -m vla_dist.cluster.wait_nodes --address "$RAY_ADDRESS" --nodes "$NODES" --timeout "$JOIN_TIMEOUT" \
  --expect "${HOSTS[*]}" || die "the Ray cluster did not come up (join_timeout_s=$JOIN_TIMEOUT); tearing it down"

ARGS=("${DRIVER[@]}")
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ -n "$RESUME_OVERRIDE" ]; then
  ARGS+=("$RESUME_OVERRIDE")
fi
STOPPED=""
on_time_limit() {
  STOPPED=1
  [ -n "$DRIVER_PID" ] || return 0
  if [ -n "$RESUME_OVERRIDE" ]; then
    log "time limit near: asking the driver to save a checkpoint (SIGUSR1), then requeueing"
    kill -USR1 "$DRIVER_PID"
  elif [ -n "$CONTAINER" ]; then
    log "time limit near: stopping the driver (SIGTERM)"
    kill -TERM "$DRIVER_PID"
  else
    log "time limit near: stopping the driver (SIGINT); what it finished is kept"
    kill -INT "$DRIVER_PID"
  fi
}
trap on_time_limit USR1

log "driver: ${ARGS[*]}"
if [ -n "$CONTAINER" ]; then
  on_head "${ARGS[@]}" &
else
  # A background job of a non-interactive shell starts with SIGINT ignored, and Python then never
  # raises KeyboardInterrupt: restore the default before exec'ing the driver.
  python -c 'import os, signal as s, sys; s.signal(s.SIGINT, s.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "${ARGS[@]}" &
fi
DRIVER_PID=$!
while kill -0 "$DRIVER_PID" 2>/dev/null; do
  wait "$DRIVER_PID"  # returns early when a trapped signal arrives; loop until the driver is gone
done
wait "$DRIVER_PID"
RC=$?
log "driver exited with $RC"

teardown
if [ -n "$STOPPED" ] && [ -n "$RESUME_OVERRIDE" ] && [ "$REQUEUE" = 1 ]; then
  log "requeueing job ${SLURM_JOB_ID}: it restarts with ${RESUME_OVERRIDE}"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed; resubmit with ${RESUME_OVERRIDE}"
fi
exit "$RC"
"""


def sbatch_lines(cfg: RunConfig, out_dir: Path) -> list[str]:
    s = cfg.cluster.slurm
    lines = [
        f"--job-name={s.job_name}",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={s.cpus_per_node}",
        f"--time={s.time}",
        f"--output={out_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
    ]
    if s.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.mem_per_node_gb:
        lines.append(f"--mem={s.mem_per_node_gb}G")
    if s.partition:
        lines.append(f"--partition={s.partition}")
    if s.account:
        lines.append(f"--account={s.account}")
    if s.exclusive:
        lines.append("--exclusive")
    if s.requeue:
        lines.append("--requeue")
    if s.signal_grace_s:
        lines.append(f"--signal=B:USR1@{s.signal_grace_s}")
    lines.extend(s.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def render_sbatch(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    command: str = "collect",
    driver: list[str] | None = None,
    resume: str | None = None,
) -> dict[str, str]:
    """The script and the job's config, as {file name: text}, for `out_dir` (absolute paths inside).

    `command` is the vla-dist command the job runs; `driver` replaces the whole driver argv (tests,
    or a command of your own) and `resume` the override a restarted job adds.
    """
    out = Path(out_dir).resolve()
    s = cfg.cluster.slurm
    job = cluster_job_config(cfg)
    config_path = out / CONFIG_NAME
    argv = driver if driver is not None else driver_argv(command, str(config_path))
    resume_arg = resume if resume is not None else resume_override(command)
    venv = str(Path(s.venv).expanduser().resolve()) if s.venv else ""
    mounts = ",".join(f"{p}:{p}" for p in dict.fromkeys([cfg.cluster.shared_dir or "", str(out)]) if p)
    values = {
        "SBATCH_LINES": "\n".join(sbatch_lines(cfg, out)),
        "SCRIPT_NAME": SCRIPT_NAME,
        "OUT_DIR": str(out),
        "OUT_DIR_Q": shell_join([str(out)]),
        "NODES": str(s.nodes),
        "CPUS": str(s.cpus_per_node),
        "GPUS": str(s.gpus_per_node),
        "SIM": str(s.sim_per_node if s.sim_per_node is not None else s.cpus_per_node),
        "HEAD_PORT": str(s.head_port),
        "DASHBOARD_PORT": str(s.dashboard_port),
        "JOIN_TIMEOUT": str(s.join_timeout_s),
        "VENV": shell_join([venv]),
        "CONTAINER": shell_join([s.container or ""]),
        "CONTAINER_MOUNTS": shell_join([mounts]),
        "REQUEUE": "1" if s.requeue else "0",
        "DRIVER": shell_join(argv),
        "RESUME_OVERRIDE": shell_join([resume_arg]),
    }
    script = TEMPLATE
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", value)
    header = f"# Config of the SLURM job in {out}/{SCRIPT_NAME} (rendered by vla-dist cluster render slurm)\n"
    return {SCRIPT_NAME: script, CONFIG_NAME: header + to_yaml(job)}
