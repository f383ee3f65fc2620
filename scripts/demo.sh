#!/usr/bin/env bash
# The offline demo: generates a small labelled sentiment set, then fine-tunes all-MiniLM-L6-v2 on it.
# Extra arguments go to bertjax.train (e.g. --config.train.num_epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
py=".venv/bin/python"; [[ -x "$py" ]] || py=python3
"$py" -m bertjax.demo_data runs/demo_data
"$py" -m bertjax.train --config configs/demo.py --workdir runs/demo "$@"
