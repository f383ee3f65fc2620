"""A sweep file (`get_sweep()`): its fields checked, its random draws and the trials it makes.

The format is described in bertjax/sweep.py.
"""

import copy
import dataclasses
import difflib
import itertools
import json
import re
import zlib
from typing import Any, Sequence

import ml_collections
import numpy as np

from bertjax.config_base import call_python_file, check_keys, flatten
from bertjax.errors import UserError, first_line

SWEEP_FIELDS = ("grid", "random", "num_samples", "seed", "metric", "mode")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# The fields of summary.json's best and final entries a sweep can rank by (metrics.jsonl's eval names).
TASK_FIELDS = {"classification": ("eval_loss", "accuracy", "macro_f1", "micro_f1", "mcc"),
               "regression": ("eval_loss", "mse", "pearson", "spearman")}
SHORT = {"optimizer.learning_rate": "lr", "train.global_batch_size": "bs", "optimizer.weight_decay": "wd",
         "train.num_epochs": "epochs", "optimizer.name": "opt", "optimizer.schedule": "sched",
         "optimizer.warmup_fraction": "warmup", "optimizer.layerwise_lr_decay": "lld", "optimizer.clip_norm": "clip",
         "train.grad_accum_steps": "accum", "data.max_length": "len", "train.max_steps": "steps"}


@dataclasses.dataclass
class Sweep:
  grid: dict[str, list]
  random: dict[str, tuple]
  num_samples: int
  seed: int
  metric: str  # "best.accuracy" | "final.eval_loss" | ...
  mode: str  # "max" | "min"


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict  # config key -> value


def load_sweep_file(spec: str) -> Any:
  """Runs `get_sweep()` of `FILE.py[:arg]`; any failure is a one-line UserError."""
  return call_python_file(spec, "get_sweep", "sweep file")


def _flatten(tree: Any, what: str) -> dict[str, Any]:
  """{'optimizer': {'learning_rate': v}} and {'optimizer.learning_rate': v} both -> {'optimizer.learning_rate': v}."""
  if not hasattr(tree, "items"):
    raise UserError(f"sweep {what} must be a dict of config key -> {'values' if what == 'grid' else 'distribution'}")
  return flatten(tree)


def parse_sweep(raw: Any, task: str = "classification", best_metric: str = "eval_loss") -> Sweep:
  """Validates a `get_sweep()` result: keys, values, distributions and metric (UserError on any mistake). The
  default metric is `best.<best_metric>` (the base config's train.best_metric), which cannot be swept."""
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
  if "train.best_metric" in grid or "train.best_metric" in random:
    raise UserError("train.best_metric cannot be swept: trials are compared by one metric (set it with "
                    "--config.train.best_metric, or the sweep's metric)")
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
  metric = _parse_metric(raw.get("metric") or best_metric, task)
  mode = raw.get("mode") or ("min" if metric.endswith(("loss", "mse")) else "max")
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

def native(value: Any) -> Any:
  return value.item() if isinstance(value, np.generic) else value


def sample_random(random: dict[str, tuple], num_samples: int, seed: int) -> list[dict]:
  """`num_samples` draws of each key; a key's draws depend only on (seed, key), so they are reproducible."""
  columns = {}
  for key, dist in random.items():
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    kind = dist[0]
    if kind == "choice":
      columns[key] = [native(dist[1][i]) for i in rng.integers(0, len(dist[1]), num_samples)]
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
      overrides = {key: native(v) for key, v in {**point, **sample}.items()}
      ident = json.dumps(overrides, sort_keys=True, default=str)
      if ident not in seen:
        seen.add(ident)
        combos.append(overrides)
  keys = list(sweep.grid) + list(sweep.random)
  short = _short_names(keys)
  width = max(3, len(str(len(combos) - 1)))
  return [Trial(f"{i:0{width}d}_" + "_".join(f"{short[k]}={format_value(o[k])}" for k in keys), o)
          for i, o in enumerate(combos)]


def _short_names(keys: list[str]) -> dict[str, str]:
  """lr, bs, wd, ... or the key's last part; the full key where two would read the same."""
  short = {k: SHORT.get(k, k.rsplit(".", 1)[-1]) for k in keys}
  clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
  return {k: (k if s in clashes else s) for k, s in short.items()}


def format_value(value: Any) -> str:
  if isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, float):
    text = f"{value:.4g}"
  elif isinstance(value, (list, tuple)):
    text = "+".join(format_value(v) for v in value)
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
        raise UserError(f"sweep value {key}={value!r} does not fit the config: {first_line(e)}") from None
    out.append(c)
  return out
