#!/usr/bin/env bash
# Issue-18 benchmarks: the side-by-side bench (bertjax vs Hugging Face PyTorch) for a ModernBERT-base-sized and a
# DeBERTa-v3-base-sized random model (dimensions and vocabulary sizes of answerdotai/ModernBERT-base and
# microsoft/deberta-v3-base, random weights from the transformers config, all-MiniLM-L6-v2's WordPiece tokenizer
# since no pretrained tokenizer is available offline) on SST-2, max length 128, and BERT-base (random) in the
# same run, the reference the issue's targets are set against. Writes
# runs/bench/{bert_base,modernbert_base,deberta_v3_base}_sst2.json and copies them to docs/bench/ with the UTC
# start time. Extra arguments go to every bench; MODELS="modernbert_base ..." runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
data="${DATA_DIR:-../shared/data}"
out=runs/bench
stamp="$(date -u +%Y%m%d_%H%M)"
mkdir -p "$out"
for name in ${MODELS:-bert_base modernbert_base deberta_v3_base}; do
  model="$out/${name}_random"
  if [[ ! -f "$model/config.json" ]]; then
    "$py" - "$name" "$model" <<'PY'
"""A randomly initialised base-sized model with all-MiniLM-L6-v2's tokenizer (ids < 30522 of the larger vocabulary)."""
import sys
import torch
import transformers as tr
from bertjax.config_base import minilm_path
torch.manual_seed(0)
name, folder = sys.argv[1:]
if name == "bert_base":  # bert-base-uncased's dimensions: 12 layers, 768, 3072
  config = tr.BertConfig(num_labels=2)
  model = tr.BertForSequenceClassification(config)
elif name == "modernbert_base":  # answerdotai/ModernBERT-base: 22 layers, 768, GLU 2 x 1152, window 128
  config = tr.ModernBertConfig(vocab_size=50368, pad_token_id=0, num_labels=2)
  model = tr.ModernBertForSequenceClassification(config)
else:  # microsoft/deberta-v3-base: 12 layers, 768, 3072, 128k vocabulary, 256 position buckets
  config = tr.DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, relative_attention=True, pos_att_type=["p2c", "c2p"],
                              position_buckets=256, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                              share_att_key=True, position_biased_input=False, type_vocab_size=0,
                              layer_norm_eps=1e-7, pad_token_id=0, num_labels=2)
  model = tr.DebertaV2ForSequenceClassification(config)
model.save_pretrained(folder)
tr.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
PY
  fi
  "$py" -m bertjax.bench --config configs/minilm_sst2.py --peer torch --json "$out/${name}_sst2.json" \
    --config.model.name_or_path="$model" --config.data.train="$data/sst2/train.tsv" \
    --config.data.eval="$data/sst2/dev.tsv" --steps 10 --warmup 2 --repeats 2 "$@"
  cp "$out/${name}_sst2.json" "docs/bench/${name}_sst2_$stamp.json"
  echo "wrote docs/bench/${name}_sst2_$stamp.json"
done
