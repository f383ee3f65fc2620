#!/usr/bin/env bash
# Issue-7 large-batch study: all-MiniLM-L6-v2 on SST-2 at batch 32 (AdamW, the baseline) and at batch
# 256 and 1024 (linear vs sqrt LR scaling from 5e-5 at batch 32, AdamW vs LAMB: configs/sweeps/large_batch.py),
# the same number of epochs over the same examples; writes docs/large_batch.md.
#   bash scripts/large_batch_study.sh                       # ROWS=16000 EPOCHS=2: about an hour on 2 CPU cores
#   ROWS=0 EPOCHS=1 bash scripts/large_batch_study.sh       # the whole training set
# Re-running resumes (finished trials are kept). Extra arguments go to every run.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"; [[ -x "$py" ]] || py=python3
data="${SST2_DIR:-../shared/data/sst2}"
root="${ROOT:-runs/large_batch}"
rows="${ROWS:-16000}"
epochs="${EPOCHS:-2}"
mkdir -p "$root"
train="$data/train.tsv"
if [[ "$rows" != 0 ]]; then  # the first ROWS examples (a working copy under runs/, not in the repository)
  train="$root/train_first$rows.tsv"
  head -n "$((rows + 1))" "$data/train.tsv" > "$train"
fi
common=(--config configs/minilm_sst2.py --config.data.train="$train" --config.data.eval="$data/dev.tsv"
        --config.train.num_epochs="$epochs" --config.train.eval_every_steps=0 --config.optimizer.base_batch_size=32)
"$py" -m bertjax.train "${common[@]}" --workdir "$root/baseline_b32" "$@"
"$py" -m bertjax.sweep "${common[@]}" --sweep configs/sweeps/large_batch.py --workdir "$root/sweep" "$@"
"$py" - "$root" "$train" "$epochs" <<'PY'
"""docs/large_batch.md from the baseline's summary.json and the sweep's results.json."""
import json, sys
from pathlib import Path
root, train, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
base = json.loads((root / "baseline_b32" / "summary.json").read_text())
trials = json.loads((root / "sweep" / "results.json").read_text())["trials"]
rows = [dict(batch=32, scaling="none", optimizer="adamw", lr=5e-5, status="finished" if base["finished"] else "unfinished",
             best=base["best"], final=base["final"], steps=base["steps"], eps=base["train_examples_per_sec"])]
for t in sorted(trials, key=lambda t: t["name"]):
  s = json.loads((root / "sweep" / "trials" / t["name"] / "summary.json").read_text())
  cfg = json.loads((root / "sweep" / "trials" / t["name"] / "config.json").read_text())
  ratio = t["train.global_batch_size"] / 32
  lr = 5e-5 * (ratio if t["optimizer.lr_scaling"] == "linear" else ratio ** 0.5)
  rows.append(dict(batch=t["train.global_batch_size"], scaling=t["optimizer.lr_scaling"], optimizer=t["optimizer.name"],
                   lr=lr, status=t["status"], best=s.get("best"), final=s.get("final"), steps=s.get("steps"),
                   eps=s.get("train_examples_per_sec")))
fmt = lambda e, k: "-" if not e or e.get(k) is None else f"{e[k]:.4f}"
lines = [
    "# Large batches: MiniLM on SST-2 at batch 32, 256 and 1024",
    "",
    "Written by `bash scripts/large_batch_study.sh` (the table; only the Notes section is by hand). all-MiniLM-L6-v2, packed rows of 128 tokens,",
    f"{epochs} epoch(s) over `{train}` (the first examples of SST-2 train), evaluated on SST-2 dev (872) after each",
    "epoch; warmup 10% of the steps, linear decay, clip 1.0, weight decay 0.01; peak learning rate 5e-5 at batch 32,",
    "scaled by batch/32 (linear) or sqrt(batch/32) (sqrt). `best` is the eval with the lowest eval loss;",
    "examples/s is the run's own training throughput on this shared 2-core CPU (noisy; compare within a batch size).",
    "",
    "| batch | LR scaling | optimizer | peak LR | steps | best dev acc | final dev acc | final dev loss | examples/s |",
    "|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
  lines.append(f"| {r['batch']} | {r['scaling']} | {r['optimizer']} | {r['lr']:.3g} | {r['steps']} | "
               f"{fmt(r['best'], 'accuracy')} | {fmt(r['final'], 'accuracy')} | {fmt(r['final'], 'eval_loss')} | "
               f"{'-' if r['eps'] is None else format(r['eps'], '.1f')} |")
out = Path("docs/large_batch.md")
text = "\n".join(lines) + "\n"
if out.exists() and "\n## Notes\n" in out.read_text():  # the hand-written reading of the table is kept
  text += "\n## Notes\n" + out.read_text().split("\n## Notes\n", 1)[1]
out.write_text(text)
(root / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
print(text)
PY
