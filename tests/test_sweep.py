"""Sweeps on a tiny BERT: grid results and ranking, resume without repeats, random draws, dispatch, errors."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bertjax import checkpoint, matmul_peak, run_log, sweep, sweep_results, sweep_spec, trainer
from bertjax.errors import UserError
from conftest import demo_setup
from test_train import demo_config

REPO = Path(__file__).resolve().parents[1]
STEPS = {"train.max_steps": 4, "train.eval_every_steps": 2, "train.log_every_steps": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("sweep"), 96, 40, seed=0)


def base_config(setup, **overrides):
  _, data, model = setup
  return demo_config(data, model, **{**STEPS, **overrides})


def sweep_cli(workdir, setup, sweep_file, *overrides):
  root, data, model = setup
  cmd = [sys.executable, "-m", "bertjax.sweep", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--sweep={sweep_file}", f"--workdir={workdir}", f"--config.model.name_or_path={model}",
         *[f"--config.{k}={v}" for k, v in STEPS.items()], *overrides]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _error_line(result):
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def fast_trials(setup):
  """Trials in this process skip the trainer's matmul-peak measurement (their compiled steps are shared
  through conftest's compilation cache, as the command line's trials share theirs)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(matmul_peak, "run_peak", lambda dtype: matmul_peak.Peak(1e11, "test"))  # restored afterwards
    yield


@pytest.fixture(scope="module")
def grid_run(setup, fast_trials):
  """configs/sweeps/tiny_grid.py (2 learning rates x 2 seeds), in this process with a SIGINT during the
  last trial (it saves and stops, and so does the sweep), then resumed through the command line."""
  workdir = setup[0] / "grid"
  spec = sweep_spec.parse_sweep(sweep_spec.load_sweep_file(str(REPO / "configs/sweeps/tiny_grid.py")))
  save = checkpoint.Checkpoints.save

  def save_then_signal(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if "/003_" in str(self.directory) and step == 2:
      signal.raise_signal(signal.SIGINT)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint.Checkpoints, "save", save_then_signal)
    first_rows, interrupted = sweep.run_sweep(base_config(setup), spec, str(workdir))
  assert interrupted
  done = [workdir / "trials" / r["name"] for r in first_rows if r["status"] == "finished"]
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in done for p in d.rglob("*") if p.is_file()}
  result = sweep_cli(workdir, setup, REPO / "configs/sweeps/tiny_grid.py")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, first_rows, before, result


