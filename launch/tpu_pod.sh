#!/bin/bash
# TPU VM pod launcher: runs the same command on every worker of the pod slice.
#   bash launch/tpu_pod.sh my-tpu-v4-64 us-central2-b configs/clip_vitb16.py gs://bucket/runs/clip \
#       --config.data.splits.train='gs://bucket/laion/{00000..41407}.tar'
# jax.distributed.initialize() discovers the pod from the TPU metadata. The repo must already be
# on every worker (e.g. `gcloud compute tpus tpu-vm scp --recurse . NAME: --worker=all`), with
# `pip install -e '.[tpu]'` run there. A preempted (spot) slice gets SIGTERM: the loop saves and
# exits; rerun this script to resume.
set -euo pipefail
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
ARGS=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd ~/sslvl_jax && python -m sslvl_jax.main --config=$CONFIG --workdir=$WORKDIR$ARGS"
