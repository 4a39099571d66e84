#!/usr/bin/env bash
# Runs N processes of one `sora-jax train` job on this machine, as a multi-host job would on N hosts:
# each process gets JAX_NUM_PROCESSES / JAX_PROCESS_ID / JAX_COORDINATOR_ADDRESS and its own log file.
#   launch/local_multihost.sh 2 --config configs/quickstart.py:smoke --workdir /tmp/mh
# Each process sees its local CPU devices (set XLA_FLAGS=--xla_force_host_platform_device_count=K for K each).
set -euo pipefail
n=${1:?usage: launch/local_multihost.sh N sora-jax-train-args...}; shift
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
logdir=${LOGDIR:-/tmp/sora_jax_multihost}; mkdir -p "$logdir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i JAX_COORDINATOR_ADDRESS=127.0.0.1:$port \
    sora-jax train "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { rc=$?; echo "process $i failed (exit $rc), see $logdir/process_$i.log" >&2; }
done
exit $rc