@pytest.mark.slow
def test_grid_writes_trials_and_ranked_results(grid_run):
  workdir, _, _, result = grid_run
  names = sorted(p.name for p in (workdir / "trials").iterdir())
  assert names == ["000_lr=0.001_seed=0", "001_lr=0.001_seed=1", "002_lr=0.003_seed=0", "003_lr=0.003_seed=1"]
  report = json.loads((workdir / "results.json").read_text())
  rows = report["trials"]
  assert report["metric"] == "best.accuracy" and report["mode"] == "max"
  assert sorted(r["name"] for r in rows) == names and [r["rank"] for r in rows] == [1, 2, 3, 4]
  metrics = [r["metric"] for r in rows]
  ranked = [(-r["metric"], r["name"]) for r in rows]
  assert ranked == sorted(ranked)  # ties keep the trial order
  for row in rows:
    summary = json.loads((workdir / "trials" / row["name"] / "summary.json").read_text())
    assert row["status"] == "finished" and summary["finished"] and row["steps"] == summary["steps"] == 4
    assert row["metric"] == summary["best"]["accuracy"] == row["best_accuracy"]
    assert row["final_eval_loss"] == summary["final"]["eval_loss"]
    assert row["wall_seconds"] == summary["wall_seconds"]
    config = json.loads((workdir / "trials" / row["name"] / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == row["optimizer.learning_rate"]
    assert config["train"]["seed"] == row["train.seed"] and config["train"]["max_steps"] == 4
  with open(workdir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["name"] for r in table] == [r["name"] for r in rows]
  assert [float(r["metric"]) for r in table] == metrics
  plan = json.loads((workdir / "sweep.json").read_text())
  assert [t["name"] for t in plan["trials"]] == names
  assert {p.name for p in (workdir / "plots").iterdir()} == {
      "best.accuracy_vs_optimizer.learning_rate.png", "best.accuracy_vs_train.seed.png"}
  table_lines = result.stdout.splitlines()
  assert table_lines[0].split()[:4] == ["rank", "name", "status", "best.accuracy"]
  assert [l.split()[1] for l in table_lines[1:5]] == [r["name"] for r in rows]


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating(grid_run):
  workdir, first_rows, before, result = grid_run
  assert {r["name"]: r["status"] for r in first_rows} == {
      "000_lr=0.001_seed=0": "finished", "001_lr=0.001_seed=1": "finished", "002_lr=0.003_seed=0": "finished",
      "003_lr=0.003_seed=1": "interrupted"}
  assert next(r for r in first_rows if r["status"] == "interrupted")["steps"] == 2
  assert "3 of 4 trials already done" in result.stderr
  assert result.stderr.count("resumed from") == 1 and "003_lr=0.003_seed=1/checkpoints/2" in result.stderr
  assert len(before) > 30 and {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before
  last = workdir / "trials" / "003_lr=0.003_seed=1"
  steps = [(r["kind"], r["step"]) for r in map(json.loads, (last / "metrics.jsonl").read_text().splitlines())]
  assert len(steps) == len(set(steps)) and ("eval", 4) in steps


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_repeats_nothing(grid_run, setup):
  workdir = grid_run[0]
  files = {p: p.stat().st_mtime_ns for p in (workdir / "trials").rglob("*") if p.is_file()}
  rows = json.loads((workdir / "results.json").read_text())["trials"]
  again, interrupted = sweep.run_sweep(base_config(setup), sweep_spec.parse_sweep(sweep_spec.load_sweep_file(
      str(REPO / "configs/sweeps/tiny_grid.py"))), str(workdir))
  assert not interrupted and again == rows
  assert {p: p.stat().st_mtime_ns for p in (workdir / "trials").rglob("*") if p.is_file()} == files
  with pytest.raises(UserError, match=r"sweep.json: this workdir holds a different sweep \(trial 0 is "):
    sweep.run_sweep(base_config(setup), sweep_spec.parse_sweep({"grid": {"optimizer.learning_rate": [1e-2, 3e-3]}}),
                    str(workdir))


def test_random_draws_are_deterministic_and_in_bounds():
  raw = {"grid": {"train.seed": [0, 1]}, "num_samples": 50, "seed": 7,
         "random": {"optimizer.learning_rate": ("loguniform", 1e-5, 1e-4),
                    "optimizer.weight_decay": ("uniform", 0, 0.1),
                    "train.global_batch_size": ("int", 8, 12), "optimizer.name": ("choice", ["adamw", "lamb"])}}
  a = sweep_spec.sample_random(sweep_spec.parse_sweep(raw).random, 50, 7)
  assert a == sweep_spec.sample_random(sweep_spec.parse_sweep(raw).random, 50, 7)
  assert a != sweep_spec.sample_random(sweep_spec.parse_sweep(raw).random, 50, 8)
  lrs = [s["optimizer.learning_rate"] for s in a]
  assert all(1e-5 <= v <= 1e-4 for v in lrs) and sum(v < 10 ** -4.5 for v in lrs) > 10  # log-spread
  assert all(0 <= s["optimizer.weight_decay"] <= 0.1 for s in a)
  assert {s["train.global_batch_size"] for s in a} == {8, 9, 10, 11, 12}
  assert all(type(s["train.global_batch_size"]) is int for s in a)
  assert {s["optimizer.name"] for s in a} == {"adamw", "lamb"}
  # A key's draws do not depend on the other keys.
  alone = sweep_spec.sample_random({"optimizer.learning_rate": ("loguniform", 1e-5, 1e-4)}, 50, 7)
  assert [s["optimizer.learning_rate"] for s in alone] == lrs
  trials = sweep_spec.make_trials(sweep_spec.parse_sweep(raw))
  assert len(trials) == 100 and trials[0].name.startswith("000_seed=0_lr=")
  assert [t.name for t in trials] == [t.name for t in sweep_spec.make_trials(sweep_spec.parse_sweep(raw))]
  standalone = sweep_spec.make_trials(sweep_spec.parse_sweep({**raw, "grid": {}}))
  assert [t.overrides for t in standalone] == a


def test_ranking_puts_done_trials_first_and_failed_last():
  rows = [{"name": n, "status": st, "metric": m} for n, st, m in [
      ("a", "failed", None), ("b", "finished", 0.5), ("c", "pending", None), ("d", "interrupted", 0.1),
      ("e", "early_stopped", 0.2), ("f", "finished", 0.2)]]
  assert [r["name"] for r in sweep_results.rank_rows(rows, "min")] == ["e", "f", "b", "d", "c", "a"]
  assert [r["name"] for r in sweep_results.rank_rows(rows, "max")] == ["b", "e", "f", "d", "c", "a"]
  assert [r["rank"] for r in sweep_results.rank_rows(rows, "max")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("raw,match", [
    ({"grid": {"optimizer.learnig_rate": [1e-3]}}, r"unknown sweep key 'optimizer.learnig_rate' \(did you mean "
                                                    r"optimizer.learning_rate\?\)"),
    ({"grid": {"train.seed": 0}}, "expected a non-empty list"),
    ({"random": {"optimizer.eps": ("loguniform", 0, 1)}, "num_samples": 2}, "0 < lo <= hi"),
    ({"random": {"optimizer.eps": ("normal", 0, 1)}, "num_samples": 2}, "kind one of"),
    ({"random": {"optimizer.eps": ("uniform", 0, 1)}}, "num_samples must be a positive integer"),
    ({"grid": {"train.seed": [0]}, "metric": "best.eval_pearson"}, "unknown sweep metric"),
    ({"grid": {"train.seed": [0]}, "mode": "maximum"}, "mode must be max or min"),
    ({"grid": {"train.seed": [0]}, "samples": 3}, "unknown sweep field 'samples'"),
])
def test_bad_sweep_specs(raw, match):
  with pytest.raises(UserError, match=match):
    sweep_spec.parse_sweep(raw)


def test_errors_common_to_all_trials_fail_before_any(setup, tmp_path):
  spec = sweep_spec.parse_sweep({"grid": {"train.global_batch_size": [16, 16.5]}})
  with pytest.raises(UserError, match=r"sweep value train.global_batch_size=16.5 does not fit"):
    sweep.run_sweep(base_config(setup), spec, str(tmp_path / "a"))
  spec = sweep_spec.parse_sweep({"grid": {"train.seed": [0, 1]}})
  with pytest.raises(UserError, match="no_such_model does not exist"):
    sweep.run_sweep(base_config(setup, **{"model.name_or_path": str(tmp_path / "no_such_model")}), spec,
                    str(tmp_path / "b"))
  with pytest.raises(UserError, match="train.seed is both swept and set with --config.train.seed"):
    sweep.run_sweep(base_config(setup), spec, str(tmp_path / "c"), fixed_keys=["train.seed"])
  assert not any((tmp_path / d).exists() for d in "abc")


def test_failed_trials_are_recorded_and_common_failures_stop_the_sweep(setup, tmp_path):
  # Failing on its own value: recorded (ranked last, with its message) and the sweep goes on.
  spec = sweep_spec.parse_sweep({"grid": {"train.grad_accum_steps": [3, 5]}})
  rows, interrupted = sweep.run_sweep(base_config(setup), spec, str(tmp_path / "a"))
  assert not interrupted and [r["status"] for r in rows] == ["failed", "failed"]
  assert rows[0]["error"].startswith("train.grad_accum_steps=3 must divide the ")
  with open(tmp_path / "a" / "results.csv") as f:
    assert [r["error"] for r in csv.DictReader(f)] == [r["error"] for r in rows]
  # Failing whatever the swept values (a bad data row): the sweep stops at the first trial.
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\n")
  (data / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\n")
  spec = sweep_spec.parse_sweep({"grid": {"train.seed": [0, 1]}})
  with pytest.raises(UserError, match=r"trial 000_seed=0: .*train.tsv:3: .*stopped the sweep"):
    sweep.run_sweep(demo_config(data, setup[2], **STEPS), spec, str(tmp_path / "b"))
  statuses = [r["status"] for r in json.loads((tmp_path / "b" / "results.json").read_text())["trials"]]
  assert sorted(statuses) == ["failed", "pending"]


def test_unknown_sweep_key_exits_2_in_one_line(setup, tmp_path):
  bad = tmp_path / "bad_sweep.py"
  bad.write_text("def get_sweep():\n  return {'grid': {'optimizer.learnig_rate': [1e-3, 3e-3]}}\n")
  line = _error_line(sweep_cli(tmp_path / "w", setup, bad))
  assert "unknown sweep key 'optimizer.learnig_rate'" in line and "did you mean optimizer.learning_rate" in line
  assert not (tmp_path / "w").exists()


def test_parallel_dispatch_groups_by_key(setup, tmp_path, monkeypatch):
  """--parallel K: trials with equal group_key go to train_group in chunks of <= K (stand-ins for both here)."""
  calls = []

  def train_group(configs, workdirs):
    calls.append([Path(w).name for w in workdirs])
    out = []
    for config, workdir in zip(configs, workdirs):
      acc = config.optimizer.learning_rate * 100
      summary = {"finished": True, "steps": 4, "best": {"step": 4, "eval_loss": 1.0, "accuracy": acc},
                 "final": {"step": 4, "eval_loss": 1.0, "accuracy": acc}, "wall_seconds": 1.0}
      run_log.write_summary(workdir, summary)
      out.append(summary)
    return out

  monkeypatch.setattr("bertjax.trial_group.train_group", train_group)
  monkeypatch.setattr("bertjax.trial_group.group_key", lambda c: c.train.global_batch_size)
  monkeypatch.setattr("bertjax.trainer.train_and_evaluate", lambda c, w: train_group([c], [w])[0])
  spec = sweep_spec.parse_sweep({"grid": {"train.global_batch_size": [8, 16],
                                     "optimizer.learning_rate": [1e-3, 2e-3, 3e-3]}, "metric": "accuracy"})
  rows, _ = sweep.run_sweep(base_config(setup), spec, str(tmp_path / "p"), parallel=2)
  assert calls == [["000_bs=8_lr=0.001", "001_bs=8_lr=0.002"], ["002_bs=8_lr=0.003"],
                   ["003_bs=16_lr=0.001", "004_bs=16_lr=0.002"], ["005_bs=16_lr=0.003"]]
  assert [r["metric"] for r in rows] == pytest.approx([0.3, 0.3, 0.2, 0.2, 0.1, 0.1])
  assert sweep.plan_groups([0, 1, 2, 3, 4], ["a", "b", "a", "a", "b"], 2) == [[0, 2], [1, 4], [3]]


def test_parallel_plan_with_trial_group(setup):
  """The real group_key: trials differing only in learning rate share a group; by default seeds do not."""
  from bertjax import trial_group
  spec = sweep_spec.parse_sweep(sweep_spec.load_sweep_file(str(REPO / "configs/sweeps/tiny_grid.py")))
  configs = sweep_spec.trial_configs(base_config(setup), sweep_spec.make_trials(spec))  # lr (outer) x seed
  assert sweep.plan_groups(range(4), [trial_group.group_key(c) for c in configs], 4) == [[0, 2], [1, 3]]
  assert sweep.plan_groups(range(4), [trial_group.group_key(c) for c in configs], 1) == [[0], [1], [2], [3]]
