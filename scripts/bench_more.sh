#!/usr/bin/env bash
# Issue-4 benchmarks beyond MiniLM on SST-2: the same side-by-side bench (bertjax vs Hugging Face PyTorch)
# for a BERT-base-sized random model (12 layers, hidden 768, MiniLM's WordPiece vocabulary) on SST-2, and for
# MiniLM on sentence pairs (SNLI validation as training data). Writes runs/bench/{bert_base_sst2,minilm_snli}.json
# and copies them to docs/bench/{bert_base_sst2,minilm_snli}_YYYYMMDD_HHMM.json (UTC start time), so no run overwrites
# an earlier one; each JSON records the machine and bertjax's dtypes.
# About 15 minutes on 2 CPU cores. Extra arguments go to both benches.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
data="${DATA_DIR:-../shared/data}"
out=runs/bench
stamp="$(date -u +%Y%m%d_%H%M)"
mkdir -p "$out"
model="$out/bert_base_random"
if [[ ! -f "$model/config.json" ]]; then
  "$py" - "$model" <<'PY'
"""A randomly initialised BERT-base (12 x 768, 12 heads, 3072) with all-MiniLM-L6-v2's tokenizer."""
import sys
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from bertjax.config_base import minilm_path
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2))
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
fi
"$py" -m bertjax.bench --config configs/minilm_sst2.py --peer torch --json "$out/bert_base_sst2.json" \
  --config.model.name_or_path="$model" --config.data.train="$data/sst2/train.tsv" \
  --config.data.eval="$data/sst2/dev.tsv" --steps 10 --warmup 2 --repeats 2 "$@"
"$py" -m bertjax.bench --config configs/minilm_sst2.py --peer torch --json "$out/minilm_snli.json" \
  --config.data.train="$data/snli/validation.tsv" --config.data.eval="$data/snli/validation.tsv" \
  "--config.data.text_fields=('premise','hypothesis')" --steps 40 --warmup 5 --repeats 2 "$@"
for name in bert_base_sst2 minilm_snli; do
  cp "$out/$name.json" "docs/bench/${name}_$stamp.json"
  echo "wrote docs/bench/${name}_$stamp.json"
done
