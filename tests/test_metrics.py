"""Tests for bertjax.metrics (against scikit-learn and by hand) and bertjax.ensemble."""

import itertools

import matplotlib.image
import numpy as np
import pytest
from sklearn import metrics as skm

from bertjax import ensemble, metrics
from bertjax.errors import UserError


def random_case(seed: int, n: int = 80, c: int = 5):
  """Random logits where class 3 is never predicted and class 4 never appears at all."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c)) * 2.0
  # Class 3 always scores just below the lowest other logit: never the argmax, yet its
  # probability stays far above the clipping scikit-learn's log_loss applies.
  logits[:, 3] = logits[:, :3].min(axis=1) - 0.5
  logits[:, 4] = -50.0
  labels = rng.integers(0, 4, size=n)  # class 3 does occur in the labels
  return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_classification_matches_sklearn(seed):
  logits, labels = random_case(seed)
  c = logits.shape[1]
  preds = logits.argmax(-1)
  assert 3 in labels and 3 not in preds and 4 not in labels  # the case is what it claims
  got = metrics.classification_metrics(logits, labels)

  assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
  for avg in ("macro", "micro", "weighted"):
    want = skm.f1_score(labels, preds, average=avg, zero_division=0)
    assert got[f"{avg}_f1"] == pytest.approx(want, abs=1e-12), avg
  p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=range(c),
                                                   zero_division=0)
  np.testing.assert_allclose(got["precision"], p, atol=1e-12)
  np.testing.assert_allclose(got["recall"], r, atol=1e-12)
  np.testing.assert_allclose(got["f1"], f, atol=1e-12)
  assert got["support"] == s.tolist()
  assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)
  assert got["confusion_matrix"] == skm.confusion_matrix(labels, preds, labels=range(c)).tolist()
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  assert got["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(c)), rel=1e-9)
  assert got["num_examples"] == 80
  assert got["precision"][3] == 0.0 and got["recall"][3] == 0.0  # never predicted


def test_perfect_and_constant_predictions():
  labels = np.array([0, 1, 2, 1])
  perfect = metrics.classification_metrics(np.eye(3)[labels] * 5, labels, ["a", "b", "c"])
  assert perfect["mcc"] == pytest.approx(1.0)
  assert perfect["macro_f1"] == pytest.approx(1.0)
  assert perfect["label_names"] == ["a", "b", "c"]
  constant = metrics.classification_metrics(np.tile([3.0, 0.0, 0.0], (4, 1)), labels)
  assert constant["mcc"] == 0.0 == skm.matthews_corrcoef(labels, [0, 0, 0, 0])
  assert constant["accuracy"] == 0.25


def test_loss_is_stable_for_huge_logits():
  got = metrics.classification_metrics(np.array([[1000.0, 0.0], [0.0, 3000.0]]), np.array([1, 1]))
  assert got["loss"] == pytest.approx(500.0)  # (1000 + 0) / 2


def test_bad_labels_raise_user_error():
  with pytest.raises(UserError, match="label 3"):
    metrics.classification_metrics(np.zeros((2, 3)), np.array([0, 3]))
  with pytest.raises(UserError, match="2 label names"):
    metrics.classification_metrics(np.zeros((2, 3)), np.array([0, 1]), ["a", "b"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_metrics_by_hand(seed):
  rng = np.random.default_rng(seed)
  labels = np.round(rng.uniform(0, 5, size=50), 1)  # rounded so ranks have ties
  preds = np.round(labels + rng.normal(scale=1.0, size=50), 0)
  got = metrics.regression_metrics(preds[:, None], labels)
  assert got["mse"] == pytest.approx(np.mean((preds - labels) ** 2), rel=1e-12)
  assert got["loss"] == got["mse"]
  # By hand: tied values share the mean of the ranks they span.
  ranks = lambda x: np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])
  assert got["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1], abs=1e-12)
  assert got["spearman"] == pytest.approx(np.corrcoef(ranks(preds), ranks(labels))[0, 1], abs=1e-12)
  assert got["num_examples"] == 50
  constant = metrics.regression_metrics(np.full(50, 2.0), labels)
  assert np.isnan(constant["pearson"]) and np.isnan(constant["spearman"]) and constant["mse"] > 0


def test_confusion_table_text():
  table = metrics.format_confusion_table([[5, 0], [12, 3]], ["neg", "pos"])
  assert table.splitlines() == [
      "true \\ pred neg pos",
      "neg           5   0",
      "pos          12   3",
  ]


def test_confusion_png_is_written(tmp_path):
  path = tmp_path / "sub" / "cm.png"
  metrics.save_confusion_png([[5, 1, 0], [2, 7, 1], [0, 0, 4]], ["a", "b", "c"], str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(str(path))
  assert image.ndim == 3 and min(image.shape[:2]) >= 100
  assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def logits_of(probs) -> np.ndarray:
  return np.log(np.asarray(probs, np.float64))


A = logits_of([[0.2, 0.8], [0.6, 0.4]])
B = logits_of([[0.9, 0.1], [0.1, 0.9]])


def test_soft_vote_is_the_mean_probability():
  np.testing.assert_allclose(ensemble.soft_vote([A, B]), [[0.55, 0.45], [0.35, 0.65]])
  # weights 3:1 -> 0.75 A + 0.25 B, which flips the first example from class 0 to class 1.
  weighted = ensemble.soft_vote([A, B], weights=[3, 1])
  np.testing.assert_allclose(weighted, [[0.375, 0.625], [0.475, 0.525]])
  assert weighted.argmax(-1).tolist() == [1, 1]


def test_hard_vote_tie_rule():
  a = logits_of([[0.5, 0.3, 0.2],     # votes 0 | 2: sums 0.6 / 0.8 -> 2
                 [0.7, 0.1, 0.2],     # votes 0 | 2: sums 0.9 / 0.9 -> lower id 0
                 [0.45, 0.44, 0.11],  # votes 0 | 2: class 1 has the top sum but no votes -> 0
                 [0.2, 0.7, 0.1]])    # votes 1 | 1 -> 1
  b = logits_of([[0.1, 0.3, 0.6],
                 [0.2, 0.1, 0.7],
                 [0.11, 0.44, 0.45],
                 [0.3, 0.6, 0.1]])
  assert ensemble.hard_vote([a, b]).tolist() == [2, 0, 0, 1]
  assert ensemble.hard_vote([b, a]).tolist() == [2, 0, 0, 1]  # member order does not matter


def test_hard_vote_weights():
  x = logits_of([[0.6, 0.4]])  # votes 0
  y = logits_of([[0.8, 0.2]])
  z = logits_of([[0.1, 0.9]])  # votes 1
  assert ensemble.hard_vote([x, y, z]).tolist() == [0]
  assert ensemble.hard_vote([x, y, z], weights=[1, 1, 3]).tolist() == [1]
  # Votes 0.1 + 0.2 vs 0.3 tie despite float rounding; then summed probabilities decide:
  # class 0: (0.1*0.6 + 0.2*0.8 + 0.3*0.1) / 0.6 = 0.4167, class 1: 0.5833 -> 1.
  assert ensemble.hard_vote([x, y, z], weights=[0.1, 0.2, 0.3]).tolist() == [1]
  # Same tie, but now class 0 has the larger weighted sum.
  w = logits_of([[0.45, 0.55]])
  assert ensemble.hard_vote([x, y, w], weights=[0.1, 0.2, 0.3]).tolist() == [0]


def soft_vote_loss(members, labels, w) -> float:
  probs = ensemble.soft_vote(members, w)
  return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def held_out_members(seed: int, num_members: int):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, size=200)
  members = []
  for quality in (3.0, 1.0, 0.0)[:num_members]:  # a good, a weak and a pure-noise member
    members.append(rng.normal(size=(200, 3)) + quality * np.eye(3)[labels])
  return members, labels


def test_fit_vote_weights_minimises_log_loss_two_members():
  members, labels = held_out_members(0, 2)
  w = ensemble.fit_vote_weights(members, labels)
  assert w.sum() == pytest.approx(1.0) and w[0] > w[1]
  grid = min(soft_vote_loss(members, labels, [t, 1 - t]) for t in np.linspace(0, 1, 401))
  fitted = soft_vote_loss(members, labels, w)
  assert fitted <= grid + 1e-9
  assert fitted < soft_vote_loss(members, labels, None) - 1e-3  # better than uniform


def test_fit_vote_weights_minimises_log_loss_three_members():
  members, labels = held_out_members(1, 3)
  w = ensemble.fit_vote_weights(members, labels)
  assert w[0] > w[1] > w[2] >= 0
  steps = np.linspace(0, 1, 51)
  grid = min(soft_vote_loss(members, labels, [s, t, max(1 - s - t, 0.0)])
             for s, t in itertools.product(steps, steps) if s + t <= 1 + 1e-9)
  assert soft_vote_loss(members, labels, w) <= grid + 1e-9


def test_regression_average_and_bad_inputs():
  np.testing.assert_allclose(ensemble.regression_average([[1.0, 2.0], [3.0, 6.0]]), [2.0, 4.0])
  np.testing.assert_allclose(ensemble.regression_average([[1.0, 2.0], [3.0, 6.0]], [1, 3]),
                             [2.5, 5.0])
  with pytest.raises(UserError, match="different shapes"):
    ensemble.soft_vote([np.zeros((2, 3)), np.zeros((2, 4))])
  with pytest.raises(UserError, match="weights"):
    ensemble.soft_vote([A, B], weights=[1, -1])
  with pytest.raises(UserError, match="3 ensemble weights"):
    ensemble.hard_vote([A, B], weights=[1, 1, 1])
