"""Checkpoints (orbax) and run logs: exact restore, retention, crashes, write errors."""

import io
import json
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bertjax import checkpoint
from bertjax.checkpoint import CheckpointError, Checkpoints
from bertjax.run_log import Progress, RunLog, write_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _train_state(seed: int):
  """params + adamw state after one update (non-zero moments), int step, raw key."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {
      "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
      "embed": jax.random.normal(k2, (5, 4)).astype(jnp.bfloat16),
  }
  tx = optax.adamw(1e-3, weight_decay=0.01)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * (seed + 1), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {
      "params": params,
      "opt_state": opt_state,
      "step": jnp.asarray(100 + seed, jnp.int32),
      "rng": jax.random.fold_in(jax.random.PRNGKey(7), seed),  # uint32[2]
  }


def _abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(g, jax.Array)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert g.sharding == w.sharding
    assert np.asarray(g).tobytes() == np.asarray(w).tobytes()  # bit-exact


def _step_dirs(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_roundtrip_is_bit_exact(tmp_path):
  directory = str(tmp_path / "checkpoints")
  s1, s2 = _train_state(1), _train_state(2)
  meta1 = {"epoch": 1, "step_in_epoch": 17, "labels": ["neg", "pos"],
           "config": {"model": {"hidden": 32}, "lr": 5e-5}}
  with Checkpoints(directory, is_primary=True) as ckpt:
    ckpt.save(1, s1, meta1, {"eval_loss": 0.5})
    ckpt.save(2, s2, {"epoch": 2, "step_in_epoch": 0, "labels": ["neg", "pos"],
                      "config": {}})

  with Checkpoints(directory, is_primary=True) as ckpt:  # a fresh process's view
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.latest_step() == 2 and ckpt.best_step() == 1
    restored, meta = ckpt.restore(1, _abstract(s1))
    _assert_identical(restored, s1)
    assert meta == meta1
    assert restored["rng"].dtype == jnp.uint32
    assert type(restored["opt_state"][0]) is type(s1["opt_state"][0])  # namedtuples
    # The other step is really different, so the comparison above could fail.
    restored2, _ = ckpt.restore(2, _abstract(s1))
    assert not np.array_equal(restored2["params"]["dense"]["kernel"],
                              s1["params"]["dense"]["kernel"])
    _assert_identical(restored2, s2)
    with pytest.raises(ValueError, match="sharding"):
      ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s1))


@pytest.mark.parametrize("async_save", [True, False])
def test_retention_keeps_latest_and_lowest_eval_loss(tmp_path, async_save):
  directory = str(tmp_path / "checkpoints")
  # (step, eval_loss or None, steps expected on disk afterwards, best step)
  plan = [
      (1, 0.9, [1], 1),
      (2, 0.5, [2], 2),
      (3, 0.7, [2, 3], 2),
      (4, None, [2, 4], 2),         # saved without metrics: kept as latest only
      (5, 0.4, [5], 5),             # new best and latest at once
      (6, 0.45, [5, 6], 5),
      (7, None, [5, 7], 5),
      (8, float("nan"), [5, 8], 5),  # a NaN loss never becomes the best
      (9, 0.6, [5, 9], 5),
      (10, 0.3, [10], 10),
  ]
  ckpt = Checkpoints(directory, async_save=async_save, is_primary=True)
  for step, loss, expected, best in plan:
    metrics = None if loss is None else {"eval_loss": loss, "accuracy": 0.5}
    ckpt.save(step, {"w": jnp.full(3, step, jnp.float32)}, {"step": step}, metrics)
    ckpt.wait()
    assert ckpt.all_steps() == expected, step
    assert _step_dirs(directory) == expected, step  # really deleted on disk
    assert ckpt.latest_step() == step and ckpt.best_step() == best, step
  ckpt.close()

  ckpt = Checkpoints(directory, is_primary=True)  # best is recomputed from disk
  ckpt.save(11, {"w": jnp.zeros(3)}, {}, {"eval_loss": 0.8})
  ckpt.wait()
  assert ckpt.all_steps() == [10, 11] and ckpt.best_step() == 10
  ckpt.close()


def test_retention_without_keep_best_keeps_only_latest(tmp_path):
  directory = str(tmp_path / "checkpoints")
  with Checkpoints(directory, keep_best=False, is_primary=True) as ckpt:
    ckpt.save(1, {"w": jnp.ones(2)}, {}, {"eval_loss": 0.1})
    ckpt.save(2, {"w": jnp.ones(2)}, {}, {"eval_loss": 0.9})
    ckpt.wait()
    assert ckpt.all_steps() == [2] and _step_dirs(directory) == [2]


def test_metrics_need_eval_loss(tmp_path):
  with Checkpoints(str(tmp_path / "c"), is_primary=True) as ckpt:
    with pytest.raises(ValueError, match="eval_loss"):
      ckpt.save(1, {"w": jnp.ones(2)}, {}, {"accuracy": 0.9})
    assert ckpt.all_steps() == []


_CHILD = """
import sys
import jax.numpy as jnp
from bertjax.checkpoint import Checkpoints
ckpt = Checkpoints(sys.argv[1], is_primary=True)
# 256 MB: writing takes most of a second, long enough to be killed in the middle.
ckpt.save(2, {"w": jnp.arange(64 * 2**20, dtype=jnp.float32)}, {"epoch": 9})
print("SAVE_RETURNED", flush=True)
ckpt.wait()
print("FINISHED", flush=True)
"""


def test_killed_mid_save_is_ignored_on_restart(tmp_path):
  directory = str(tmp_path / "checkpoints")
  s1 = _train_state(1)
  with Checkpoints(directory, is_primary=True) as ckpt:
    ckpt.save(1, s1, {"epoch": 1})

  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", _CHILD, directory], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert child.stdout.readline().strip() == "SAVE_RETURNED"
    time.sleep(0.05)  # let the background writer put part of the data on disk
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == -signal.SIGKILL
  names = os.listdir(directory)
  assert "2" not in names, "the save finished before the kill; make the state larger"
  assert any(n.startswith("2" + TMP_SUFFIX) for n in names), names

  with Checkpoints(directory, is_primary=True) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    restored, meta = ckpt.restore(1, _abstract(s1))
    _assert_identical(restored, s1)
    assert meta == {"epoch": 1}
    # Saving goes on; the leftover tmp folder of step 2 is removed.
    ckpt.save(3, s1, {"epoch": 3})
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    assert sorted(os.listdir(directory)) == ["3"]


def test_write_error_surfaces_and_keeps_previous(tmp_path):
  """A file-size limit makes the OS refuse the write, as a full disk would."""
  directory = str(tmp_path / "checkpoints")
  s1 = _train_state(1)
  ckpt = Checkpoints(directory, is_primary=True)
  ckpt.save(1, s1, {"epoch": 1})  # no metrics: a successful step 2 would delete it
  ckpt.wait()

  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not death
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
  try:
    with pytest.raises(CheckpointError, match="step 2.*File too large"):
      ckpt.save(2, {"w": jnp.arange(4 * 2**20, dtype=jnp.float32)}, {"epoch": 2})
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)

  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  assert 1 in _step_dirs(directory)
  restored, _ = ckpt.restore(1, _abstract(s1))
  _assert_identical(restored, s1)
  ckpt.save(3, s1, {"epoch": 3})  # the manager still works afterwards
  ckpt.close()
  assert _step_dirs(directory) == [3]


# --- run log -----------------------------------------------------------------


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_metrics_jsonl_append_and_truncate_on_resume(tmp_path):
  workdir = str(tmp_path)
  log = RunLog(workdir, is_primary=True)
  for step in (10, 20, 30):
    log.write(step, {"loss": jnp.float32(1.0 / step), "learning_rate": 1e-4}, "train")
  log.write(20, {"accuracy": np.float64(0.75), "loss": 0.5}, "eval")
  assert len(_read_jsonl(log.path)) == 4  # on disk before close: a kill loses nothing
  log.close()
  lines = _read_jsonl(log.path)
  assert lines[0] == {"step": 10, "kind": "train", "loss": pytest.approx(0.1),
                      "learning_rate": 1e-4}
  assert [(r["step"], r["kind"]) for r in lines] == [
      (10, "train"), (20, "train"), (30, "train"), (20, "eval")]
  with open(log.path, "a") as f:
    f.write('{"step": 40, "kind": "train", "loss": 0.0')  # killed mid-line

  resumed = RunLog(workdir, is_primary=True)  # resumed from the step-20 checkpoint
  assert resumed.truncate_after(20) == 3
  for step in (30, 40):
    resumed.write(step, {"loss": 0.25, "learning_rate": 2e-4}, "train")
  resumed.close()
  lines = _read_jsonl(log.path)
  assert [(r["step"], r["kind"]) for r in lines] == [
      (10, "train"), (20, "train"), (20, "eval"), (30, "train"), (40, "train")]
  assert lines[3]["loss"] == 0.25  # the re-run's value, not the old one

  with pytest.raises(ValueError, match="kind"):
    RunLog(workdir, is_primary=True).write(1, {"loss": 1.0}, "test")


def test_non_primary_writes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  log = RunLog(workdir, is_primary=False)
  log.write(1, {"loss": 1.0}, "train")
  log.truncate_after(0)
  log.close()
  assert not os.path.exists(workdir)
  assert Progress(10, is_primary=False, every_steps=1).update(5) is None


def _read_events(path):
  """Reads a TFRecord file of Event protos, checking tensorboardX's masked CRCs."""
  from tensorboardX.crc32c import crc32c  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  events = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack(
          "<I", header[8:])
      assert length_crc == masked(header[:8])
      data = f.read(length)
      (data_crc,) = struct.unpack("<I", f.read(4))
      assert data_crc == masked(data)
      events.append(event_pb2.Event.FromString(data))
  return events


