"""Evaluating restored runs alone and as ensembles: votes, metrics against scikit-learn, CLI errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from bertjax import demo_data, trainer
from bertjax.errors import UserError
from bertjax.evaluate import Predictor, evaluate_members, parse_members
from bertjax.models.heads import SequenceClassifier
from bertjax.workdir import load_run
from conftest import tiny_bert_with_tokenizer, to_bertjax
from test_train import demo_config

REPO = Path(__file__).resolve().parents[1]
STEPS = {"train.max_steps": 96, "train.eval_every_steps": 48}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two tiny runs that differ only in their seed, their data, and a held-out split."""
  root = tmp_path_factory.mktemp("evaluate")
  demo_data.write(root / "data", 512, 100, seed=0)
  demo_data.write(root / "heldout", 10, 80, seed=1)
  model = tiny_bert_with_tokenizer(root / "model")
  workdirs = []
  for seed in (0, 1):
    workdir = root / f"run{seed}"
    trainer.train_and_evaluate(demo_config(root / "data", model, **STEPS, **{"train.seed": seed}), str(workdir))
    workdirs.append(workdir)
  return root, workdirs


def _dev(root):
  rows = [l.split("\t") for l in (root / "data" / "dev.tsv").read_text().splitlines()[1:]]
  return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def _probs(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "bertjax.evaluate", *map(str, args)], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.fixture(scope="module")
def predictor():
  """Shared, so later evaluations reuse the compiled steps."""
  return Predictor()


@pytest.fixture(scope="module")
def soft(runs, predictor):
  _, workdirs = runs
  return evaluate_members([(str(w), "best") for w in workdirs], how="soft", predictor=predictor)


@pytest.fixture(scope="module")
def hard_cli(runs):
  """The command line's hard-vote ensemble of the two runs, with its JSON and stdout."""
  root, (a, b) = runs
  out = root / "hard.json"
  result = _cli("--workdir", a, "--workdir", b, "--vote", "hard", "--json", out)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text()), result.stdout, out


def test_member_logits_match_a_plain_forward_pass(runs, soft):
  """Packed, batched, masked evaluation gives each example the logits of running it alone."""
  root, (a, _) = runs
  from transformers import AutoTokenizer
  run = load_run(a, "best")
  tok = AutoTokenizer.from_pretrained(str(a / "model"))
  texts, labels = _dev(root)
  np.testing.assert_array_equal(soft.labels, labels)
  rows = [0, 1, 57, 99]  # first, second, middle and the last (partial) batch
  enc = tok([texts[i] for i in rows], truncation=True, max_length=run.config.data.max_length, padding=True)
  inputs = to_bertjax(*(np.array(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
  model = SequenceClassifier(run.model_cfg)
  alone = jax.jit(lambda p, x: model.apply({"params": p}, **x, deterministic=True))(run.params, inputs)
  np.testing.assert_allclose(soft.member_logits[0][rows], np.asarray(alone)[:, 0], atol=1e-5)


def test_soft_vote_is_the_hand_computed_average(runs, soft):
  root, _ = runs
  _, labels = _dev(root)
  avg = (_probs(soft.member_logits[0].astype(np.float64)) + _probs(soft.member_logits[1].astype(np.float64))) / 2
  np.testing.assert_allclose(soft.ensemble_output, avg, atol=1e-12)
  m = soft.ensemble["metrics"]
  assert m["accuracy"] == pytest.approx(np.mean(avg.argmax(1) == labels))
  assert m["loss"] == pytest.approx(skm.log_loss(labels, avg, labels=[0, 1]), rel=1e-9)
  assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, avg.argmax(1), average="macro"))
  assert soft.ensemble["vote"] == "soft" and m["num_examples"] == 100
  # The two members are different models, so the average is not either one of them.
  assert not np.allclose(soft.member_logits[0], soft.member_logits[1], atol=1e-3)


def _sklearn(labels, logits):
  preds = logits.argmax(1)
  p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=0)
  return {"accuracy": skm.accuracy_score(labels, preds), "macro_f1": skm.f1_score(labels, preds, average="macro"),
          "micro_f1": skm.f1_score(labels, preds, average="micro"), "mcc": skm.matthews_corrcoef(labels, preds),
          "precision": p, "recall": r, "f1": f, "support": s,
          "confusion_matrix": skm.confusion_matrix(labels, preds, labels=[0, 1]),
          "loss": skm.log_loss(labels, _probs(logits.astype(np.float64)), labels=[0, 1])}


