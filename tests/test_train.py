"""End-to-end training on a tiny BERT: learning, outputs, resume after kill -9, accumulation, errors."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bertjax import resume, run_summary, trainer
from bertjax.errors import UserError
from bertjax.workdir import load_run
from conftest import demo_setup, make_hf_classifier

REPO = Path(__file__).resolve().parents[1]


def demo_config(data_dir, model_dir, **overrides):
  spec = importlib.util.spec_from_file_location("demo_cfg", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"tiny,data_dir={data_dir}")
  c.model.name_or_path = str(model_dir)
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def cli(workdir, data_dir, model_dir, *overrides, timeout=300):
  """Runs the CLI from the workdir's parent with a relative --workdir (as users type it)."""
  workdir = Path(workdir)
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny,data_dir={data_dir}",
         f"--workdir={workdir.name}", f"--config.model.name_or_path={model_dir}", *overrides]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(cmd, cwd=workdir.parent, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("train"), 512, 100, seed=0)


@pytest.fixture(scope="module")
def finished_run(setup):
  root, data, model = setup
  workdir = root / "run"
  summary = trainer.train_and_evaluate(demo_config(data, model), str(workdir))
  return workdir, summary


def test_loss_falls_and_run_outputs(finished_run):
  workdir, summary = finished_run
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in lines if r["kind"] == "train"]
  evals = [r for r in lines if r["kind"] == "eval"]
  assert all({"step", "loss", "learning_rate"} <= set(r) for r in train)
  assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 0.1
  # 512 examples for 8 epochs overfit, so the best (not the last) eval loss is the one that falls.
  assert min(r["eval_loss"] for r in evals) < evals[0]["eval_loss"] - 0.02
  assert evals[-1]["accuracy"] >= evals[0]["accuracy"] + 0.08 and summary["best"]["accuracy"] >= 0.6
  # 100 eval examples (not a multiple of the batch of 16): every one counted.
  assert summary["num_eval_examples"] == 100 and summary["num_train_examples"] == 512
  assert summary["steps"] == summary["total_steps"] and summary["epochs_completed"] == 8
  assert summary["finished"] and summary["best"]["step"] in [r["step"] for r in evals]
  assert len(evals) == 8  # one eval per epoch
  assert 0 < summary["mfu"] < 1 and summary["train_examples_per_sec"] > 0
  assert summary["mfu_peak_source"].startswith("measured on this machine (cpu)")  # no vendor figure for a CPU
  assert 0 < summary["padding_fraction"] < 0.5 and 1 <= summary["num_compilations"] <= 12
  for key in ("model", "global_batch_size", "train_tokens_per_sec", "wall_seconds", "final"):
    assert key in summary
  # One set of names: summary.json's entries are metrics.jsonl's eval lines (MCC included).
  assert summary["final"] == {k: v for k, v in evals[-1].items() if k != "kind"}
  assert set(summary["final"]) == {"step", "eval_loss", "accuracy", "macro_f1", "micro_f1", "mcc"}
  best = min(evals, key=lambda r: r["eval_loss"])  # train.best_metric defaults to eval_loss
  assert summary["best"] == {k: v for k, v in best.items() if k != "kind"} and summary["best_metric"] == "eval_loss"
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "curves.png").stat().st_size > 1000
  assert json.loads((workdir / "labels.json").read_text())["label_names"] == ["0", "1"]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) <= \
      sorted({str(summary["best"]["step"]), str(summary["steps"])})


KILL_STEPS = {"train.max_steps": 20, "train.eval_every_steps": 10}


@pytest.fixture(scope="module")
def straight_runs(setup):
  """checkpoint_every_steps -> the uninterrupted run a killed-and-resumed one must reproduce bit for bit
  (the checkpoint interval changes which steps are logged, never the numbers)."""
  root, data, model = setup
  runs = {}

  def get(every: int) -> Path:
    if every not in runs:
      runs[every] = root / f"straight{every}"
      trainer.train_and_evaluate(demo_config(data, model, **KILL_STEPS, **{"train.checkpoint_every_steps": every}),
                                 str(runs[every]))
    return runs[every]

  return get


