#!/usr/bin/env bash
# Run a command in a private network namespace that has only a loopback interface: a Ray cluster
# (or the local SLURM of cluster/slurm/local-cluster.sh) started inside listens on no interface
# reachable from outside this host. Ray binds its GCS and raylet ports on all interfaces (not
# configurable in Ray 2.60); here "all" is loopback. Needs root (or unprivileged user namespaces).
#
#   cluster/local/private-net.sh COMMAND [ARGS...]
#   cluster/local/private-net.sh --check        # exit 0 when this host allows it
#
# Everything that must talk to the cluster (ray job submit, vla-dist, sbatch) runs inside COMMAND.
set -euo pipefail

if [ "${1:-}" = "--check" ]; then
  exec unshare --net true
fi
if [ "${1:-}" = "--inside" ]; then
  shift
  ip link set lo up
  # A second loopback address: glibc's getaddrinfo(AI_ADDRCONFIG) skips 127.0.0.1, and SLURM's
  # daemons find no address to bind without one. It is on `lo`, so still unreachable from outside.
  ip addr add 10.254.0.1/32 dev lo
  exec "$@"
fi
[ $# -ge 1 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
exec unshare --net -- "$0" --inside "$@"
