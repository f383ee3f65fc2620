"""Hyperparameter sweeps: one ordinary training run per combination of config values, ranked by a metric.

  python -m bertjax.sweep --config configs/NAME.py[:variant] --sweep configs/sweeps/NAME.py --workdir DIR \
      [--parallel K] [--config.KEY=VALUE ...]      # --config overrides apply to every trial

A sweep file defines `get_sweep()` returning a dict (or ConfigDict) with
  grid:        {config key: [values]}               the cartesian product of the lists
  random:      {config key: distribution}            ("loguniform", lo, hi) | ("uniform", lo, hi) |
                                                     ("int", lo, hi) (both ends included) | ("choice", [values])
  num_samples: random draws (crossed with the grid; alone when there is no grid); floats keep 4 digits
  seed:        of the random draws (default 0); each key has its own stream, so adding a key keeps the others
  metric:      [best.|final.]FIELD, FIELD one of eval_loss, accuracy, macro_f1, micro_f1, mcc (classification),
               eval_loss, mse, pearson, spearman (regression): the names of metrics.jsonl's eval lines. `best`
               (the default) is the eval the run's train.best_metric chose, i.e. the checkpoint
               `--checkpoint best` restores; `final` is the last eval. Default: best.<train.best_metric>.
  mode:        max | min (default: min for eval_loss and mse, else max)
Keys are dotted config keys (`optimizer.learning_rate`) or nested dicts ({"optimizer": {"learning_rate": ...}}).

DIR/trials/NAME is each trial's workdir (NAME from its index and values, e.g. `003_lr=3e-05_bs=32`),
DIR/sweep.json the trial list, DIR/results.{csv,json} the ranked rows (rewritten after each trial),
DIR/plots/METRIC_vs_KEY.png the metric against each swept key. Re-running the same command skips finished
trials and resumes an interrupted one from its checkpoint; failed trials are tried again.
Exit code 0 when every trial ran (finished or failed), 1 when interrupted or the workdir cannot be written,
2 on bad input.

Several processes (hosts) run a sweep as they run one training job: the same command on each, with
--coordinator_address/--num_processes/--process_id or from SLURM's environment
(`MODULE=bertjax.sweep bash scripts/launch_local.sh N ...` on one machine). Each trial then trains on all of
them, and process 0 writes the sweep's files. Every process must see the same files (a shared filesystem) and
run the same command (checked): a trial's error is then the same on all of them (bad rows in one process's
data shard are agreed on first), and the sweep goes on as on one process.
"""

import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from bertjax.errors import UserError, WriteFailed, bound_distributed_exit, exit_on_user_error, first_line
from bertjax.files import atomic_write
from bertjax.sweep_results import (DONE, STATUSES, Outcome, format_table, metric_value, outcome_on_disk, plot_results,
                                   status_of, write_results)
from bertjax.sweep_spec import Sweep, Trial, load_sweep_file, make_trials, native, parse_sweep, trial_configs


def log(msg: str) -> None:
  print(f"[sweep] {msg}", file=sys.stderr, flush=True)


# ----- the plan ------------------------------------------------------------------------------

def _json_ready(value: Any) -> Any:
  return json.loads(json.dumps(value, default=native))


def _check_plan(root: Path, planned: list[dict], info: dict) -> None:
  """Writes DIR/sweep.json, or checks that an existing one lists the same trials (`planned`)."""
  path = root / "sweep.json"
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
  with atomic_write(path) as f:
    f.write(json.dumps({**info, "trials": planned}, indent=2) + "\n")


