"""Trial groups: K trials as one vmapped step give each trial what it gets alone, and the same workdir."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bertjax import demo_data, optim, trainer, trial_group
from bertjax.models import hf_weights
from bertjax.errors import UserError
from bertjax.workdir import load_run
from conftest import tiny_bert_with_tokenizer
from test_optim import make_cfg, make_optimizer, toy_params
from test_train import REPO, demo_config

# float32 products: with bfloat16 operands (matmul_dtype=auto on a CPU with bf16 dot instructions) the vmapped
# group's different summation order can flip an operand's bf16 rounding, and 40 steps turn that into ~3e-5 in
# the losses.
COMMON = {"train.max_steps": 20, "train.eval_every_steps": 10, "train.checkpoint_every_steps": 5,
          "train.log_every_steps": 1, "data.shuffle_seed": 5, "model.matmul_dtype": "float32"}
# Learning rate, weight decay, clip on/off, warmup and seed differ; trials 0 and 2 share a seed (and so a head).
VARIANTS = [{"optimizer.learning_rate": 3e-3},
            {"optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 0.0, "train.seed": 1},
            {"optimizer.learning_rate": 5e-3, "optimizer.clip_norm": 0.0, "optimizer.warmup_fraction": 0.3}]


def trial_configs(data, model, **extra):
  return [demo_config(data, model, **COMMON, **v, **extra) for v in VARIANTS]


def read_log(workdir, kind="train"):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
          if json.loads(l)["kind"] == kind]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("group")
  demo_data.write(root / "data", 256, 50, seed=0)
  return root, root / "data", tiny_bert_with_tokenizer(root / "model")


@pytest.fixture(scope="module")
def group_run(setup):
  root, data, model = setup
  workdirs = [root / f"g{k}" for k in range(len(VARIANTS))]
  summaries = trial_group.train_group(trial_configs(data, model), [str(w) for w in workdirs])
  return summaries, workdirs


@pytest.fixture(scope="module")
def single_runs(setup):
  root, data, model = setup
  workdirs = [root / f"s{k}" for k in range(len(VARIANTS))]
  summaries = [trainer.train_and_evaluate(c, str(w)) for c, w in zip(trial_configs(data, model), workdirs)]
  return summaries, workdirs


def assert_same_run(a, b, exact: bool):
  """Per-step losses, eval metrics, best and final params of two workdirs agree."""
  check = np.testing.assert_array_equal if exact else lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5)
  for kind in ("train", "eval"):
    la, lb = read_log(a, kind), read_log(b, kind)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    keys = ("loss", "accuracy", "learning_rate", "grad_norm") if kind == "train" else ("eval_loss", "accuracy", "macro_f1")
    for key in keys:
      check([r[key] for r in la], [r[key] for r in lb])
  ra, rb = load_run(a, "latest"), load_run(b, "latest")
  assert ra.step == rb.step
  jax.tree.map(check, ra.params, rb.params)
  sa, sb = (json.loads((Path(w) / "summary.json").read_text()) for w in (a, b))
  assert sa["best"]["step"] == sb["best"]["step"] and sa["finished"] == sb["finished"]


@pytest.mark.slow
def test_each_trial_matches_its_single_run(group_run, single_runs):
  (g_summaries, g_dirs), (s_summaries, s_dirs) = group_run, single_runs
  for k, (g, s) in enumerate(zip(g_dirs, s_dirs)):
    assert_same_run(g, s, exact=False)
    gs, ss = g_summaries[k], s_summaries[k]
    assert set(gs) == set(ss) | {"trial_group"} and gs["trial_group"]["index"] == k
    assert gs["final"]["eval_loss"] == pytest.approx(ss["final"]["eval_loss"], abs=1e-5)
    assert gs["best"]["eval_loss"] == pytest.approx(ss["best"]["eval_loss"], abs=1e-5)
    assert gs["finished"] and gs["steps"] == 20 and gs["epochs_completed"] == ss["epochs_completed"]
    # The same files, and the same kept checkpoints (latest and best), as the run alone.
    assert {p.name for p in g.iterdir()} == {p.name for p in s.iterdir()} - {"cache"}
    steps = lambda w: sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert steps(g) == steps(s)
    assert json.loads((g / "config.json").read_text()) == json.loads((s / "config.json").read_text())
  # The trials really differ (learning rates, seeds), so matching is not trivial.
  finals = [read_log(g)[-1]["loss"] for g in g_dirs]
  assert len({round(x, 4) for x in finals}) == len(finals)


def test_the_trials_read_the_checkpoint_once(setup, tmp_path, monkeypatch):
  """K trials load one checkpoint: it is read from disk once, its arrays shared (read-only), and not kept after."""
  _, data, model = setup
  reads = []
  real = hf_weights._read_tensors
  monkeypatch.setattr(hf_weights, "_read_tensors", lambda folder: reads.append(folder) or real(folder))
  group = trial_group.TrialGroup(trial_configs(data, model), [str(tmp_path / f"t{k}") for k in range(3)])
  assert len(reads) == 1 and len(group.trainers) == 3
  kernels = [t.loaded.params["encoder"]["layer_0"]["mlp_in"]["kernel"] for t in group.trainers]
  assert all(np.shares_memory(kernels[0], k) for k in kernels[1:]) and not kernels[0].flags.writeable
  heads = [t.loaded.params["head"]["out"]["kernel"] for t in group.trainers]
  assert not np.array_equal(heads[0], heads[1]) and np.array_equal(heads[0], heads[2])  # seeds 0, 1, 0
  hf_weights.load(str(model))
  assert len(reads) == 2  # outside the group, a load reads again


def test_group_key_separates_shape_changing_configs(setup):
  _, data, model = setup
  base = demo_config(data, model, **COMMON)
  key = trial_group.group_key
  same = [{"optimizer.learning_rate": 1e-4}, {"optimizer.weight_decay": 0.0}, {"optimizer.eps": 1e-6},
          {"optimizer.b1": 0.8}, {"optimizer.b2": 0.98}, {"optimizer.warmup_fraction": 0.0},
          {"optimizer.clip_norm": 0.0}, {"train.seed": 3}]
  for change in same:
    assert key(demo_config(data, model, **COMMON, **change)) == key(base), change
  other = [{"data.max_length": 64}, {"model.name_or_path": "/elsewhere"}, {"train.global_batch_size": 32},
           {"model.dtype": "bfloat16"}, {"model.matmul_dtype": "bfloat16"}, {"optimizer.name": "lamb"},
           {"optimizer.schedule": "cosine"}, {"data.shuffle_seed": 6}, {"train.max_steps": 41},
           {"optimizer.layerwise_lr_decay": 0.9}]
  for change in other:
    assert key(demo_config(data, model, **{**COMMON, **change})) != key(base), change
  # Without a fixed shuffle seed, train.seed sets the batch order, so it separates groups.
  unfixed = {**COMMON, "data.shuffle_seed": -1}
  assert key(demo_config(data, model, **unfixed, **{"train.seed": 3})) != key(demo_config(data, model, **unfixed))
  with pytest.raises(UserError, match="differ in data.max_length"):
    trial_group.TrialGroup([base, demo_config(data, model, **{**COMMON, "data.max_length": 64})], ["a", "b"])


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_injected_optimizer_matches_the_single_run_optimizer(name):
  """One vmapped update of stacked states equals each trial's own optimizer."""
  params = toy_params()
  cfgs = [make_cfg(name=name, learning_rate=1e-2, weight_decay=0.0, clip_norm=0.0, schedule="linear",
                   warmup_fraction=0.2, layerwise_lr_decay=0.8),
          make_cfg(name=name, learning_rate=3e-2, weight_decay=0.1, clip_norm=1.0, schedule="linear",
                   warmup_fraction=0.4, layerwise_lr_decay=0.8)]
  plans = [optim.plan_optimizer(c, 10, 32) for c in cfgs]
  varying = tuple(k for k in optim.HPARAMS if plans[0].hparams[k] != plans[1].hparams[k])
  assert varying == ("learning_rate", "warmup_steps", "weight_decay", "clip_norm")
  txs = [optim.make_injected_optimizer(p, varying, params) for p in plans]
  stacked = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  state, group_params = stacked(*(t.init(params) for t in txs)), stacked(params, params)

  def apply(tx, g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  group_update = jax.jit(jax.vmap(lambda g, s, p: apply(txs[0], g, s, p), in_axes=(None, 0, 0)))
  singles = [make_optimizer(c, params, 10, 32)[0] for c in cfgs]
  alone = [(params, t.init(params)) for t in singles]
  rng = np.random.default_rng(0)
  for _ in range(5):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)
    group_params, state = group_update(g, state, group_params)
    alone = [jax.jit(lambda g, s, p, tx=tx: apply(tx, g, s, p))(g, s, p) for tx, (p, s) in zip(singles, alone)]
  for k, (p, s) in enumerate(alone):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-6, atol=1e-7), group_params, p)
    # The state's leaves are the single run's, in the same order (what a trial's checkpoint holds).
    for a, b in zip(jax.tree.leaves(state.inner), jax.tree.leaves(s)):
      np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_killed_group_resumes_to_the_uninterrupted_result(setup, group_run):
  root, data, model = setup
  _, straight = group_run
  workdirs = [root / f"killed{k}" for k in range(len(VARIANTS))]
  script = ("import sys; sys.path.insert(0, 'tests')\n"
            "from test_trial_group import trial_configs\n"
            "from bertjax.trial_group import train_group\n"
            f"train_group(trial_configs({str(data)!r}, {str(model)!r}), {[str(w) for w in workdirs]!r}, "
            f"{str(root / 'killed_group')!r})\n")
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  group_ckpts = root / "killed_group" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if any(p.name.isdigit() and int(p.name) >= 5 for p in group_ckpts.glob("*")):
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the group finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  summaries = trial_group.train_group(trial_configs(data, model), [str(w) for w in workdirs],
                                      str(root / "killed_group"))
  for k, (a, b) in enumerate(zip(workdirs, straight)):
    assert_same_run(a, b, exact=True)
    assert summaries[k]["best"] == group_run[0][k]["best"] and summaries[k]["finished"]
  # A finished group re-run changes nothing.
  before = [(w / "metrics.jsonl").read_text() for w in workdirs]
  trial_group.train_group(trial_configs(data, model), [str(w) for w in workdirs], str(root / "killed_group"))
  assert [(w / "metrics.jsonl").read_text() for w in workdirs] == before


