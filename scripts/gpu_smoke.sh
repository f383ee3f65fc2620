#!/usr/bin/env bash
# The first command to run on a GPU machine (docs/gpu.md): devices, a BERT-base-sized training run at batch 1024
# with packing, and an A/B of the attention implementations. Arguments go to scripts/gpu_smoke.py
# (--steps, --batch, --expected_devices N, --cpu for the dry path on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
exec "$py" scripts/gpu_smoke.py "$@"
