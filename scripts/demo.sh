#!/usr/bin/env bash
# The offline demo: fine-tunes all-MiniLM-L6-v2 on a small generated sentiment set (configs/demo.py writes it to
# runs/demo_data the first time). Extra arguments go to bertjax.train (e.g. --config.train.num_epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
py=".venv/bin/python"; [[ -x "$py" ]] || py=python3
"$py" -m bertjax.train --config configs/demo.py --workdir runs/demo "$@"
