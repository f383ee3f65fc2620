#!/usr/bin/env bash
# Issue-5 benchmark: three differently-seeded all-MiniLM-L6-v2 fine-tunes on SST-2 (configs/minilm_sst2.py),
# each evaluated on dev (872) alone and as soft/hard ensembles, then prediction speed of bertjax.predict
# against PyTorch (transformers) on the same exported model. Writes $ROOT/benchmark.json and prints a table.
#   bash scripts/ensemble_sst2.sh                                  # hours on a CPU
#   ROOT=runs/ens_smoke bash scripts/ensemble_sst2.sh --config.train.max_steps=5   # a smoke run
# Extra arguments go to every bertjax.train run; re-running resumes (finished runs are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
data="${SST2_DIR:-../shared/data/sst2}"
root="${ROOT:-runs/ensemble_sst2}"
seeds=(${SEEDS:-0 1 2})
mkdir -p "$root"

workdirs=()
for seed in "${seeds[@]}"; do
  workdir="$root/seed$seed"
  "$py" -m bertjax.train --config configs/minilm_sst2.py --workdir "$workdir" \
    --config.data.train="$data/train.tsv" --config.data.eval="$data/dev.tsv" --config.train.seed="$seed" "$@"
  workdirs+=(--workdir "$workdir")
done

for vote in soft hard; do
  "$py" -m bertjax.evaluate "${workdirs[@]}" --checkpoint best --data "$data/dev.tsv" --vote "$vote" \
    --json "$root/eval_$vote.json" > "$root/eval_$vote.txt"
done

"$py" -m bertjax.export --workdir "$root/seed${seeds[0]}" --output "$root/export" --overwrite

"$py" - "$root" "$data/dev.tsv" <<'PY'
"""Prediction speed on SST-2 dev: bertjax.predict (jitted, packed) vs PyTorch eager, same export, same texts."""
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from bertjax.evaluate import Predictor
from bertjax.predict import load_model, predict_logits, read_input

root, dev = Path(sys.argv[1]), sys.argv[2]
export, batch = root / "export", 64
model = load_model(export)
examples, _ = read_input(model.data, model.num_texts, dev)
texts = [t[0] for t in examples.texts]
predictor = Predictor()
cold_logits, cold = predict_logits(model, examples, batch, predictor)  # compiles each batch shape once
ours, warm = predict_logits(model, examples, batch, predictor)  # every shape compiled: steady state

tok = AutoTokenizer.from_pretrained(str(export))
pt = AutoModelForSequenceClassification.from_pretrained(str(export)).eval()

def torch_pass():
  out = []
  with torch.inference_mode():
    for i in range(0, len(texts), batch):
      enc = tok(texts[i:i + batch], truncation=True, max_length=model.data.max_length, padding=True,
                return_tensors="pt")
      out.append(pt(**enc).logits.float().numpy())
  return np.concatenate(out)

torch_pass()  # warm-up (allocator, thread pool)
t = time.perf_counter()
theirs = torch_pass()
torch_seconds = time.perf_counter() - t

evals = {v: json.loads((root / f"eval_{v}.json").read_text()) for v in ("soft", "hard")}
result = {
    "data": dev, "num_examples": len(texts), "batch_size": batch, "max_length": model.data.max_length,
    "torch_threads": torch.get_num_threads(),
    "models": [{k: m[k] for k in ("workdir", "checkpoint_step")} |
               {k: m["metrics"][k] for k in ("accuracy", "macro_f1", "mcc", "loss")} for m in evals["soft"]["models"]],
    "ensembles": {v: {k: e["ensemble"]["metrics"][k] for k in ("accuracy", "macro_f1", "mcc", "loss")}
                  for v, e in evals.items() if e["ensemble"]},
    "predict": {"bertjax_examples_per_sec": warm["examples_per_sec"],
                "bertjax_first_pass_examples_per_sec": cold["examples_per_sec"],
                "bertjax_compile_seconds": cold["compile_seconds"],
                "bertjax_num_compilations": warm["num_compilations"],
                "torch_examples_per_sec": len(texts) / torch_seconds,
                "speedup": warm["examples_per_sec"] / (len(texts) / torch_seconds),
                "max_abs_logit_diff": float(np.abs(ours - theirs).max())},
}
(root / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")

fmt = lambda x: "-" if x is None else f"{x:.4f}"
print(f"\nSST-2 dev ({len(texts)} examples)")
print(f"{'model':<34} {'step':>6} {'accuracy':>9} {'macro_f1':>9} {'mcc':>7} {'loss':>7}")
for m in result["models"]:
  print(f"{m['workdir']:<34} {m['checkpoint_step']:>6} {fmt(m['accuracy']):>9} {fmt(m['macro_f1']):>9} "
        f"{fmt(m['mcc']):>7} {fmt(m['loss']):>7}")
for vote, m in result["ensembles"].items():
  print(f"{'ensemble (' + vote + ' vote)':<34} {'':>6} {fmt(m['accuracy']):>9} {fmt(m['macro_f1']):>9} "
        f"{fmt(m['mcc']):>7} {fmt(m['loss']):>7}")
p = result["predict"]
print(f"\npredict, batch {batch}, max_length {model.data.max_length} (examples/sec, tokenization included)")
print(f"  bertjax (jitted, packed)   {p['bertjax_examples_per_sec']:9.1f}   (first pass "
      f"{p['bertjax_first_pass_examples_per_sec']:.1f}, not counting {p['bertjax_compile_seconds']:.1f}s compiling "
      f"{p['bertjax_num_compilations']} batch shape(s))")
print(f"  PyTorch ({result['torch_threads']} threads)        {p['torch_examples_per_sec']:9.1f}")
print(f"  speedup {p['speedup']:.2f}x; max |logit difference| {p['max_abs_logit_diff']:.2e}")
print(f"wrote {root / 'benchmark.json'}")
PY