@pytest.mark.slow
@pytest.mark.parametrize("seed,every", [(0, 5), (2, 1)])  # one kill between saves, one inside a save
def test_resume_after_kill_equals_uninterrupted(setup, straight_runs, seed, every):
  """kill -9 at a seeded random moment (after a random checkpoint, plus a random delay; with a save
  after every step, most moments fall inside an async save), then the same command resumes."""
  root, data, model = setup
  straight_run = straight_runs(every)
  rng = np.random.default_rng(seed)
  after, delay = int(rng.integers(1, 3)) * 5, float(rng.uniform(0, 0.4))
  common = [f"--config.{k}={v}" for k, v in KILL_STEPS.items()] + [f"--config.train.checkpoint_every_steps={every}"]
  killed = root / f"killed{seed}"
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--workdir={killed}", f"--config.model.name_or_path={model}", *common]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit()] \
        if (killed / "checkpoints").exists() else []
    if done and max(done) >= after:
      break
    time.sleep(0.01)
  time.sleep(delay)
  saving = lambda: any(".orbax-checkpoint-tmp" in p.name for p in (killed / "checkpoints").iterdir())
  if every == 1:  # kill while a checkpoint is being written
    while time.time() < deadline and proc.poll() is None and not saving():
      time.sleep(0.002)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  if every == 1:
    assert saving(), "the kill did not land inside a checkpoint write"
  resumed = cli(killed, data, model, *common)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr
  a, b = load_run(straight_run, "latest"), load_run(killed, "latest")
  assert a.step == b.step == 20
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  lines = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
  steps = [(r["kind"], r["step"]) for r in lines]
  assert len(steps) == len(set(steps)), "metrics.jsonl has duplicated steps after resume"
  straight_lines = [json.loads(l) for l in (straight_run / "metrics.jsonl").read_text().splitlines()]
  loss = lambda rs: [(r["step"], r["loss"]) for r in rs if r["kind"] == "train"]
  assert loss(lines) == loss(straight_lines)


@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing(finished_run, setup):
  workdir, summary = finished_run
  _, data, model = setup
  before = (workdir / "metrics.jsonl").read_text()
  result = cli(workdir, data, model)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (workdir / "metrics.jsonl").read_text() == before
  # The start lines speak of the checkpoint, not of the fresh head the checkpoint replaces.
  assert f"checkpoints/{summary['steps']} (at the end of epoch 8)" in result.stderr
  assert "initialised a new" not in result.stderr
  again = json.loads((workdir / "summary.json").read_text())
  for key in ("best", "final", "steps", "num_compilations", "train_examples_per_sec", "padding_fraction", "finished"):
    assert again[key] == summary[key], key  # the summary still describes the run, not the no-op rerun
  assert summary["num_compilations"] >= 2


def _error_line(result):
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_cli_errors_exit_2_and_keep_workdir(finished_run, setup, tmp_path):
  workdir, _ = finished_run
  _, data, model = setup
  snapshot = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  line = _error_line(cli(workdir, data, model, "--config.optimizer.learnig_rate=1e-3"))
  assert "unknown config key 'optimizer.learnig_rate'" in line and "optimizer.learning_rate" in line
  line = _error_line(cli(workdir, data, tmp_path / "no_such_model"))
  assert "this workdir was trained with model.name_or_path=" in line
  fresh = tmp_path / "fresh"
  line = _error_line(cli(fresh, data, tmp_path / "no_such_model"))
  assert "no_such_model does not exist" in line
  line = _error_line(cli(fresh, data, model, "--config.data.train=/nonexistent/train.tsv"))
  assert "/nonexistent/train.tsv" in line and not fresh.exists()
  # The failed starts touched nothing in the finished run's workdir.
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == snapshot


