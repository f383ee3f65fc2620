"""scripts/large_batch_study.py keeps a ledger of finished runs that outlives the run folders and the machine: a
recorded seed is not trained again, a new one is added with its CPU, products and options, and the table's mean
and standard deviation are over the recorded seeds."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "large_batch_study.py"


@pytest.fixture
def study(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("large_batch_study", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(module, "REPO", tmp_path / "repo")  # no docs/large_batch.md there: the table only prints
  monkeypatch.setattr(module, "LEDGER", tmp_path / "large_batch.json")
  monkeypatch.setattr(module, "snli_split", lambda root: None)
  monkeypatch.setattr(module, "cpu_description", lambda: "Test CPU | avx2 | 2 cores")
  trained = []

  def fake_run(root, c, seed, python, options):  # what a finished bertjax.train leaves behind
    trained.append((c["name"], seed))
    workdir = root / c["name"] / f"seed{seed}"
    workdir.mkdir(parents=True)
    (workdir.parent / f"seed{seed}.options.json").write_text(json.dumps(options))
    value = {0: 0.80, 1: 0.90, 2: 0.86}[seed]
    (workdir / "summary.json").write_text(json.dumps(
        {"finished": True, "final": {"accuracy": value}, "steps": 66, "mean_examples_per_step": 1020.4,
         "wall_seconds": 100.0 + seed, "matmul_dtype": "float32"}))
    (workdir / "config.json").write_text(json.dumps({"derived": {"optimizer": {"name": "lamb", "b2": 0.98}}}))
    return True

  monkeypatch.setattr(module, "run", fake_run)
  module.trained = trained
  return module


def main(study, monkeypatch, *args):
  monkeypatch.setattr(sys, "argv", ["large_batch_study.py", *args])
  return study.main()


def test_the_ledger_outlives_the_run_folders(study, monkeypatch, tmp_path):
  cell = "sst2_b1024_e1_auto"
  assert main(study, monkeypatch, "--root", str(tmp_path / "a"), "--cells", cell, "--seeds", "2",
              "--config.model.matmul_dtype=float32") == 0
  assert study.trained == [(cell, 0), (cell, 1)]
  runs = json.loads(study.LEDGER.read_text())["runs"]
  assert [(r["cell"], r["seed"], r["value"], r["wall_seconds"]) for r in runs] == [(cell, 0, 0.80, 100.0),
                                                                                  (cell, 1, 0.90, 101.0)]
  assert runs[0]["machine"] == "Test CPU | avx2 | 2 cores" and runs[0]["matmul_dtype"] == "float32"
  assert runs[0]["options"] == ["--config.model.matmul_dtype=float32"] and runs[0]["derived"] == "name lamb, b2 0.98"

  # Another session on another machine: a new root, the two seeds already recorded, a third asked for.
  monkeypatch.setattr(study, "cpu_description", lambda: "Other CPU | avx512f | 2 cores")
  assert main(study, monkeypatch, "--root", str(tmp_path / "b"), "--cells", cell, "--seeds", "3") == 0
  assert study.trained == [(cell, 0), (cell, 1), (cell, 2)]
  ledger = json.loads(study.LEDGER.read_text())
  assert [r["machine"].split(" |")[0] for r in ledger["runs"]] == ["Test CPU", "Test CPU", "Other CPU"]
  row = next(r for r in ledger["cells"] if r["name"] == cell)
  assert row["values"] == [0.80, 0.90, 0.86] and row["mean"] == pytest.approx(0.853333, abs=1e-6)
  assert row["sd"] == pytest.approx(0.0503322, abs=1e-6)  # sample sd of 0.80, 0.90, 0.86
  assert row["wall_seconds"] == pytest.approx(101.0) and row["ran_on"] == "A float32, B float32"
  untouched = next(r for r in ledger["cells"] if r["name"] == "sst2_b32_e1")
  assert untouched["seeds"] == 0 and untouched["mean"] is None


def test_a_dry_run_records_what_finished_and_trains_nothing(study, monkeypatch, tmp_path):
  cell = "stsb_b1024_e3_auto"
  root = tmp_path / "root"
  study.run(root, next(c for c in study.CELLS if c["name"] == cell), 0, "python", [])  # finished earlier
  (root / cell / "seed0" / "summary.json").write_text(json.dumps(  # a regression run: Pearson
      {"finished": True, "final": {"pearson": 0.78}, "steps": 18, "wall_seconds": 267.0, "matmul_dtype": "bfloat16"}))
  study.trained.clear()
  assert main(study, monkeypatch, "--root", str(root), "--dry", "--seeds", "3") == 0
  assert study.trained == []
  runs = json.loads(study.LEDGER.read_text())["runs"]
  assert [(r["cell"], r["seed"], r["metric"], r["value"], r["matmul_dtype"]) for r in runs] == [
      (cell, 0, "pearson", 0.78, "bfloat16")]


def test_arguments_other_than_config_options_are_refused(study, monkeypatch, tmp_path, capsys):
  assert main(study, monkeypatch, "--root", str(tmp_path), "--epochs", "3") == 2
  assert "unknown arguments: --epochs 3" in capsys.readouterr().err
  assert not study.LEDGER.exists()
