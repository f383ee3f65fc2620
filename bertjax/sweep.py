"""Hyperparameter sweeps: one ordinary training run per combination of config values, ranked by a metric.

  python -m bertjax.sweep --config configs/NAME.py[:variant] --sweep configs/sweeps/NAME.py --workdir DIR \
      [--parallel K] [--config.KEY=VALUE ...]      # --config overrides apply to every trial

A sweep file defines `get_sweep()` returning a dict (or ConfigDict) with
  grid:        {config key: [values]}               the cartesian product of the lists
  random:      {config key: distribution}            ("loguniform", lo, hi) | ("uniform", lo, hi) |
                                                     ("int", lo, hi) (both ends included) | ("choice", [values])
  num_samples: random draws (crossed with the grid; alone when there is no grid); floats keep 4 digits
  seed:        of the random draws (default 0); each key has its own stream, so adding a key keeps the others
  metric:      [best.|final.]FIELD, FIELD one of eval_loss, eval_accuracy, eval_f1 (classification),
               eval_pearson, eval_spearman (regression). `best` (the default) is the eval with the lowest eval
               loss, i.e. the checkpoint `--checkpoint best` restores; `final` is the last eval.
               Default: best.eval_accuracy (classification), best.eval_pearson (regression).
  mode:        max | min (default: min for a loss, else max)
Keys are dotted config keys (`optimizer.learning_rate`) or nested dicts ({"optimizer": {"learning_rate": ...}}).

DIR/trials/NAME is each trial's workdir (NAME from its index and values, e.g. `003_lr=3e-05_bs=32`),
DIR/sweep.json the trial list, DIR/results.{csv,json} the ranked rows (rewritten after each trial),
DIR/plots/METRIC_vs_KEY.png the metric against each swept key. Re-running the same command skips finished
trials and resumes an interrupted one from its checkpoint; failed trials are tried again.
Exit code 0 when every trial ran (finished or failed), 1 when interrupted or the workdir cannot be written,
2 on bad input.
"""

import copy
import csv
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from bertjax.errors import UserError, exit_on_user_error

SWEEP_FIELDS = ("grid", "random", "num_samples", "seed", "metric", "mode")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
TASK_FIELDS = {"classification": ("eval_loss", "eval_accuracy", "eval_f1"),
               "regression": ("eval_loss", "eval_pearson", "eval_spearman")}
ENTRY_FIELDS = ("step", "eval_loss", "eval_accuracy", "eval_f1", "eval_pearson", "eval_spearman")
DONE = ("finished", "early_stopped")
SHORT = {"optimizer.learning_rate": "lr", "train.global_batch_size": "bs", "optimizer.weight_decay": "wd",
         "train.num_epochs": "epochs", "optimizer.name": "opt", "optimizer.schedule": "sched",
         "optimizer.warmup_fraction": "warmup", "optimizer.layerwise_lr_decay": "lld", "optimizer.clip_norm": "clip",
         "train.grad_accum_steps": "accum", "data.max_length": "len", "train.max_steps": "steps"}


def log(msg: str) -> None:
  print(f"[sweep] {msg}", file=sys.stderr, flush=True)


# ----- the sweep file ------------------------------------------------------------------------

@dataclasses.dataclass
class Sweep:
  grid: dict[str, list]
  random: dict[str, tuple]
  num_samples: int
  seed: int
  metric: str  # "best.eval_accuracy" | "final.eval_loss" | ...
  mode: str  # "max" | "min"


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict  # config key -> value


def load_sweep_file(spec: str) -> Any:
  """Runs `get_sweep()` of `FILE.py[:arg]`; any failure is a one-line UserError."""
  from bertjax.config_base import call_python_file
  return call_python_file(spec, "get_sweep", "sweep file")


def _first_line(e: BaseException) -> str:
  return (str(e).splitlines() or [""])[0][:300]