def _scalars(events):
  return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def test_tensorboard_events_readable(tmp_path):
  workdir = str(tmp_path)
  log = RunLog(workdir, is_primary=True)
  log.write(1, {"loss": 2.5, "learning_rate": 1e-3}, "train")
  log.write(2, {"loss": 1.5, "learning_rate": 2e-3}, "train")
  log.write(2, {"accuracy": 0.625}, "eval")
  log.close()
  files = sorted(os.listdir(log.tensorboard_dir))
  assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
  scalars = _scalars(_read_events(os.path.join(log.tensorboard_dir, files[0])))
  assert scalars == {
      ("train/loss", 1): 2.5, ("train/learning_rate", 1): pytest.approx(1e-3),
      ("train/loss", 2): 1.5, ("train/learning_rate", 2): pytest.approx(2e-3),
      ("eval/accuracy", 2): 0.625}

  resumed = RunLog(workdir, is_primary=True)
  resumed.truncate_after(1)
  resumed.write(2, {"loss": 0.5}, "train")
  resumed.close()
  files = sorted(os.listdir(log.tensorboard_dir))
  assert len(files) == 2  # the first file is kept, not overwritten
  events = _read_events(os.path.join(log.tensorboard_dir, files[1]))
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [2]  # TensorBoard hides the old file's steps >= 2
  assert _scalars(events) == {("train/loss", 2): 0.5}


