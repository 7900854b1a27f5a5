#!/usr/bin/env bash
# Render the SLURM job for a vla-dist command from the config and submit it.
#   launch/slurm.sh collect --config my-cluster.yaml collect.episodes=200
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,3p' "$0" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
job=$1
shift
out=$("$PYTHON" -m vla_dist.cluster.cli cluster render slurm --job "$job" "$@")
echo "$out"
script=$(echo "$out" | sed -n 's/^submit: sbatch //p')
exec sbatch "$script"