def _preflight(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """What would fail every trial (a bad value, model folder, data files, no eval set) fails before the first one."""
  from bertjax.config_base import check_values
  from bertjax.data import tables
  from bertjax.models import hf_weights
  for c in configs:
    check_values(c)
  for name in dict.fromkeys(c.model.name_or_path for c in configs):
    if not name:
      raise UserError("model.name_or_path is empty: set it in the config or with --config.model.name_or_path")
    hf_weights.read_hf_config(hf_weights.resolve_folder(name))
  for split in ("train", "eval"):
    for path in dict.fromkeys(c.data[split] for c in configs):
      if not path:
        raise UserError(f"data.{split} is empty" + ("; a sweep ranks its trials by their eval metric" if
                                                      split == "eval" else ""))
      if not path.startswith("tfds:") and not tables.local_source(path)[0].exists():
        raise UserError(f"data.{split} file not found: {path}")


# ----- running -------------------------------------------------------------------------------

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
    return Outcome("failed", error=first_line(e), seconds=time.time() - t0)
  return Outcome(status_of(summary), summary, seconds=time.time() - t0)


def _run_group(configs: list, workdirs: list[Path]) -> list[Outcome]:
  """One vmapped program for the group. A summary with an "error" entry marks that trial failed."""
  from bertjax import trial_group
  t0 = time.time()
  try:
    summaries = trial_group.train_group(configs, [str(w) for w in workdirs])
  except UserError as e:
    return [Outcome("failed", error=first_line(e), seconds=time.time() - t0) for _ in configs]
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
  """Runs the trials not yet finished; returns the ranked rows and whether the sweep was interrupted.

  On several processes each trial is one multi-process run. Process 0 alone reads and writes the sweep's
  own files (sweep.json, results, plots) and logs; the others take its decisions (which trials are done,
  whether to stop) so that every process runs the same trials in the same order. They return no rows."""
  import jax
  from bertjax import sharding, trial_group
  if parallel < 1:
    raise UserError(f"--parallel must be at least 1, got {parallel}")
  both = sorted(set(fixed_keys) & (set(sweep.grid) | set(sweep.random)))
  if both:
    raise UserError(f"{both[0]} is both swept and set with --config.{both[0]}; drop one")
  primary = jax.process_index() == 0
  say = log if primary else (lambda msg: None)
  trials = make_trials(sweep)
  dropped = math.prod(len(v) for v in sweep.grid.values()) * max(sweep.num_samples, 1) - len(trials)
  if dropped:
    say(f"{dropped} repeated combinations dropped")
  configs = trial_configs(config, trials)
  _preflight(configs)
  group_key = trial_group.group_key if parallel > 1 else None
  root = Path(workdir)
  planned = _json_ready([{"name": t.name, "overrides": t.overrides} for t in trials])
  plan_error = ""
  if primary:
    try:
      _check_plan(root, planned, {**(info or {}), "metric": sweep.metric, "mode": sweep.mode,
                                 "keys": list(sweep.grid) + list(sweep.random)})
    except UserError as e:
      plan_error = str(e)
  if sharding.from_process_zero(np.array([bool(plan_error)]))[0]:
    raise UserError(plan_error or f"{root / 'sweep.json'}: process 0 refused this sweep (see its output)")
  # Every process must run the same trials of the same config: all compare their fingerprints of both.
  from bertjax.resume import config_snapshot
  plan = json.dumps([config_snapshot(config), planned], sort_keys=True)
  prints = sharding.gather_from_processes(np.array([len(trials), zlib.crc32(plan.encode()) & 0x7FFFFFFF],
                                                   np.int32), "their trial lists").reshape(-1, 2)
  differs = [p for p in range(len(prints)) if (prints[p] != prints[0]).any()]
  if differs:
    raise UserError(f"process {differs[0]}'s config or trial list differs from process 0's; start every process "
                    "with the same command")
  dirs = [root / "trials" / t.name for t in trials]
  outcomes = [outcome_on_disk(d) for d in dirs]
  codes = sharding.from_process_zero(np.array([STATUSES.index(o.status) for o in outcomes]))
  outcomes = [o if o.status == STATUSES[c] else Outcome(STATUSES[c]) for o, c in zip(outcomes, codes)]
  todo = [i for i, o in enumerate(outcomes) if o.status not in DONE]
  if len(todo) < len(trials):
    say(f"{len(trials) - len(todo)} of {len(trials)} trials already done; running the other {len(todo)}")
  groups = (plan_groups(todo, [group_key(configs[i]) for i in todo], parallel) if group_key
            else [[i] for i in todo])
  interrupted, first = False, True
  try:
    for group in groups:
      names = ", ".join(trials[i].name for i in group)
      say(f"trial{'s' if len(group) > 1 else ''} {names} ({len(trials) - len(todo) + 1}/{len(trials)})"
          + (" trained together" if len(group) > 1 else ""))
      if len(group) == 1:
        results = [_run_one(configs[group[0]], dirs[group[0]])]
      else:
        results = _run_group([configs[i] for i in group], [dirs[i] for i in group])
      for i, outcome in zip(group, results):
        outcomes[i] = outcome
        todo.remove(i)
        metric = metric_value(outcome.summary, sweep.metric)
        say(f"{trials[i].name}: {outcome.status}" + (f": {outcome.error}" if outcome.error else "")
            + (f", {sweep.metric} {metric:.4f}" if metric is not None else "") + f" ({outcome.seconds:.1f} s)")
      common = first and all(_is_common_failure(outcomes[i], trials[i], dirs[i]) for i in group)
      stopped = any(outcomes[i].status == "interrupted" for i in group)
      common, stopped = sharding.from_process_zero(np.array([common, stopped]))
      if common:
        raise UserError(f"trial {trials[group[0]].name}: {outcomes[group[0]].error} (stopped the sweep: "
                        "this does not depend on the swept values)")
      first = False
      if primary:
        write_results(root, sweep, trials, outcomes)
      if stopped:
        interrupted = True
        break
  finally:
    rows = write_results(root, sweep, trials, outcomes) if primary else []
    if primary:
      plot_results(root, sweep, rows)
  return rows, interrupted


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
  from bertjax.config_base import check_values, config_file_arg, override_keys
  check_values(f.config)
  sweep = parse_sweep(load_sweep_file(f.sweep), f.config.data.task, f.config.train.best_metric)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from bertjax import cli_setup
  cli_setup.start_jax(f.config.train.deterministic)  # the cache: trials of equal shapes compile once
  info = {"config": config_file_arg(sys.argv), "sweep": f.sweep,
          "fixed": [a for a in sys.argv[1:] if a.startswith("--config.")]}
  try:
    rows, interrupted = run_sweep(f.config, sweep, f.workdir, parallel=f.parallel,
                                  fixed_keys=override_keys(sys.argv), info=info)
  except WriteFailed as e:
    print(f"error: {e}", file=sys.stderr)
    bound_distributed_exit(1)  # the other processes may be waiting for this one
    sys.exit(1)
  except KeyboardInterrupt:
    print("error: sweep interrupted; re-run the same command to resume", file=sys.stderr)
    bound_distributed_exit(1)
    sys.exit(1)
  if rows:  # process 0
    print(format_table(rows, sweep.metric))
    log(f"results in {f.workdir}/results.csv, {f.workdir}/results.json and {f.workdir}/plots")
  if interrupted:
    print("error: sweep interrupted; re-run the same command to resume", file=sys.stderr)
    sys.exit(1)


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags."""
  from absl import flags
  from bertjax import cli_setup
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Training config file (the base of every trial).",
                                  lock_config=True)
  flags.DEFINE_string("sweep", None, "Sweep file with get_sweep(): configs/sweeps/NAME.py[:arg].")
  flags.DEFINE_string("workdir", None, "Sweep directory: trials/, sweep.json, results.csv/json, plots/.")
  flags.DEFINE_integer("parallel", 1, "Train up to this many shape-compatible trials together (vmapped).")
  cli_setup.define_flags()


def run() -> None:
  from bertjax.cli_setup import run_cli
  from bertjax.config_base import exit_on_bad_command_line
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # before jax creates its CPU client
  exit_on_bad_command_line(sys.argv)
  _define_flags()
  run_cli(main)


if __name__ == "__main__":
  run()
