#!/usr/bin/env bash
# Runs `sora-jax train` on every worker of a Cloud TPU VM pod slice (e.g. v5p-128 = 16 hosts x 4 chips).
#
# Assumes: the TPU VM exists (gcloud compute tpus tpu-vm create ... --version=<a jax runtime image>), `gcloud`
# is authenticated with ssh access, the workdir and data are on storage every worker sees (gs://... through
# orbax/grain, or a mounted filesystem), and this repository is at the same git revision on every worker
# (this script clones/updates it). JAX finds the other hosts itself on a TPU pod (TPU_WORKER_HOSTNAMES), so
# no coordinator flags are needed: sora-jax calls jax.distributed.initialize() when it sees a multi-host TPU.
#
# Usage:
#   TPU=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh --config configs/pod_dit_1b.py \
#       --workdir gs://bucket/runs/dit1b --config.data.path=gs://bucket/data/webvid
# Optional: PROJECT=..., REPO=https://github.com/<you>/sora_jax, REV=main, EXTRAS="" (pip extras).
# Stopping: Ctrl-C stops the local ssh; run `launch/tpu_pod.sh --kill` to stop the job on all workers.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-$(git config --get remote.origin.url)}
REV=${REV:-$(git rev-parse HEAD)}
project=${PROJECT:+--project=$PROJECT}
ssh() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $project --worker=all --command="$1"; }
if [[ "${1:-}" == "--kill" ]]; then
  ssh "pkill -f 'sora-jax train' || true"
  exit 0
fi
args=$(printf '%q ' "$@")
ssh "set -e
  [ -d sora_jax ] || git clone -q $REPO sora_jax
  cd sora_jax && git fetch -q origin && git checkout -q $REV
  python3 -m venv ~/sora_venv && . ~/sora_venv/bin/activate
  pip install -q -U pip && pip install -q -e '.${EXTRAS:+[$EXTRAS]}' 'jax[tpu]'
  SORA_JAX_AUTO_DISTRIBUTED=1 nohup sora-jax train $args > ~/sora_train.log 2>&1 &
  echo \"worker \$(hostname): started, log ~/sora_train.log\""
