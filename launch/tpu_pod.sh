#!/bin/bash
# TPU VM pod launcher: runs the same command on every worker of the pod slice.
#   bash launch/tpu_pod.sh my-tpu-v4-64 us-central2-b configs/clip_vitb16.py gs://bucket/runs/clip \
#       --config.data.splits.train='gs://bucket/laion/{00000..41407}.tar'
# jax.distributed.initialize() discovers the pod from the TPU metadata. The repo must already be
# in ~/sslvl_jax on every worker (e.g. `gcloud compute tpus tpu-vm scp --recurse . NAME:sslvl_jax
# --zone=Z --worker=all`), with `pip install -e '.[tpu]'` run there. A preempted (spot) slice gets
# SIGTERM: the loop saves and exits; rerun this script to resume.
# GCLOUD (default gcloud) and PYTHON (default python3, the remote interpreter) may be overridden.
set -euo pipefail
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
# Each argument is quoted for the workers' login shell (bash), so spaces and quotes survive ssh.
ARGS=$(printf " %q" "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
"${GCLOUD:-gcloud}" compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd ~/sslvl_jax && ${PYTHON:-python3} -m sslvl_jax.main$ARGS"
