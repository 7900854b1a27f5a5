#!/usr/bin/env bash
# Render the KubeRay manifests for a vla-dist command and apply them: the RayJob when the config
# allows one (cluster.kuberay.dashboard_host), else the RayCluster (then: launch/submit.sh).
#   launch/kuberay.sh collect --config my-cluster.yaml
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,4p' "$0" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
job=$1
shift
out=$(mktemp -d)
"$PYTHON" -m vla_dist.cluster.cli cluster render kuberay --job "$job" --out "$out" "$@"
if [ -f "$out/rayjob.yaml" ]; then
  exec kubectl apply -f "$out/rayjob.yaml"
fi
exec kubectl apply -f "$out/raycluster.yaml"