@pytest.mark.parametrize("source,match", [
    (None, "config file not found: .*nope.py"),
    ("def get_config(:\n", r"bad.py:1: syntax error"),
    ("x = 1\n", "defines no get_config"),
    ("def get_config():\n  raise ValueError('boom')\n", "get_config failed: ValueError: boom"),
    ("import no_such_module_xyz\n", "ModuleNotFoundError"),
    ("def get_config():\n  return 3\n", "returned int, not a ConfigDict"),
])
def test_bad_config_file_is_one_line(tmp_path, source, match):
  path = tmp_path / ("nope.py" if source is None else "bad.py")
  if source is not None:
    path.write_text(source)
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={path}", f"--workdir={tmp_path / 'w'}"]
  result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert re.search(match, _error_line(result)), result.stderr
  assert not (tmp_path / "w").exists()


def test_missing_config_flag_is_one_line(tmp_path):
  cmd = [sys.executable, "-m", "bertjax.train", f"--workdir={tmp_path / 'w'}"]
  result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert "--config is required" in _error_line(result)


@pytest.mark.parametrize("content,match", [
    ("sentence\tlabel\ngood film\t1\nbad film\n", r"train.tsv:3: .*"),
    ("sentence\tlabel\ngood film\t1\n\t0\n", r"train.tsv:3: .*empty"),
    ("text\tlabel\ngood film\t1\n", r"column 'sentence'.*"),
])
def test_data_errors_name_file_and_line(setup, tmp_path, content, match):
  _, data, model = setup
  (tmp_path / "train.tsv").write_text(content)
  config = demo_config(data, model, **{"data.train": str(tmp_path / "train.tsv")})
  with pytest.raises(UserError, match=match) as e:
    trainer.Trainer(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value) and not (tmp_path / "w").exists()


def test_unknown_eval_label(setup, tmp_path):
  _, data, model = setup
  (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\nodd film\tneutral\n")
  config = demo_config(data, model, **{"data.eval": str(tmp_path / "dev.tsv")})
  with pytest.raises(UserError, match=r"dev.tsv:3: unknown label 'neutral'"):
    trainer.Trainer(config, str(tmp_path / "w"))


def test_num_labels_disagreeing_with_checkpoint_head(setup, tmp_path):
  _, data, _ = setup
  three = make_hf_classifier("bert", tmp_path / "three", num_labels=3)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
    (three / name).write_bytes((setup[2] / name).read_bytes())
  # The tiny classifier's vocabulary is 120 ids; the data is tokenized with the MiniLM vocab, so only
  # the head check matters here and must fire before anything runs (model.reinit_head=auto, the default,
  # replaces the head instead: test_options).
  with pytest.raises(UserError, match="has 3 labels but num_labels=2"):
    trainer.Trainer(demo_config(data, three, **{"model.reinit_head": False}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_checkpoint(setup, tmp_path):
  _, data, model = setup
  config = demo_config(data, model, **{"optimizer.learning_rate": 1e30, "optimizer.clip_norm": 0.0,
                                       "train.max_steps": 30, "train.log_every_steps": 1,
                                       "train.checkpoint_every_steps": 1, "optimizer.warmup_fraction": 0.0})
  with pytest.raises(UserError, match=r"non-finite loss .* at step \d+; stopped") as e:
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
  kept = load_run(tmp_path / "w", "latest")
  assert kept.step == bad_step - 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept.params))


def test_checkpoint_every_minutes_saves_at_the_first_log_step_once_due(setup, tmp_path, monkeypatch):
  """Saves at 10 (eval) and 12 (end); the clock jumps 2 minutes after step 7, so log step 9 saves too, once."""
  from bertjax import checkpoint as ckpt_lib
  _, data, model = setup
  jump, saved, save = [0.0], [], ckpt_lib.Checkpoints.save
  wall, advance = trainer._wall_seconds, trainer._advance

  def advance_and_jump(s, loop, batch):
    out = advance(s, loop, batch)
    if loop.step == 7:
      jump[0] = 120.0
    return out

  def save_and_record(self, step, *args, **kwargs):
    saved.append((step, args[1]["last_save_wall_seconds"]))
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(trainer, "_advance", advance_and_jump)
  monkeypatch.setattr(trainer, "_wall_seconds", lambda s: wall(s) + jump[0])
  monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save_and_record)
  trainer.train_and_evaluate(demo_config(data, model, **{
      "train.max_steps": 12, "train.eval_every_steps": 10, "train.log_every_steps": 3,
      "train.checkpoint_every_minutes": 1.0}), str(tmp_path / "w"))
  assert [step for step, _ in saved] == [9, 10, 12]
  assert saved[0][1] >= 120.0  # the meta records the save's wall time, which a resume counts from


