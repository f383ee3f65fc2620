"""The large-batch study behind optimizer.lr_scaling=auto: writes the table in docs/large_batch.md and
docs/bench/large_batch.json.

  python scripts/large_batch_study.py [--cells NAME,...] [--seeds 3] [--root runs/large_batch_study] [--dry]

Each cell is one task, batch size, epoch count and batch-size scaling (auto = optim.batch_rule, sqrt, linear;
batch 32 is the recipe itself), trained for --seeds seeds (train.seed 0, 1, ...: head init, dropout and data
order) with all-MiniLM-L6-v2 and the recipe in configs/minilm_sst2.py (AdamW, lr 5e-5 at batch 32, 10% warmup,
linear decay), packed rows, evaluated after the last step. Every run is an ordinary `python -m bertjax.train`
in ROOT/CELL/seedK; a finished run is not run again, so the script resumes where it stopped and --cells runs a
part of it. The table gives per cell the mean and standard deviation over the seeds that finished, the steps
and the mean wall time of a run (this machine, whatever else ran on it).

Tasks: SST-2 (67,349 train / 872 dev), SNLI pairs (the 9,842 pairs of ../shared/data/snli/validation.tsv, 8,842
for training and 1,000 for dev, split with a fixed seed) and STS-B regression (5,749 / 1,500; metric Pearson).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

TASKS = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/dev.tsv", "metric": "accuracy", "options": []},
    "snli": {"train": "snli_train.tsv", "eval": "snli_dev.tsv", "metric": "accuracy",
             "options": ["--config.data.text_fields=('premise','hypothesis')"]},
    "stsb": {"train": "glue_stsb/train.tsv", "eval": "glue_stsb/dev.tsv", "metric": "pearson",
             "options": ["--config.data.text_fields=('sentence1','sentence2')", "--config.data.label_field=score",
                         "--config.data.task=regression"]},
}


def cell(task: str, batch: int, epochs: int, scaling: str = "auto") -> dict:
  name = f"{task}_b{batch}_e{epochs}" + ("" if batch == 32 else f"_{scaling}")
  return {"name": name, "task": task, "batch": batch, "epochs": epochs, "scaling": scaling}


# In the order they run: what the rule must match first, then what it is compared with.
CELLS = [cell("sst2", 32, 1), cell("sst2", 1024, 1), cell("sst2", 1024, 1, "sqrt"), cell("sst2", 1024, 1, "linear"),
         cell("sst2", 256, 1), cell("sst2", 4096, 3), cell("sst2", 32, 3), cell("sst2", 1024, 3),
         cell("snli", 32, 3), cell("snli", 1024, 3), cell("stsb", 32, 3), cell("stsb", 1024, 3),
         cell("sst2", 4096, 1), cell("sst2", 256, 3), cell("sst2", 4096, 3, "sqrt"), cell("sst2", 1024, 3, "sqrt"),
         cell("snli", 1024, 3, "sqrt"), cell("stsb", 1024, 3, "sqrt"),
         # the short runs given more steps: 9 epochs at batch 1024 are 54 (STS-B) and 81 (SNLI) steps
         cell("stsb", 1024, 9), cell("snli", 1024, 9)]


def snli_split(root: Path) -> None:
  """SNLI validation split into 8,842 training and 1,000 dev pairs with a fixed seed (written under ROOT)."""
  if (root / "snli_dev.tsv").exists():
    return
  lines = (SHARED / "snli" / "validation.tsv").read_text(encoding="utf-8").splitlines()
  header, rows = lines[0], lines[1:]
  order = np.random.default_rng(0).permutation(len(rows))
  for name, part in (("snli_dev.tsv", order[:1000]), ("snli_train.tsv", order[1000:])):
    (root / name).write_text("\n".join([header] + [rows[i] for i in sorted(part)]) + "\n", encoding="utf-8")


def run(root: Path, c: dict, seed: int, python: str) -> dict | None:
  """One seed of a cell (trained unless finished before); its summary, or None if it failed."""
  task = TASKS[c["task"]]
  data = lambda key: str((root if task[key].startswith("snli") else SHARED) / task[key])  # SNLI: split in ROOT
  workdir = root / c["name"] / f"seed{seed}"
  summary = workdir / "summary.json"
  if not (summary.exists() and json.loads(summary.read_text()).get("finished")):
    cmd = [python, "-m", "bertjax.train", f"--config={REPO}/configs/minilm_sst2.py", f"--workdir={workdir}",
           f"--config.data.train={data('train')}", f"--config.data.eval={data('eval')}",
           f"--config.train.global_batch_size={c['batch']}", f"--config.train.num_epochs={c['epochs']}",
           f"--config.optimizer.lr_scaling={c['scaling']}", f"--config.train.seed={seed}",
           "--config.train.eval_every_steps=0", "--config.train.log_every_steps=50", *task["options"]]
    log = workdir.parent / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with open(log, "w") as f:
      code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    print(f"{c['name']} seed {seed}: exit {code} after {time.time() - t:.0f} s (log {log})", flush=True)
    if code != 0:
      return None
  return json.loads(summary.read_text())


def table(root: Path, cells: list[dict], seeds: int) -> tuple[list[dict], str]:
  rows = []
  for c in cells:
    metric = TASKS[c["task"]]["metric"]
    done = [json.loads(p.read_text()) for k in range(seeds)
            if (p := root / c["name"] / f"seed{k}" / "summary.json").exists()]
    done = [s for s in done if s.get("finished")]
    # summary.json's "final" (run_summary.eval_scalars); runs written before 2026-12-07 named it eval_<metric>
    values = [s["final"].get(metric, s["final"].get(f"eval_{metric}")) for s in done if s.get("final")]
    rows.append({**c, "metric": metric, "values": values, "seeds": len(values),
                 "mean": statistics.mean(values) if values else None,
                 "sd": statistics.stdev(values) if len(values) > 1 else None,
                 "steps": done[0]["steps"] if done else None,
                 "mean_examples_per_step": done[0].get("mean_examples_per_step") if done else None,
                 "wall_seconds": statistics.mean(s["wall_seconds"] for s in done) if done else None,
                 "derived": _derived(root / c["name"] / "seed0")})
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = ["| task | batch | epochs | scaling | seeds | dev metric, mean | sd | steps | examples/step | "
           "what the scaling set | wall s/run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['batch']} | {r['epochs']} | {'recipe' if r['batch'] == 32 else r['scaling']} | "
                 f"{r['seeds']} | {fmt(r['mean'], '.4f')} | {fmt(r['sd'], '.4f')} | {fmt(r['steps'], 'd')} | "
                 f"{fmt(r['mean_examples_per_step'], '.1f')} | {r['derived'] or '-'} | {fmt(r['wall_seconds'], '.0f')} |")
  return rows, "\n".join(lines)


def _derived(workdir: Path) -> str:
  path = workdir / "config.json"
  if not path.exists():
    return ""
  derived = json.loads(path.read_text()).get("derived", {})
  return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in derived.get("optimizer", {}).items())


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cells", default="", help="comma-separated cell names (default: all, in order)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--root", default="runs/large_batch_study")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--dry", action="store_true", help="print the cells and write the table of what exists")
  args = parser.parse_args()
  root = Path(args.root).resolve()
  root.mkdir(parents=True, exist_ok=True)
  names = [n for n in args.cells.split(",") if n]
  unknown = set(names) - {c["name"] for c in CELLS}
  if unknown:
    print(f"unknown cells: {', '.join(sorted(unknown))}; valid: {', '.join(c['name'] for c in CELLS)}",
          file=sys.stderr)
    return 2
  cells = [c for c in CELLS if not names or c["name"] in names]
  snli_split(root)
  if not args.dry:
    for c in cells:
      for seed in range(args.seeds):
        run(root, c, seed, args.python)
  rows, text = table(root, CELLS, args.seeds)
  (REPO / "docs" / "bench" / "large_batch.json").write_text(json.dumps(rows, indent=2) + "\n")
  doc = REPO / "docs" / "large_batch.md"
  begin, end = "<!-- study table: written by scripts/large_batch_study.py -->", "<!-- end of study table -->"
  if doc.exists() and begin in doc.read_text() and end in doc.read_text():
    before, rest = doc.read_text().split(begin, 1)
    doc.write_text(before + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
