#!/usr/bin/env bash
# Run a vla-dist command on a running Ray cluster through Ray Jobs, following its logs.
#   launch/submit.sh collect collect.episodes=200 run.dir=/shared/runs/a data.dir=/shared/data/a
#   launch/submit.sh --no-wait --working-dir . train
set -euo pipefail
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m vla_dist.cluster.cli submit "$@"