def test_resume_check_tolerates_keys_added_later_at_their_default(tmp_path):
  """A workdir from an older version (its config.json lacks a newer key) still resumes, unless the
  new key is set to something other than its default."""
  from bertjax.config_base import base_config
  config = base_config()
  saved = resume.config_snapshot(config)
  del saved["data"]["label_names_file"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  resume.check_resume_compatible(tmp_path, config)
  config.data.label_names_file = "classes.txt"
  with pytest.raises(UserError, match="data.label_names_file=None, not 'classes.txt'"):
    resume.check_resume_compatible(tmp_path, config)
  config.data.label_names_file = ""
  config.data.max_length = 64
  with pytest.raises(UserError, match="data.max_length=128, not 64"):
    resume.check_resume_compatible(tmp_path, config)


def test_resume_check_keeps_the_data_shards(tmp_path):
  """The trainer records data.num_shards resolved (0 = one per process), so a resume with another
  process count is refused instead of silently reshuffling the epoch; a workdir from before the key
  had one global plan, i.e. one shard."""
  from bertjax.config_base import base_config
  config = base_config()
  config.data.num_shards = 2
  saved = resume.config_snapshot(config)
  (tmp_path / "config.json").write_text(json.dumps(saved))
  resume.check_resume_compatible(tmp_path, config)
  config.data.num_shards = 1
  with pytest.raises(UserError, match="data.num_shards=2, not 1"):
    resume.check_resume_compatible(tmp_path, config)
  del saved["data"]["num_shards"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  resume.check_resume_compatible(tmp_path, config)
  config.data.num_shards = 2
  with pytest.raises(UserError, match="data.num_shards=1, not 2"):
    resume.check_resume_compatible(tmp_path, config)


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators(tmp_path):
  from bertjax.config_base import base_config
  from bertjax.models.config import resolve_dtype
  assert base_config().model.dtype == "auto"
  assert [resolve_dtype("auto", b) for b in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
  assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("auto") == "float32"  # tests run on CPU
  with pytest.raises(UserError, match="model.dtype must be one of auto, float32, bfloat16, got 'float16'"):
    resolve_dtype("float16")
  # A run saved with an explicit float32 resumes under `auto` on CPU, not under bfloat16.
  config = base_config()
  saved = resume.config_snapshot(config)
  saved["model"]["dtype"] = "float32"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  resume.check_resume_compatible(tmp_path, config)
  config.model.dtype = "bfloat16"
  with pytest.raises(UserError, match="model.dtype='float32', not 'bfloat16'"):
    resume.check_resume_compatible(tmp_path, config)


def test_auto_matmul_dtype_is_bfloat16_only_with_bf16_dot_instructions_that_measured_faster(tmp_path, monkeypatch):
  from bertjax.config_base import base_config
  from bertjax.models import config as model_config
  flags = "flags\t\t: fpu avx512f avx512vl {}\n"
  for extra, want in (("amx_bf16 amx_tile avx512_bf16", True), ("avx512_bf16", True), ("amx_bf16", True),
                      ("amx_tile avx512_vnni", False), ("avx512_bf16x", False)):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n" + flags.format(extra))
    assert model_config.cpu_has_bf16_dot(str(tmp_path / "cpuinfo")) is want, extra
  (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: avx512_bf16 in a name\n" + flags.format(""))
  assert model_config.cpu_has_bf16_dot(str(tmp_path / "cpuinfo")) is False
  assert model_config.cpu_has_bf16_dot(str(tmp_path / "missing")) is False
  assert base_config().model.matmul_dtype == "auto"
  config = base_config()
  saved = resume.config_snapshot(config)
  saved["model"]["matmul_dtype"] = "bfloat16"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  resolve = model_config.resolve_matmul_dtype
  for flags, faster in ((True, False), (False, True)):  # bf16 instructions that measured slower: float32
    monkeypatch.setattr(model_config, "cpu_has_bf16_dot", lambda: flags)
    monkeypatch.setattr(model_config, "cpu_bf16_products_faster", lambda: faster)
    assert resolve("auto", "float32", "cpu") == "float32"
  monkeypatch.setattr(model_config, "cpu_bf16_products_faster", lambda: pytest.fail("measured without the flags"))
  monkeypatch.setattr(model_config, "cpu_has_bf16_dot", lambda: False)
  assert resolve("auto", "float32", "cpu") == "float32"
  for amx in (True, False):
    monkeypatch.setattr(model_config, "cpu_has_bf16_dot", lambda amx=amx: amx)
    monkeypatch.setattr(model_config, "cpu_bf16_products_faster", lambda: True)
    assert resolve("auto", "float32", "cpu") == ("bfloat16" if amx else "float32")
    assert resolve("auto", "bfloat16", "cpu") == resolve("auto", "bfloat16", "gpu") == "bfloat16"
    assert resolve("auto", "float32", "gpu") == "float32" and resolve("float32", "float32", "cpu") == "float32"
    # Resuming compares what `auto` resolves to: a run saved with bfloat16 products resumes under
    # `auto` on a CPU with bf16 dot instructions only.
    if amx:
      resume.check_resume_compatible(tmp_path, config)
    else:
      with pytest.raises(UserError, match="model.matmul_dtype='bfloat16', not 'auto'"):
        resume.check_resume_compatible(tmp_path, config)
  with pytest.raises(UserError, match="model.matmul_dtype=float32 needs model.dtype float32"):
    resolve("float32", "bfloat16", "cpu")
  with pytest.raises(UserError, match="model.matmul_dtype must be one of auto, float32, bfloat16, got 'int8'"):
    resolve("int8", "float32", "cpu")


def test_auto_accumulation_splits_cpu_steps_into_cache_sized_micro_batches():
  from bertjax.step import auto_accumulation
  # MiniLM (hidden 384) at batch 1024 on SST-2: 168 rows of 82 -> 28 micro-batches of 6 rows (492 tokens).
  assert auto_accumulation(168, 82, 384, "cpu") == 28  # 6 rows (492 tokens) each
  assert auto_accumulation(168, 82, 768, "cpu") == 28  # base models too (they took 3 rows when written)
  assert auto_accumulation(4, 108, 768, "cpu") == 1  # batch 32: 432 tokens already fit
  assert auto_accumulation(8, 108, 768, "cpu") == 2
  assert auto_accumulation(8, 108, 96, "cpu") == 1  # a model 4x narrower keeps 4x the tokens
  assert auto_accumulation(7, 100, 384, "cpu") == 7  # only divisors: 1 row each rather than empty rows
  assert auto_accumulation(168, 82, 384, "gpu") == auto_accumulation(168, 82, 384, "tpu") == 1


@pytest.mark.slow
def test_auto_accumulation_trains_what_the_same_explicit_setting_trains(setup, tmp_path, monkeypatch):
  """grad_accum_steps=auto resolves to a number (more than 1 here: the budget is lowered so the tiny model
  splits its steps), says so at start, and trains exactly what that explicit number trains (float32 products)."""
  from bertjax import step
  _, data, model = setup
  monkeypatch.setattr(step, "CPU_MICROBATCH_TOKENS", 200 * 32 / 384)  # 200 tokens at the tiny model's hidden 32
  common = {"train.max_steps": 3, "model.matmul_dtype": "float32", "train.global_batch_size": 64}
  auto = trainer.Trainer(demo_config(data, model, **common), str(tmp_path / "auto"))
  rows = auto.data.train.batcher.rows_per_step
  chosen = auto.grad_accum_steps
  assert chosen == step.auto_accumulation(rows, auto.data.train.batcher.row_length, 32, "cpu") > 1
  assert rows % chosen == 0 and rows // chosen * auto.data.train.batcher.row_length <= 200
  assert f"{chosen} accumulated micro-batches of {rows // chosen} rows per device (auto)" in run_summary.start_lines(auto, 0)[2]
  auto.run()
  for name, accum in (("same", chosen), ("one", 1)):
    trainer.Trainer(demo_config(data, model, **common, **{"train.grad_accum_steps": accum}),
                    str(tmp_path / name)).run()
  params = {name: load_run(str(tmp_path / name), "latest").params for name in ("auto", "same", "one")}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params["auto"], params["same"])
  # Another micro-batch split draws other dropout masks: the check above can tell the settings apart.
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), params["auto"], params["one"]))
  assert any(differs)