def test_write_summary_is_atomic_and_overwrites(tmp_path):
  workdir = str(tmp_path / "run")
  write_summary(workdir, {"accuracy": np.float32(0.5), "steps": 10})
  path = write_summary(workdir, {"accuracy": jnp.float32(0.875), "steps": 20,
                                 "per_class": np.array([0.5, 1.0])})
  with open(path) as f:
    assert json.load(f) == {"accuracy": 0.875, "steps": 20, "per_class": [0.5, 1.0]}
  assert os.listdir(workdir) == ["summary.json"]  # no tmp file left behind


def test_progress_line_rate_and_eta():
  now = [0.0]
  out = io.StringIO()
  progress = Progress(1000, is_primary=True, every_steps=100, every_secs=30.0,
                      stream=out, clock=lambda: now[0])
  assert progress.update(0) is None  # starts the clock
  now[0] = 10.0
  assert progress.update(50, loss=1.0) is None  # neither 100 steps nor 30 s yet
  now[0] = 20.0
  line = progress.update(100, loss=jnp.float32(0.5))
  assert line == ("step 100/1000 [##------------------] 10.0% 5.00 steps/s "
                  "ETA 3m00s loss 0.5000")
  now[0] = 60.0  # 40 s later: the time limit triggers before 100 steps
  line = progress.update(150)
  assert line.startswith("step 150/1000 [###") and "1.25 steps/s ETA 11m20s" in line
  assert out.getvalue().splitlines() == [
      "step 100/1000 [##------------------] 10.0% 5.00 steps/s ETA 3m00s loss 0.5000",
      line]
  now[0] = 61.0
  assert progress.update(1000).startswith("step 1000/1000 [####################] 100.0%")


