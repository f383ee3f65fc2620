"""The large-batch study behind optimizer.lr_scaling=auto: writes the table in docs/large_batch.md and
docs/bench/large_batch.json.

  python scripts/large_batch_study.py [--cells NAME,...] [--seeds 3] [--root runs/large_batch_study] [--dry]
      [--config.KEY=VALUE ...]

Each cell is one task, batch size, epoch count and batch-size scaling (auto = optim.batch_rule, sqrt, linear;
batch 32 is the recipe itself), trained for --seeds seeds (train.seed 0, 1, ...: head init, dropout and data
order) with all-MiniLM-L6-v2 and the recipe in configs/minilm_sst2.py (AdamW, lr 5e-5 at batch 32, 10% warmup,
linear decay), packed rows, evaluated after the last step. Every run is an ordinary `python -m bertjax.train`
in ROOT/CELL/seedK, with any `--config.KEY=VALUE` arguments given to the script added (not the keys that make a
cell and a seed). Each run is recorded in docs/bench/large_batch.json as soon as it ends ("runs": cell, seed, dev
metric, steps, wall time, the CPU, the products' dtype, the options), which outlives ROOT and the machine: a
recorded or finished run is not run again, so the script resumes where it stopped, in a later session too, and
--cells runs a part of it. The table gives per cell the mean and standard deviation over all recorded seeds, the
steps, the mean wall time of a run (its machine, whatever else ran on it) and which CPU and products its runs had.

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
LEDGER = REPO / "docs" / "bench" / "large_batch.json"
sys.path.insert(0, str(REPO))
from bertjax.config_base import check_keys, override_keys  # pylint: disable=wrong-import-position
from bertjax.errors import UserError  # pylint: disable=wrong-import-position
from bertjax.files import atomic_write  # pylint: disable=wrong-import-position
from bertjax.matmul_peak import cpu_description  # pylint: disable=wrong-import-position

# what a cell and a seed are made of: an option may not change them
CELL_KEYS = ("train.seed", "train.global_batch_size", "train.num_epochs", "optimizer.lr_scaling", "data.train",
             "data.eval", "data.text_fields", "data.label_field", "data.task", "train.eval_every_steps")

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


def run(root: Path, c: dict, seed: int, python: str, options: list[str]) -> bool:
  """Trains one seed of a cell unless it finished before; whether it finished."""
  task = TASKS[c["task"]]
  data = lambda key: str((root if task[key].startswith("snli") else SHARED) / task[key])  # SNLI: split in ROOT
  workdir = root / c["name"] / f"seed{seed}"
  summary = workdir / "summary.json"
  used = workdir.parent / f"seed{seed}.options.json"
  if summary.exists() and json.loads(summary.read_text()).get("finished"):
    if used.exists() and json.loads(used.read_text()) != options:
      print(f"{c['name']} seed {seed} finished earlier with the options {json.loads(used.read_text())}; "
            f"recorded with those, not {options}", flush=True)
  else:
    cmd = [python, "-m", "bertjax.train", f"--config={REPO}/configs/minilm_sst2.py", f"--workdir={workdir}",
           f"--config.data.train={data('train')}", f"--config.data.eval={data('eval')}",
           f"--config.train.global_batch_size={c['batch']}", f"--config.train.num_epochs={c['epochs']}",
           f"--config.optimizer.lr_scaling={c['scaling']}", f"--config.train.seed={seed}",
           "--config.train.eval_every_steps=0", "--config.train.log_every_steps=50", *task["options"], *options]
    log = workdir.parent / f"seed{seed}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    used.write_text(json.dumps(options))
    t = time.time()
    with open(log, "w") as f:
      code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    print(f"{c['name']} seed {seed}: exit {code} after {time.time() - t:.0f} s (log {log})", flush=True)
    if code != 0:
      return False
  return True


def record(root: Path, c: dict, seed: int) -> dict | None:
  """The ledger entry of ROOT/CELL/seedK if it finished (on this machine), else None."""
  workdir = root / c["name"] / f"seed{seed}"
  options = workdir.parent / f"seed{seed}.options.json"
  path = workdir / "summary.json"
  summary = json.loads(path.read_text()) if path.exists() else {}
  if not summary.get("finished"):
    return None
  metric = TASKS[c["task"]]["metric"]
  # summary.json's "final" (run_summary.eval_scalars); runs written before 2026-12-07 named it eval_<metric>
  value = (summary.get("final") or {}).get(metric, (summary.get("final") or {}).get(f"eval_{metric}"))
  if value is None:
    print(f"{c['name']} seed {seed} finished without a final {metric} ({path}); not recorded", flush=True)
    return None
  return {"cell": c["name"], "seed": seed, "metric": metric, "value": value, "steps": summary["steps"],
          "mean_examples_per_step": summary.get("mean_examples_per_step"), "wall_seconds": summary["wall_seconds"],
          "matmul_dtype": summary.get("matmul_dtype"), "machine": cpu_description(),
          "options": json.loads(options.read_text()) if options.exists() else [],
          "derived": _derived(workdir), "recorded_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def read_ledger() -> list[dict]:
  if not LEDGER.exists():
    return []
  try:
    runs = json.loads(LEDGER.read_text())["runs"]
    for r in runs:
      r["cell"], r["seed"], r["value"], r["machine"]  # pylint: disable=pointless-statement
    return runs
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"cannot read the study's ledger {LEDGER}: {type(e).__name__}: {e}") from None


def write_ledger(runs: list[dict]) -> str:
  """Writes the ledger (runs and the table's cells) whole; returns the table's text."""
  rows, text = table(runs, CELLS)
  with atomic_write(LEDGER) as f:
    f.write(json.dumps({"runs": runs, "cells": rows}, indent=2) + "\n")
  return text


def table(runs: list[dict], cells: list[dict]) -> tuple[list[dict], str]:
  """Per cell: mean, sd, steps, wall time of all its recorded seeds, and the CPUs and products they ran with
  (letters explained under the table), with the options of runs that had any."""
  machines = list(dict.fromkeys(r["machine"] for r in runs))
  rows, notes = [], []
  for c in cells:
    done = sorted((r for r in runs if r["cell"] == c["name"]), key=lambda r: r["seed"])
    options = list(dict.fromkeys(" ".join(r.get("options") or []) for r in done))
    if options != [""] and options:
      notes.append(f"Options of {c['name']}'s runs: " + "; ".join(o or "none" for o in options) + ".")
    values = [r["value"] for r in done]
    ran_on = sorted({f"{chr(65 + machines.index(r['machine']))} {r['matmul_dtype']}" for r in done})
    rows.append({**c, "metric": TASKS[c["task"]]["metric"], "values": values, "seeds": len(values),
                 "mean": statistics.mean(values) if values else None,
                 "sd": statistics.stdev(values) if len(values) > 1 else None,
                 "steps": done[0]["steps"] if done else None,
                 "mean_examples_per_step": done[0]["mean_examples_per_step"] if done else None,
                 "wall_seconds": statistics.mean(r["wall_seconds"] for r in done) if done else None,
                 "derived": done[0]["derived"] if done else "", "ran_on": ", ".join(ran_on)})
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = ["| task | batch | epochs | scaling | seeds | dev metric, mean | sd | steps | examples/step | "
           "what the scaling set | wall s/run | CPU, products |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['batch']} | {r['epochs']} | {'recipe' if r['batch'] == 32 else r['scaling']} | "
                 f"{r['seeds']} | {fmt(r['mean'], '.4f')} | {fmt(r['sd'], '.4f')} | {fmt(r['steps'], 'd')} | "
                 f"{fmt(r['mean_examples_per_step'], '.1f')} | {r['derived'] or '-'} | "
                 f"{fmt(r['wall_seconds'], '.0f')} | {r['ran_on'] or '-'} |")
  lines += [""] + [f"CPU {chr(65 + i)}: {m}." for i, m in enumerate(machines)] + notes
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
  parser.add_argument("--seeds", type=int, default=3, help="train seeds 0..N-1 of each cell (the table shows all)")
  parser.add_argument("--root", default="runs/large_batch_study")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--dry", action="store_true",
                      help="train nothing: record the runs finished in ROOT and rewrite the table")
  args, options = parser.parse_known_args()
  try:
    bad = [o for o in options if not o.startswith("--config.")]
    if bad:
      raise UserError(f"unknown arguments: {' '.join(bad)}; only --config.KEY=VALUE options are passed to the runs")
    keys = override_keys(["", *options])
    check_keys(keys)
    if fixed := [k for k in keys if k in CELL_KEYS]:
      raise UserError(f"--config.{fixed[0]} is set by the study for each cell and seed; pick cells with --cells")
    if args.seeds < 1:
      raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    names = [n for n in args.cells.split(",") if n]
    if unknown := set(names) - {c["name"] for c in CELLS}:
      raise UserError(f"unknown cells: {', '.join(sorted(unknown))}; valid: {', '.join(c['name'] for c in CELLS)}")
    runs = read_ledger()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  root = Path(args.root).resolve()
  root.mkdir(parents=True, exist_ok=True)
  cells = [c for c in CELLS if not names or c["name"] in names]
  snli_split(root)
  for c in cells:
    for seed in range(args.seeds):
      if any(r["cell"] == c["name"] and r["seed"] == seed for r in runs):
        continue  # recorded, here or in an earlier session
      if (args.dry or run(root, c, seed, args.python, options)) and (entry := record(root, c, seed)):
        runs.append(entry)
        write_ledger(runs)  # at once: a session may end before the next run does
  text = write_ledger(runs)
  doc = REPO / "docs" / "large_batch.md"
  begin, end = "<!-- study table: written by scripts/large_batch_study.py -->", "<!-- end of study table -->"
  if doc.exists() and begin in doc.read_text() and end in doc.read_text():
    before, rest = doc.read_text().split(begin, 1)
    doc.write_text(before + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
