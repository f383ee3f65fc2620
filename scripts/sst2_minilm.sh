#!/usr/bin/env bash
# Issue-3 benchmark: all-MiniLM-L6-v2 fine-tuned on SST-2 train for 1 epoch, evaluated on dev (872),
# from the shared GLUE files. Writes runs/sst2_minilm/summary.json; pass extra --config.* overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
data="${SST2_DIR:-../shared/data/sst2}"
workdir="${WORKDIR:-runs/sst2_minilm}"
"$py" -m bertjax.train --config configs/minilm_sst2.py --workdir "$workdir" \
  --config.data.train="$data/train.tsv" --config.data.eval="$data/dev.tsv" "$@"
"$py" - "$workdir" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
keys = ("steps", "train_examples_per_sec", "train_tokens_per_sec", "padding_fraction", "mfu", "num_compilations",
        "input_wait_fraction", "wall_seconds")
print({k: round(s[k], 4) if isinstance(s[k], float) else s[k] for k in keys})
print("best", s["best"], "\nfinal", s["final"])
PY
