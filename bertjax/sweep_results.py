"""A sweep's trial outcomes and its results: ranked rows, results.json/.csv, a table and plots."""

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from bertjax.files import atomic_write
from bertjax.sweep_spec import Sweep, Trial, format_value, native

ENTRY_FIELDS = ("step", "eval_loss", "accuracy", "macro_f1", "micro_f1", "mcc", "mse", "pearson", "spearman")
DONE = ("finished", "early_stopped")
STATUSES = ("pending", "interrupted", "finished", "early_stopped", "failed")


@dataclasses.dataclass
class Outcome:
  status: str  # pending | interrupted | finished | early_stopped | failed
  summary: dict | None = None
  error: str = ""
  seconds: float = 0.0


def status_of(summary: dict) -> str:
  if summary.get("finished"):
    return "finished"
  if str(summary.get("stopped_by") or "").startswith("early stopping"):
    return "early_stopped"
  return "interrupted"


def outcome_on_disk(workdir: Path) -> Outcome:
  path = workdir / "summary.json"
  if path.exists():
    try:
      summary = json.loads(path.read_text())
      return Outcome(status_of(summary), summary)
    except json.JSONDecodeError:
      pass
  return Outcome("interrupted" if (workdir / "config.json").exists() else "pending")


def metric_value(summary: dict | None, metric: str) -> float | None:
  where, field = metric.split(".", 1)
  value = ((summary or {}).get(where) or {}).get(field)
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _row(trial: Trial, outcome: Outcome, metric: str) -> dict:
  s = outcome.summary or {}
  row = {"rank": 0, "name": trial.name, "status": outcome.status, **trial.overrides, "metric": metric_value(s, metric)}
  for where in ("best", "final"):
    for field in ENTRY_FIELDS:
      if field in (s.get(where) or {}):
        row[f"{where}_{field}"] = s[where][field]
  row.update(steps=s.get("steps"), train_examples_per_sec=s.get("train_examples_per_sec"),
             wall_seconds=s.get("wall_seconds", outcome.seconds or None), error=outcome.error)
  return row


def rank_rows(rows: list[dict], mode: str) -> list[dict]:
  """Done trials by metric, then others with a metric, then those without one; failed last."""
  sign = -1 if mode == "max" else 1

  def order(row):
    if row["status"] == "failed":
      return (3, 0.0)
    if row["metric"] is None:
      return (2, 0.0)
    return (0 if row["status"] in DONE else 1, sign * row["metric"])

  ranked = sorted(rows, key=order)  # stable: ties keep trial order
  for rank, row in enumerate(ranked, 1):
    row["rank"] = rank
  return ranked


def write_results(root: Path, sweep: Sweep, trials: Sequence[Trial], outcomes: Sequence[Outcome]) -> list[dict]:
  """DIR/results.json and DIR/results.csv, one ranked row per trial."""
  rows = rank_rows([_row(t, o, sweep.metric) for t, o in zip(trials, outcomes)], sweep.mode)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  tail = ["steps", "train_examples_per_sec", "wall_seconds", "error"]
  columns = [c for c in columns if c not in tail] + tail
  root.mkdir(parents=True, exist_ok=True)
  with atomic_write(root / "results.json") as f:
    f.write(json.dumps({"metric": sweep.metric, "mode": sweep.mode, "trials": rows}, indent=2, default=native) + "\n")
  with atomic_write(root / "results.csv") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
  return rows


def format_table(rows: list[dict], metric: str) -> str:
  """The ranked rows as an aligned text table."""
  head = ("rank", "name", "status", metric, "steps", "examples/s", "wall")
  body = [(str(r["rank"]), r["name"], r["status"], "" if r["metric"] is None else f"{r['metric']:.4f}",
           "" if r["steps"] is None else str(r["steps"]),
           "" if r["train_examples_per_sec"] is None else f"{r['train_examples_per_sec']:.1f}",
           "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.1f}s") for r in rows]
  widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
  lines += [f"{r['name']} failed: {r['error']}" for r in rows if r["status"] == "failed"]
  return "\n".join(lines)


def plot_results(root: Path, sweep: Sweep, rows: list[dict]) -> list[Path]:
  """DIR/plots/METRIC_vs_KEY.png for each swept key with two or more values (log x when they span >10x)."""
  scored = [r for r in rows if r["metric"] is not None]
  out = []
  for key in list(sweep.grid) + list(sweep.random):
    values = [r[key] for r in scored]
    if len({json.dumps(v, default=str) for v in values}) < 2:
      continue
    out.append(_plot_key(root / "plots" / f"{sweep.metric}_vs_{key}.png", key, values,
                         [r["metric"] for r in scored], sweep))
  return out


def _plot_key(path: Path, key: str, values: list, metrics: list[float], sweep: Sweep) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  if numeric:
    xs = [float(v) for v in values]
    ticks = None
  else:
    labels = list(dict.fromkeys(format_value(v) for v in values))
    xs = [float(labels.index(format_value(v))) for v in values]
    ticks = labels
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  ax.scatter(xs, metrics, alpha=0.6, label="trials")
  means = {x: float(np.mean([m for xx, m in zip(xs, metrics) if xx == x])) for x in sorted(set(xs))}
  ax.plot(list(means), list(means.values()), "-", color="C1", label="mean")
  if numeric and min(xs) > 0 and max(xs) / min(xs) > 10:
    ax.set_xscale("log")
  if ticks is not None:
    ax.set_xticks(range(len(ticks)), ticks)
  ax.set_xlabel(key)
  ax.set_ylabel(f"{sweep.metric} ({sweep.mode})")
  ax.set_title(f"{sweep.metric} vs {key}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