def test_loop_state_survives_the_checkpoint_meta_field_by_field():
  """Every field of LoopState, its Stats and its RunRecords, set away from its default, comes back from the
  meta a checkpoint stores (as JSON): a field added to the loop's state cannot be dropped on resume."""
  import dataclasses
  from bertjax.loop_state import LoopState, RunRecord, Stats

  def changed(cls, **given):
    values = {}
    for k, f in enumerate(dataclasses.fields(cls)):
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      values[f.name] = given.get(f.name, {int: 7 + k, float: 1.5 + k, str: f"s{k}"}.get(type(default), {"k": k}))
    return cls(**values)

  runs = [changed(RunRecord), changed(RunRecord, stopped_by="early stopping")]
  loop = changed(LoopState, stats=changed(Stats), runs=runs)
  assert loop != LoopState() and all(getattr(loop, f.name) != getattr(LoopState(), f.name)
                                     for f in dataclasses.fields(LoopState))
  assert LoopState.from_meta(json.loads(json.dumps(loop.to_meta())), step=0) == loop


def test_orbax_failure_records_are_one_line_and_others_are_kept():
  """The logging filters Checkpoints installs: an orbax record keeps one line (with the exception's first line
  when its message lacks it), asyncio's records of orbax's orphaned writes are dropped, the rest untouched."""
  code = "def write():\n  raise ValueError('OUT_OF_RANGE: Error writing x\\nmore detail')\n"
  scope = {}
  exec(compile(code, os.path.join(os.sep, "site", "orbax", "serialization.py"), "exec"), scope)
  caught = []
  for raise_it in (scope["write"], lambda: {}["ours"]):
    try:
      raise_it()
    except (ValueError, KeyError):
      caught.append(sys.exc_info())
  orbax_error, our_error = caught
  record = lambda path, exc, msg: logging.LogRecord("absl", logging.ERROR, path, 1, msg, (), exc)
  r = record("/site/orbax/future.py", orbax_error, "thread %s failed")
  r.args = ("writer",)
  assert checkpoint._orbax_errors_in_one_line(r) and r.exc_info is None
  assert r.getMessage() == "thread writer failed (ValueError: OUT_OF_RANGE: Error writing x)"
  r = record("/site/orbax/future.py", orbax_error, "failed: OUT_OF_RANGE: Error writing x")
  assert checkpoint._orbax_errors_in_one_line(r) and r.getMessage() == "failed: OUT_OF_RANGE: Error writing x"
  r = record("/site/bertjax/trainer.py", our_error, "ours")
  assert checkpoint._orbax_errors_in_one_line(r) and r.exc_info is our_error
  assert not checkpoint._orphaned_orbax_tasks(record("base_events.py", orbax_error, "Task exception was never retrieved"))
  assert checkpoint._orphaned_orbax_tasks(record("base_events.py", our_error, "Task exception was never retrieved"))
  assert checkpoint._orphaned_orbax_tasks(record("base_events.py", None, "something else"))