def _flatten(tree: Any, what: str, prefix: str = "") -> dict[str, Any]:
  """{'optimizer': {'learning_rate': v}} and {'optimizer.learning_rate': v} both -> {'optimizer.learning_rate': v}."""
  if not hasattr(tree, "items"):
    raise UserError(f"sweep {what} must be a dict of config key -> {'values' if what == 'grid' else 'distribution'}")
  out = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      out.update(_flatten(value, what, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def parse_sweep(raw: Any, task: str = "classification") -> Sweep:
  """Validates a `get_sweep()` result: keys, values, distributions and metric (UserError on any mistake)."""
  from bertjax.config_base import check_keys
  if isinstance(raw, ml_collections.ConfigDict):
    raw = raw.to_dict()
  if not isinstance(raw, dict):
    raise UserError(f"get_sweep() returned {type(raw).__name__}, not a dict or ConfigDict")
  for field in raw:
    if field not in SWEEP_FIELDS:
      close = difflib.get_close_matches(field, SWEEP_FIELDS, n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise UserError(f"unknown sweep field {field!r}{hint}; valid: {', '.join(SWEEP_FIELDS)}")
  grid = _flatten(raw.get("grid") or {}, "grid")
  random = _flatten(raw.get("random") or {}, "random")
  check_keys(list(grid) + list(random), what="sweep key")
  for key, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise UserError(f"sweep grid {key}: expected a non-empty list of values, got {values!r}")
  both = sorted(set(grid) & set(random))
  if both:
    raise UserError(f"sweep key {both[0]} is in both grid and random")
  for key, dist in random.items():
    _check_distribution(key, dist)
  if not grid and not random:
    raise UserError("the sweep has no grid and no random keys: nothing to sweep")
  num_samples = raw.get("num_samples", 0)
  if random and (not isinstance(num_samples, int) or num_samples < 1):
    raise UserError(f"sweep num_samples must be a positive integer when random is given, got {num_samples!r}")
  seed = raw.get("seed", 0)
  if not isinstance(seed, int):
    raise UserError(f"sweep seed must be an integer, got {seed!r}")
  metric = _parse_metric(raw.get("metric") or ("eval_pearson" if task == "regression" else "eval_accuracy"), task)
  mode = raw.get("mode") or ("min" if metric.endswith("loss") else "max")
  if mode not in ("max", "min"):
    raise UserError(f"sweep mode must be max or min, got {mode!r}")
  return Sweep(grid=dict(grid), random=dict(random), num_samples=num_samples if random else 0, seed=seed,
               metric=metric, mode=mode)


def _check_distribution(key: str, dist: Any) -> None:
  kind = dist[0] if isinstance(dist, (list, tuple)) and dist else None
  if kind not in DISTRIBUTIONS:
    raise UserError(f"sweep random {key}: expected (kind, ...) with kind one of {', '.join(DISTRIBUTIONS)}, "
                    f"got {dist!r}")
  if kind == "choice":
    if len(dist) != 2 or not isinstance(dist[1], (list, tuple)) or not dist[1]:
      raise UserError(f"sweep random {key}: expected ('choice', [values]), got {dist!r}")
    return
  numbers = len(dist) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in dist[1:])
  if not numbers or dist[1] > dist[2] or (kind == "int" and not all(isinstance(x, int) for x in dist[1:])) or (
      kind == "loguniform" and dist[1] <= 0):
    bounds = {"loguniform": "0 < lo <= hi", "uniform": "lo <= hi", "int": "integers lo <= hi"}[kind]
    raise UserError(f"sweep random {key}: expected ({kind!r}, lo, hi) with {bounds}, got {dist!r}")


def _parse_metric(metric: str, task: str) -> str:
  where, _, field = metric.rpartition(".")
  where = where or "best"
  valid = TASK_FIELDS.get(task, TASK_FIELDS["classification"])
  if where not in ("best", "final") or field not in valid:
    options = [f"{w}.{f}" for w in ("best", "final") for f in valid]
    close = difflib.get_close_matches(metric, options + list(valid), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown sweep metric {metric!r} for {task}{hint}; valid: {', '.join(options)}")
  return f"{where}.{field}"


# ----- trials --------------------------------------------------------------------------------

def _native(value: Any) -> Any:
  return value.item() if isinstance(value, np.generic) else value


def sample_random(random: dict[str, tuple], num_samples: int, seed: int) -> list[dict]:
  """`num_samples` draws of each key; a key's draws depend only on (seed, key), so they are reproducible."""
  columns = {}
  for key, dist in random.items():
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    kind = dist[0]
    if kind == "choice":
      columns[key] = [_native(dist[1][i]) for i in rng.integers(0, len(dist[1]), num_samples)]
    elif kind == "int":
      columns[key] = [int(v) for v in rng.integers(dist[1], dist[2] + 1, num_samples)]
    else:
      lo, hi = float(dist[1]), float(dist[2])
      draws = (np.exp(rng.uniform(np.log(lo), np.log(hi), num_samples)) if kind == "loguniform"
               else rng.uniform(lo, hi, num_samples))
      columns[key] = [min(max(float(f"{v:.4g}"), lo), hi) for v in draws]
  return [{key: columns[key][i] for key in random} for i in range(num_samples)]


def make_trials(sweep: Sweep) -> list[Trial]:
  """The grid's product (first key outermost) crossed with the random draws; exact repeats dropped."""
  points = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
  samples = sample_random(sweep.random, sweep.num_samples, sweep.seed) if sweep.random else [{}]
  combos, seen = [], set()
  for point in points:
    for sample in samples:
      overrides = {key: _native(v) for key, v in {**point, **sample}.items()}
      ident = json.dumps(overrides, sort_keys=True, default=str)
      if ident not in seen:
        seen.add(ident)
        combos.append(overrides)
  if len(combos) < len(points) * len(samples):
    log(f"{len(points) * len(samples) - len(combos)} repeated combinations dropped")
  keys = list(sweep.grid) + list(sweep.random)
  short = _short_names(keys)
  width = max(3, len(str(len(combos) - 1)))
  return [Trial(f"{i:0{width}d}_" + "_".join(f"{short[k]}={_format_value(o[k])}" for k in keys), o)
          for i, o in enumerate(combos)]


def _short_names(keys: list[str]) -> dict[str, str]:
  """lr, bs, wd, ... or the key's last part; the full key where two would read the same."""
  short = {k: SHORT.get(k, k.rsplit(".", 1)[-1]) for k in keys}
  clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
  return {k: (k if s in clashes else s) for k, s in short.items()}


def _format_value(value: Any) -> str:
  if isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, float):
    text = f"{value:.4g}"
  elif isinstance(value, (list, tuple)):
    text = "+".join(_format_value(v) for v in value)
  else:
    text = str(value)
  return re.sub(r"[^A-Za-z0-9.+-]+", "-", text)[:40]


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *groups, name = key.split(".")
  node = config
  for group in groups:
    node = node[group]
  node[name] = tuple(value) if isinstance(node[name], tuple) and isinstance(value, list) else value


def trial_configs(config: ml_collections.ConfigDict, trials: Sequence[Trial]) -> list[ml_collections.ConfigDict]:
  """A copy of `config` per trial with its values set; a value of the wrong type is a UserError."""
  out = []
  for trial in trials:
    c = copy.deepcopy(config)
    for key, value in trial.overrides.items():
      try:
        _set(c, key, value)
      except (TypeError, ValueError) as e:
        raise UserError(f"sweep value {key}={value!r} does not fit the config: {_first_line(e)}") from None
    out.append(c)
  return out


def _json_ready(value: Any) -> Any:
  return json.loads(json.dumps(value, default=_native))


def _check_plan(root: Path, trials: Sequence[Trial], info: dict) -> None:
  """Writes DIR/sweep.json, or checks that an existing one lists the same trials."""
  path = root / "sweep.json"
  planned = _json_ready([{"name": t.name, "overrides": t.overrides} for t in trials])
  if path.exists():
    try:
      saved = json.loads(path.read_text()).get("trials")
    except (json.JSONDecodeError, AttributeError):
      saved = None
    if not isinstance(saved, list):
      raise UserError(f"{path}: not a bertjax sweep.json; use a new --workdir")
    if saved != planned:
      diff = next((f"trial {i} is {a['name']} there, {b['name']} now" for i, (a, b) in enumerate(zip(saved, planned))
                   if a != b), f"{len(saved)} trials there, {len(planned)} now")
      raise UserError(f"{path}: this workdir holds a different sweep ({diff}); use a new --workdir or the same "
                      "sweep file, variant and seed")
    return
  root.mkdir(parents=True, exist_ok=True)
  _write_atomic(path, json.dumps({**info, "trials": planned}, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def _preflight(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """What would fail every trial (model folder, data files, no eval set) fails before the first one."""
  from bertjax.models import hf_weights
  for name in dict.fromkeys(c.model.name_or_path for c in configs):
    if not name:
      raise UserError("model.name_or_path is empty: set it in the config or with --config.model.name_or_path")
    hf_weights.read_hf_config(hf_weights.resolve_folder(name))
  for split in ("train", "eval"):
    for path in dict.fromkeys(c.data[split] for c in configs):
      if not path:
        raise UserError(f"data.{split} is empty" + ("; a sweep ranks its trials by their eval metric" if
                                                      split == "eval" else ""))
      if not path.startswith("tfds:") and not os.path.exists(path):
        raise UserError(f"data.{split} file not found: {path}")


# ----- running -------------------------------------------------------------------------------

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


def _trial_group_module():
  import importlib
  try:
    return importlib.import_module("bertjax.trial_group")
  except ModuleNotFoundError as e:
    if e.name != "bertjax.trial_group":
      raise
    raise UserError("--parallel > 1 needs bertjax/trial_group.py, which this version does not have yet; "
                    "use --parallel 1") from None


def plan_groups(indices: Sequence[int], keys: Sequence[Any], size: int) -> list[list[int]]:
  """Trials with equal keys in chunks of at most `size`, ordered by their first trial."""
  buckets: dict[Any, list[int]] = {}
  for i, key in zip(indices, keys):
    buckets.setdefault(key, []).append(i)
  groups = [b[j:j + size] for b in buckets.values() for j in range(0, len(b), size)]
  return sorted(groups, key=lambda g: g[0])


def _run_one(config: ml_collections.ConfigDict, workdir: Path) -> Outcome:
  from bertjax import trainer
  t0 = time.time()
  try:
    summary = trainer.train_and_evaluate(config, str(workdir))
  except UserError as e:
    return Outcome("failed", error=_first_line(e), seconds=time.time() - t0)
  return Outcome(status_of(summary), summary, seconds=time.time() - t0)


def _run_group(configs: list, workdirs: list[Path]) -> list[Outcome]:
  """One vmapped program for the group. A summary with an "error" entry marks that trial failed."""
  t0 = time.time()
  try:
    summaries = _trial_group_module().train_group(configs, [str(w) for w in workdirs])
  except UserError as e:
    return [Outcome("failed", error=_first_line(e), seconds=time.time() - t0) for _ in configs]
  seconds = time.time() - t0
  return [Outcome("failed", error=str(s["error"]), seconds=seconds) if s.get("error") else
          Outcome(status_of(s), s, seconds=seconds) for s in summaries]


def _is_common_failure(outcome: Outcome, trial: Trial, workdir: Path) -> bool:
  """A failure before the trial wrote anything whose message names none of its swept keys or values."""
  if outcome.status != "failed" or (workdir / "config.json").exists():
    return False
  words = list(trial.overrides) + [v for v in trial.overrides.values() if isinstance(v, str) and len(v) > 1]
  return not any(w in outcome.error for w in words)


def run_sweep(config: ml_collections.ConfigDict, sweep: Sweep, workdir: str, *, parallel: int = 1,
              fixed_keys: Sequence[str] = (), info: dict | None = None) -> tuple[list[dict], bool]:
  """Runs the trials not yet finished; returns the ranked rows and whether the sweep was interrupted."""
  if parallel < 1:
    raise UserError(f"--parallel must be at least 1, got {parallel}")
  both = sorted(set(fixed_keys) & (set(sweep.grid) | set(sweep.random)))
  if both:
    raise UserError(f"{both[0]} is both swept and set with --config.{both[0]}; drop one")
  trials = make_trials(sweep)
  configs = trial_configs(config, trials)
  _preflight(configs)
  group_key = _trial_group_module().group_key if parallel > 1 else None
  root = Path(workdir)
  _check_plan(root, trials, {**(info or {}), "metric": sweep.metric, "mode": sweep.mode,
                             "keys": list(sweep.grid) + list(sweep.random)})
  dirs = [root / "trials" / t.name for t in trials]
  outcomes = [outcome_on_disk(d) for d in dirs]
  todo = [i for i, o in enumerate(outcomes) if o.status not in DONE]
  if len(todo) < len(trials):
    log(f"{len(trials) - len(todo)} of {len(trials)} trials already done; running the other {len(todo)}")
  groups = (plan_groups(todo, [group_key(configs[i]) for i in todo], parallel) if group_key
            else [[i] for i in todo])
  interrupted, first = False, True
  try:
    for group in groups:
      names = ", ".join(trials[i].name for i in group)
      log(f"trial{'s' if len(group) > 1 else ''} {names} ({len(trials) - len(todo) + 1}/{len(trials)})"
          + (" trained together" if len(group) > 1 else ""))
      if len(group) == 1:
        results = [_run_one(configs[group[0]], dirs[group[0]])]
      else:
        results = _run_group([configs[i] for i in group], [dirs[i] for i in group])
      for i, outcome in zip(group, results):
        outcomes[i] = outcome
        todo.remove(i)
        metric = _metric(outcome.summary, sweep.metric)
        log(f"{trials[i].name}: {outcome.status}" + (f": {outcome.error}" if outcome.error else "")
            + (f", {sweep.metric} {metric:.4f}" if metric is not None else "") + f" ({outcome.seconds:.1f} s)")
      if first and all(_is_common_failure(outcomes[i], trials[i], dirs[i]) for i in group):
        raise UserError(f"trial {trials[group[0]].name}: {outcomes[group[0]].error} (stopped the sweep: "
                        "this does not depend on the swept values)")
      first = False
      write_results(root, sweep, trials, outcomes)
      if any(outcomes[i].status == "interrupted" for i in group):
        interrupted = True
        break
  finally:
    rows = write_results(root, sweep, trials, outcomes)
    plot_results(root, sweep, rows)
  return rows, interrupted


# ----- results -------------------------------------------------------------------------------

def _metric(summary: dict | None, metric: str) -> float | None:
  where, field = metric.split(".", 1)
  value = ((summary or {}).get(where) or {}).get(field)
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _row(trial: Trial, outcome: Outcome, metric: str) -> dict:
  s = outcome.summary or {}
  row = {"rank": 0, "name": trial.name, "status": outcome.status, **trial.overrides, "metric": _metric(s, metric)}
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
  _write_atomic(root / "results.json", json.dumps(
      {"metric": sweep.metric, "mode": sweep.mode, "trials": rows}, indent=2, default=_native) + "\n")
  tmp = root / f"results.csv.tmp.{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
  os.replace(tmp, root / "results.csv")
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
    labels = list(dict.fromkeys(_format_value(v) for v in values))
    xs = [float(labels.index(_format_value(v))) for v in values]
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


# ----- command line --------------------------------------------------------------------------

@exit_on_user_error
def main(argv):
  from absl import flags, logging
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if f.config is None:
    raise UserError("--config is required: --config configs/NAME.py[:variant]")
  if not f.sweep:
    raise UserError("--sweep is required: --sweep configs/sweeps/NAME.py")
  if not f.workdir:
    raise UserError("--workdir is required")
  from bertjax.config_base import config_file_arg, override_keys
  sweep = parse_sweep(load_sweep_file(f.sweep), f.config.data.task)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax
  if f.compilation_cache:  # trials of equal shapes compile once
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compilation_cache))
  from bertjax import trainer
  info = {"config": config_file_arg(sys.argv), "sweep": f.sweep,
          "fixed": [a for a in sys.argv[1:] if a.startswith("--config.")]}
  try:
    rows, interrupted = run_sweep(f.config, sweep, f.workdir, parallel=f.parallel,
                                  fixed_keys=override_keys(sys.argv), info=info)
  except trainer.WriteFailed as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("error: sweep interrupted; re-run the same command to resume", file=sys.stderr)
    sys.exit(1)
  print(format_table(rows, sweep.metric))
  log(f"results in {f.workdir}/results.csv, {f.workdir}/results.json and {f.workdir}/plots")
  if interrupted:
    print("error: sweep interrupted; re-run the same command to resume", file=sys.stderr)
    sys.exit(1)


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Training config file (the base of every trial).",
                                  lock_config=True)
  flags.DEFINE_string("sweep", None, "Sweep file with get_sweep(): configs/sweeps/NAME.py[:arg].")
  flags.DEFINE_string("workdir", None, "Sweep directory: trials/, sweep.json, results.csv/json, plots/.")
  flags.DEFINE_integer("parallel", 1, "Train up to this many shape-compatible trials together (vmapped).")
  flags.DEFINE_string("compilation_cache", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bertjax",
                                                        "xla"),
                      "Persistent XLA compilation cache folder, shared by runs ('' = off).")


def run() -> None:
  from absl import app
  from bertjax.config_base import exit_on_bad_command_line
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # before jax creates its CPU client
  exit_on_bad_command_line(sys.argv)
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