@pytest.mark.slow
def test_trial_save_cut_short_is_completed_on_resume(setup, group_run, monkeypatch):
  """Killed after the group's checkpoint of a step but before a trial's own: the rerun writes it."""
  root, data, model = setup
  _, straight = group_run
  workdirs = [str(root / f"cut{k}") for k in range(len(VARIANTS))]

  class Killed(Exception):
    pass

  real = trial_group.save_run

  def cut(checkpoints, state, loop):
    if loop.step == 15 and checkpoints.directory.startswith(workdirs[1]):
      raise Killed()
    return real(checkpoints, state, loop)

  monkeypatch.setattr(trial_group, "save_run", cut)
  with pytest.raises(Killed):
    trial_group.train_group(trial_configs(data, model), workdirs)
  monkeypatch.setattr(trial_group, "save_run", real)
  assert load_run(workdirs[0], "latest").step == 15 and load_run(workdirs[1], "latest").step == 10
  trial_group.train_group(trial_configs(data, model), workdirs)
  for a, b in zip(workdirs, straight):
    assert_same_run(a, b, exact=True)


@pytest.mark.slow
def test_group_without_its_group_workdir_goes_on_from_the_trials(setup, group_run, monkeypatch, tmp_path):
  """The group workdir lost (or the trials regrouped): the trials' own checkpoints, all of one step, are stacked."""
  root, data, model = setup
  _, straight = group_run
  workdirs = [str(root / f"regroup{k}") for k in range(len(VARIANTS))]
  group_dir = tmp_path / "first_group"

  class Killed(Exception):
    pass

  real = trial_group.save_run

  def cut(checkpoints, state, loop):
    if loop.step == 15:
      raise Killed()
    return real(checkpoints, state, loop)

  monkeypatch.setattr(trial_group, "save_run", cut)
  with pytest.raises(Killed):
    trial_group.train_group(trial_configs(data, model), workdirs, str(group_dir))
  monkeypatch.setattr(trial_group, "save_run", real)
  assert [load_run(w, "latest").step for w in workdirs] == [10, 10, 10]
  trial_group.train_group(trial_configs(data, model), workdirs, str(tmp_path / "second_group"))
  for a, b in zip(workdirs, straight):
    assert_same_run(a, b, exact=True)


