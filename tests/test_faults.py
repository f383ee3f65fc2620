"""Runs that are stopped, get NaNs or cannot write: what the trainer does in each case."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bertjax import trainer
from bertjax.models.heads import start_at_mean
from bertjax.workdir import load_run
from conftest import SHARED_DATA, demo_setup
from test_train import REPO, demo_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("faults"), 512, 100, seed=1)


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resumes(setup):
  root, data, model = setup
  workdir = root / "term"
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--workdir={workdir}", f"--config.model.name_or_path={model}", "--config.train.log_every_steps=1"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["stopped_by"] == "signal SIGTERM" and not summary["finished"]
  stopped_at = summary["steps"]
  assert 10 <= stopped_at < summary["total_steps"]
  assert load_run(workdir, "latest").step == stopped_at


@pytest.mark.slow
def test_skip_nonfinite_steps_counts_and_continues(setup, monkeypatch):
  root, data, model = setup
  # Inject a NaN into one training label, so the loss of exactly the steps holding it is NaN.
  from bertjax.data import pipeline
  real = pipeline.sources.encode_labels

  def poisoned(examples, names, task):
    labels = real(examples, names, task)
    if examples.source.endswith("train.tsv"):
      labels = labels.copy()
      labels[7] = np.nan
    return labels

  monkeypatch.setattr(pipeline.sources, "encode_labels", poisoned)
  config = demo_config(data, model, **{"data.task": "regression", "train.max_steps": 40,
                                       "train.skip_nonfinite_steps": True, "train.log_every_steps": 1})
  run = trainer.Trainer(config, str(root / "skip"))
  batcher = run.data.train.batcher
  steps_with_7 = [g for g, step in enumerate(s for e in range(3) for s in batcher.plan(e)) if 7 in step]
  expected = sum(1 for g in steps_with_7 if g < 40)
  assert expected >= 1
  summary = run.run()
  assert summary["skipped_steps"] == expected and summary["finished"]
  run = load_run(root / "skip", "latest")
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(run.params))
  assert np.isfinite(summary["final"]["eval_loss"])


@pytest.mark.slow
def test_checkpoint_write_failure_is_reported_and_previous_kept(setup):
  root, data, model = setup
  workdir = root / "full"
  # First a good checkpoint, then a save that the OS refuses (as on a full disk).
  trainer.train_and_evaluate(demo_config(data, model, **{"train.max_steps": 4}), str(workdir))
  script = (
      "import resource, sys; sys.path.insert(0, 'tests');"
      "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16));"
      "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
      "from bertjax import train; sys.argv = sys.argv[:1] + sys.argv[2:]; train.run()")
  cmd = [sys.executable, "-c", script, "x", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--workdir={workdir}", f"--config.model.name_or_path={model}", "--config.train.max_steps=8",
         "--config.train.allow_changed_config=True"]  # a longer run: another schedule
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  # orbax's writer threads log their failures in a line each (their tracebacks and the "Event loop is closed"
  # ones of tensorstore's callbacks are dropped: 975 lines before that on a tiny model), then ours ends it.
  errors = re.findall(r"error: writing [^\n]*", result.stderr)
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
  assert "step 8 failed" in errors[0] and "previous checkpoint (step 4) is intact" in errors[0]
  assert result.stderr.splitlines()[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert load_run(workdir, "latest").step == 4


def test_early_stopping(setup):
  root, data, model = setup
  # A learning rate of ~0 keeps the eval loss constant: no improvement after the first eval.
  config = demo_config(data, model, **{"optimizer.learning_rate": 1e-30, "train.eval_every_steps": 4,
                                       "train.early_stopping_patience": 2, "train.max_steps": 40})
  summary = trainer.train_and_evaluate(config, str(root / "early"))
  assert summary["steps"] == 12 and summary["stopped_by"].startswith("early stopping")
  assert summary["best"]["step"] == 4


def test_regression_on_stsb_pairs(setup, tmp_path, capsys):
  _, _, model = setup
  rows = (SHARED_DATA / "glue_stsb" / "train.tsv").read_text().splitlines()
  (tmp_path / "train.tsv").write_text("\n".join(rows[:257]) + "\n")
  (tmp_path / "dev.tsv").write_text("\n".join(rows[:1] + rows[300:365]) + "\n")
  config = demo_config(tmp_path, model, **{"data.text_fields": ("sentence1", "sentence2"),
                                           "data.label_field": "score", "data.task": "regression",
                                           "data.max_length": 64, "train.max_steps": 48,
                                           "train.eval_every_steps": 16})
  summary = trainer.train_and_evaluate(config, str(tmp_path / "w"))
  evals = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in l]
  assert summary["num_eval_examples"] == 65 and {"mse", "pearson", "spearman"} <= set(evals[-1])
  scores = np.array([float(r.split("\t")[-1]) for r in rows[300:365]])
  # Scores are 0-5; a fresh head starts at the training scores' mean (models.heads.start_at_mean), not at 0.
  train_scores = [float(r.split("\t")[-1]) for r in rows[1:257]]
  start = next(l for l in capsys.readouterr().err.splitlines() if "regression head" in l)
  assert start.endswith(f"starts at the training labels' mean, {np.mean(train_scores):.4g}"), start
  assert evals[-1]["mse"] < 0.75 * np.mean(scores ** 2)
  assert json.loads((tmp_path / "w" / "labels.json").read_text())["label_names"] is None


def test_a_fresh_regression_head_starts_at_the_labels_mean():
  params = {"head": {"out": {"kernel": np.ones((4, 1), np.float32), "bias": np.zeros(1, np.float32)}}}
  note = start_at_mean(params, np.array([0.5, 2.0, np.nan, 4.0]))  # what is not finite does not count
  assert params["head"]["out"]["bias"].dtype == np.float32 and note.endswith("mean, 2.167")
  np.testing.assert_allclose(params["head"]["out"]["bias"], [6.5 / 3], rtol=1e-7)
  np.testing.assert_array_equal(params["head"]["out"]["kernel"], np.ones((4, 1)))


@pytest.mark.slow
def test_bfloat16_training_runs_and_learns(setup):
  root, data, model = setup
  config = demo_config(data, model, **{"model.dtype": "bfloat16"})
  summary = trainer.train_and_evaluate(config, str(root / "bf16"))
  assert summary["best"]["accuracy"] >= 0.6
  run = load_run(root / "bf16", "latest")
  assert str(__import__("jax").tree.leaves(run.params)[0].dtype) == "float32"  # f32 master weights


def test_second_sigterm_ends_the_process_at_once():
  script = ("import os, signal, time\n"
            "from bertjax.stop_signal import StopSignal\n"
            "stop = StopSignal()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert stop.received == 'SIGTERM'\n"
            "print('first handled', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(30)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert "first handled" in result.stdout and result.returncode == -signal.SIGTERM, result.stderr[-2000:]