def test_cli_metrics_equal_sklearn_on_the_predictions(runs, soft, hard_cli):
  root, workdirs = runs
  report, stdout, out = hard_cli
  _, labels = _dev(root)
  assert [m["workdir"] for m in report["models"]] == [str(w) for w in workdirs]
  for member, logits in zip(report["models"], soft.member_logits):
    got, want = member["metrics"], _sklearn(labels, logits)
    assert member["checkpoint"] == "best" and got["num_examples"] == 100
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    assert f"accuracy {want['accuracy']:.4f}" in stdout and f"mcc {want['mcc']:.4f}" in stdout
    cm = want["confusion_matrix"]
    assert any(line.split() == ["0", str(cm[0, 0]), str(cm[0, 1])] for line in stdout.splitlines())
  for name in ("model0", "model1", "ensemble"):
    assert (out.parent / f"hard_confusion_{name}.png").stat().st_size > 1000


def test_hard_vote_ties_follow_the_documented_rule(runs, soft, hard_cli):
  """Two members tie whenever they disagree: the higher summed probability wins (then the lower id)."""
  root, _ = runs
  report, _, _ = hard_cli
  _, labels = _dev(root)
  la, lb = soft.member_logits
  pa, pb = la.argmax(1), lb.argmax(1)
  summed = _probs(la.astype(np.float64)) + _probs(lb.astype(np.float64))
  by_prob = np.where(summed[:, 1] > summed[:, 0], 1, 0)
  expected = np.where(pa == pb, pa, by_prob)
  disagree = pa != pb
  assert disagree.sum() >= 3, "the two runs never disagree: the tie rule is not exercised"
  # Neither member alone gives the vote, so the rule is what decides.
  assert (expected != pa).any() and (expected != pb).any()
  m = report["ensemble"]["metrics"]
  assert report["ensemble"]["vote"] == "hard" and m["loss"] is None
  np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(labels, expected, labels=[0, 1]))
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, expected))
  assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, expected))


def test_weighted_votes(runs, soft, predictor):
  root, workdirs = runs
  pairs = [(str(w), "best") for w in workdirs]
  only_b = evaluate_members(pairs, how="weighted", weights=[0.0, 2.0], predictor=predictor)
  assert only_b.ensemble["weights"] == [0.0, 1.0]
  for key in ("accuracy", "macro_f1", "loss"):
    assert only_b.ensemble["metrics"][key] == pytest.approx(soft.members[1]["metrics"][key], rel=1e-6)
  fitted = evaluate_members(pairs, how="weighted", heldout=str(root / "heldout" / "dev.tsv"), predictor=predictor)
  w = np.array(fitted.ensemble["weights"])
  assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
  np.testing.assert_allclose(fitted.ensemble_output, w[0] * _probs(soft.member_logits[0].astype(np.float64))
                             + w[1] * _probs(soft.member_logits[1].astype(np.float64)), atol=1e-9)
  with pytest.raises(UserError, match="needs either --weights or --heldout"):
    evaluate_members(pairs, how="weighted")


def test_several_checkpoints_of_one_run_share_compilations(runs):
  _, (a, _) = runs
  steps = sorted(int(p.name) for p in (a / "checkpoints").iterdir() if p.name.isdigit())
  assert parse_members([str(a), str(a)], ["best", "latest"]) == [(str(a), "best"), (str(a), "latest")]
  pairs = parse_members([str(a), str(a)], ["latest", str(steps[0])])
  fresh = Predictor()
  single = evaluate_members(pairs[:1], predictor=fresh)
  compiled = fresh.num_compilations
  both = evaluate_members(pairs, how="soft", predictor=fresh)
  assert [m["checkpoint_step"] for m in both.members] == [steps[-1], steps[0]]
  # One architecture, one dataset: the second checkpoint reuses the first one's executables.
  assert fresh.num_compilations == compiled >= 1 and single.ensemble is None
  with pytest.raises(UserError, match="2 --checkpoint values for 3 --workdir"):
    parse_members([str(a)] * 3, ["best", "latest"])


def test_label_mapping_disagreement_is_one_line_naming_both(runs, tmp_path):
  _, (a, b) = runs
  other = tmp_path / "renamed"
  shutil.copytree(b, other)
  (other / "labels.json").write_text(json.dumps({"task": "classification", "label_names": ["neg", "pos"]}))
  result = _cli("--workdir", a, "--workdir", other)
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert str(a) in errors[0] and str(other) in errors[0] and "label mappings differ" in errors[0]