@pytest.mark.slow
def test_rerun_with_other_varying_hyperparameters_is_refused(setup, group_run):
  _, data, model = setup
  _, workdirs = group_run
  configs = trial_configs(data, model)
  configs[1].optimizer.weight_decay = 0.01  # now equal in every trial: the stacked state has no slot for it
  before = [(w / "metrics.jsonl").read_text() for w in workdirs]
  with pytest.raises(UserError, match="this run was trained with optimizer.weight_decay=0.0, not 0.01"):
    trial_group.TrialGroup(configs, [str(w) for w in workdirs])
  for c in configs:  # a run alone would now go on with the change; the group still cannot
    c.train.allow_changed_config = True
  with pytest.raises(UserError, match="this group was started with varying"):
    trial_group.TrialGroup(configs, [str(w) for w in workdirs])
  assert [(w / "metrics.jsonl").read_text() for w in workdirs] == before


@pytest.mark.slow
def test_evaluate_cli_on_a_group_trial(group_run, tmp_path):
  summaries, workdirs = group_run
  out = tmp_path / "eval.json"
  result = subprocess.run([sys.executable, "-m", "bertjax.evaluate", "--workdir", str(workdirs[1]), "--json",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  model = json.loads(out.read_text())["models"][0]
  assert model["checkpoint_step"] == summaries[1]["best"]["step"]
  assert model["metrics"]["loss"] == pytest.approx(summaries[1]["best"]["eval_loss"], abs=1e-5)


@pytest.mark.slow
def test_a_diverging_trial_stops_alone(setup, tmp_path):
  _, data, model = setup
  steps = {"train.max_steps": 12, "train.eval_every_steps": 6, "train.checkpoint_every_steps": 1}
  configs = [demo_config(data, model, **{**COMMON, **steps}),
             demo_config(data, model, **{**COMMON, **steps, "optimizer.learning_rate": 1e30,
                                         "optimizer.clip_norm": 0.0, "optimizer.warmup_fraction": 0.0})]
  ok, bad = trial_group.train_group(configs, [str(tmp_path / "ok"), str(tmp_path / "bad")])
  assert ok["finished"] and ok["steps"] == 12 and np.isfinite(ok["final"]["eval_loss"])
  assert bad["stopped_by"].startswith("non-finite loss") and not bad["finished"]
  # What the run alone would raise; and like that run, no summary.json (no eval had run yet).
  assert bad["error"].startswith(f"non-finite loss (nan) at step {bad['steps']}; stopped. The last good checkpoint")
  assert not (tmp_path / "bad" / "summary.json").exists()
  kept = load_run(tmp_path / "bad", "latest")
  assert kept.step == bad["steps"] - 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(kept.params))