@pytest.mark.parametrize("overrides, match", [
    ({"train.grad_accum_steps": 3}, r"train.grad_accum_steps=3 must divide the 4 rows each device gets per step \(batch 16, packed\); divisors: 1, 2, 4"),
    ({"train.global_batch_size": 0}, "train.global_batch_size=0 must be a positive multiple of the 1 data-par"),
    ({"train.grad_accum_steps": 0}, "train.grad_accum_steps must be auto or a positive integer, got 0"),
    ({"train.grad_accum_steps": "some"}, "train.grad_accum_steps must be auto or a positive integer"),
    ({"optimizer.base_batch_size": 0}, "optimizer.base_batch_size"),
])
def test_bad_batch_settings_fail_before_the_workdir_is_touched(setup, tmp_path, overrides, match):
  _, data, model = setup
  with pytest.raises(UserError, match=match):
    trainer.Trainer(demo_config(data, model, **overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_short_scaled_run_says_so_at_start(setup, tmp_path):
  """Batch 64 from the tiny recipe's 16 for 4 epochs of 512 examples (36 steps): the start lines end with the
  short-run advice, whose batch comes from the examples the run trains on (2,048 / 50 = 41 -> 32); at the
  recipe's batch there is no such line."""
  _, data, model = setup
  tr = trainer.Trainer(demo_config(data, model, **{"train.global_batch_size": 64, "train.num_epochs": 4.0}),
                       str(tmp_path / "scaled"))
  assert len(tr.data.train) == 512 and 30 <= tr.total_steps < 50
  line = run_summary.start_lines(tr, 0)[-1]
  assert line.startswith(f"short run: {tr.total_steps} steps at batch 64 (the recipe's batch is 16)")
  assert line.endswith("for 50+ steps use batch 32 or less, or more epochs")
  recipe = trainer.Trainer(demo_config(data, model, **{"train.num_epochs": 4.0}), str(tmp_path / "recipe"))
  assert not any(line.startswith("short run:") for line in run_summary.start_lines(recipe, 0))


@pytest.mark.slow
def test_auto_rule_learns_at_8x_the_batch_where_the_linear_rule_does_not(setup, tmp_path):
  """The tiny recipe (lr 3e-3 at batch 16) at batch 128, 10 epochs (48 steps): lr_scaling=auto (lr x sqrt(8),
  b2 0.992) learns (dev MCC 0.40, accuracy 0.70 when written), the linear rule's lr x 8 collapses to predicting
  one class (MCC 0)."""
  _, data, model = setup
  final = {}
  for scaling in ("auto", "linear"):
    config = demo_config(data, model, **{"train.global_batch_size": 128, "train.num_epochs": 10.0,
                                         "train.eval_every_steps": 0, "optimizer.lr_scaling": scaling})
    final[scaling] = trainer.train_and_evaluate(config, str(tmp_path / scaling))["final"]
  assert final["auto"]["mcc"] > 0.3 and final["auto"]["accuracy"] >= 0.65
  assert final["linear"]["mcc"] == 0.0 and final["linear"]["eval_loss"] > final["auto"]["eval_loss"] + 0.05
