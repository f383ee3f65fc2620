#!/usr/bin/env bash
# Starts N bertjax.train (or MODULE) processes on this machine (CPU devices, gloo collectives), to try multi-host.
#   bash scripts/launch_local.sh 2 --config configs/demo.py --workdir runs/demo_2proc
# MODULE=bertjax.sweep starts a sweep instead (same flags plus --sweep).
# Each process gets DEVICES_PER_PROCESS CPU devices (default 1), also on a host with GPUs (JAX_PLATFORMS=cpu:
# otherwise every process would take every GPU). Output goes to WORKDIR/process_K.log.
set -euo pipefail
cd "$(dirname "$0")/.."
n="$1"; shift
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
port="${PORT:-$((20000 + RANDOM % 20000))}"
workdir="$(printf '%s\n' "$@" | sed -n 's/^--workdir=\{0,1\}//p' | tail -1)"
logdir="${workdir:-.}"; mkdir -p "$logdir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    "$py" -m "${MODULE:-bertjax.train}" "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" \
    > "$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 5 "$logdir/process_0.log"
exit "$status"
