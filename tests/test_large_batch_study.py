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


def test_a_run_is_recorded_when_it_ends_and_a_smaller_seeds_keeps_the_table(study, monkeypatch, tmp_path):
  cell = "sst2_b256_e1_auto"
  assert main(study, monkeypatch, "--root", str(tmp_path / "a"), "--cells", cell, "--seeds", "3") == 0
  finish = study.run

  def killed_after_one(root, c, seed, python, options):  # the session ends during the second run
    if study.trained[-1:] == [("sst2_b32_e1", 0)]:
      raise KeyboardInterrupt
    return finish(root, c, seed, python, options)

  monkeypatch.setattr(study, "run", killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    main(study, monkeypatch, "--root", str(tmp_path / "b"), "--cells", "sst2_b32_e1", "--seeds", "2")
  ledger = json.loads(study.LEDGER.read_text())
  assert [(r["cell"], r["seed"]) for r in ledger["runs"]][-1] == ("sst2_b32_e1", 0)
  row = next(r for r in ledger["cells"] if r["name"] == cell)  # --seeds 2 did not cut cell's third seed
  assert row["seeds"] == 3 and row["sd"] == pytest.approx(0.0503322, abs=1e-6)


def test_the_real_run_passes_the_options_and_keeps_them(study, monkeypatch, tmp_path):
  spec = importlib.util.spec_from_file_location("large_batch_study_real", SCRIPT)
  real = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(real)
  commands = []
  monkeypatch.setattr(real.subprocess, "call", lambda cmd, **kw: commands.append(cmd) or 0)
  c = next(c for c in real.CELLS if c["name"] == "sst2_b1024_e1_auto")
  assert real.run(tmp_path, c, 1, "python", ["--config.model.matmul_dtype=float32"])
  assert commands[0][:3] == ["python", "-m", "bertjax.train"]
  assert "--config.train.seed=1" in commands[0] and "--config.train.global_batch_size=1024" in commands[0]
  assert commands[0][-1] == "--config.model.matmul_dtype=float32"
  assert json.loads((tmp_path / c["name"] / "seed1.options.json").read_text()) == ["--config.model.matmul_dtype=float32"]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "3"], "unknown arguments: --epochs 3"),
    (["--config.train.seed=5"], "--config.train.seed is set by the study"),
    (["--config.model.matmul_dtyp=float32"], "unknown config key 'model.matmul_dtyp'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--cells", "sst2_b8_e1"], "unknown cells: sst2_b8_e1"),
])
def test_bad_arguments_get_one_line_and_exit_2(study, monkeypatch, tmp_path, capsys, args, message):
  assert main(study, monkeypatch, "--root", str(tmp_path / "root"), *args) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
  assert not study.LEDGER.exists() and not (tmp_path / "root").exists()


def test_a_corrupt_ledger_gets_one_line_and_exit_2(study, monkeypatch, tmp_path, capsys):
  study.LEDGER.write_text('{"runs": [{"cell": "sst2_b32_e1"')
  assert main(study, monkeypatch, "--root", str(tmp_path / "root"), "--dry") == 2
  assert "cannot read the study's ledger" in capsys.readouterr().err
  assert study.LEDGER.read_text() == '{"runs": [{"cell": "sst2_b32_e1"'
