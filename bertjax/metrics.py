"""Classification metrics in numpy, from the confusion matrix (tests check them against scikit-learn, which is
only a test dependency); regression correlations from scipy.

No jax here: the evaluator gathers logits to the host once and calls these. Undefined ratios
(a class never predicted, or absent from the labels) count as 0, like scikit-learn's
`zero_division=0`.
"""

import math
import os
import warnings
from typing import Any, Sequence

import numpy as np

from bertjax.errors import UserError


# The metrics `train.best_metric` may name, with the direction that is better; an eval's scalars (metrics.jsonl's
# eval lines, summary.json's best and final entries) use these names.
BEST_MODES = {"eval_loss": "min", "accuracy": "max", "macro_f1": "max", "mcc": "max", "pearson": "max",
              "spearman": "max"}
TASK_METRICS = {"classification": ("eval_loss", "accuracy", "macro_f1", "mcc"),
                "regression": ("eval_loss", "pearson", "spearman")}


def is_better(scalars: dict, best: dict | None, metric: str) -> bool:
  """Whether an eval (`scalars`) beats the best one so far (`best`, None at first) by `metric`: strictly, so the
  earlier eval wins a tie; a NaN (a constant prediction's correlation) never wins, and loses to any number."""
  value = float(scalars[metric])
  if math.isnan(value):
    return best is None
  if best is None or best.get(metric) is None or math.isnan(float(best[metric])):
    return True
  return value < best[metric] if BEST_MODES[metric] == "min" else value > best[metric]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den, 0 where den == 0."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise log-softmax, shifted by the row max so large logits do not overflow."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
  return np.exp(log_softmax(logits))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """[C, C] int counts, rows are true labels, columns predictions."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, preds), 1)
  return cm


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  if not np.issubdtype(labels.dtype, np.integer):
    raise UserError(f"labels must be integer class ids, got dtype {labels.dtype}")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise UserError(f"label {int(bad[0])} is outside the {num_classes} classes [0, {num_classes})")
  return labels.astype(np.int64)


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           label_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Metrics for single-label classification from logits [N, C] and integer labels [N].

  Predictions are the argmax (ties go to the lower class id). `macro_f1` averages over the
  classes that occur in the labels or the predictions, as scikit-learn does by default;
  the per-class lists cover all C classes. `loss` is the mean cross-entropy (log loss).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"logits must be [N, C] with N > 0, got shape {logits.shape}")
  n, c = logits.shape
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != n:
    raise ValueError(f"{n} logits rows but {labels.shape[0]} labels")
  labels = _check_labels(labels, c)
  if label_names is not None and len(label_names) != c:
    raise UserError(f"{len(label_names)} label names given for {c} classes")

  preds = logits.argmax(axis=-1)
  cm = confusion_matrix(labels, preds, c)
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1).astype(np.float64)
  predicted = cm.sum(axis=0).astype(np.float64)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  # 2tp / (2tp + fp + fn) is the harmonic mean of precision and recall, and 0 when both are.
  f1 = _safe_div(2 * tp, support + predicted)
  present = (support + predicted) > 0

  # Multi-class MCC (Gorodkin's R_K) from the confusion matrix's margins.
  total, correct = float(n), tp.sum()
  cov_tp = correct * total - float(np.dot(predicted, support))
  var_p = total**2 - float(np.dot(predicted, predicted))
  var_t = total**2 - float(np.dot(support, support))
  mcc = cov_tp / np.sqrt(var_p * var_t) if var_p * var_t > 0 else 0.0

  loss = -log_softmax(logits)[np.arange(n), labels].mean()
  out = {
      "accuracy": float(correct / total),
      "macro_f1": float(f1[present].mean()),
      "micro_f1": float(correct / total),  # single-label: micro P = micro R = accuracy
      "weighted_f1": float(np.dot(f1, support) / total),
      "precision": precision.tolist(),
      "recall": recall.tolist(),
      "f1": f1.tolist(),
      "support": support.astype(np.int64).tolist(),
      "mcc": float(mcc),
      "confusion_matrix": cm.tolist(),
      "loss": float(loss),
      "num_examples": int(n),
  }
  if label_names is not None:
    out["label_names"] = [str(name) for name in label_names]
  return out


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """MSE, Pearson and Spearman correlations (scipy's; NaN when a side is constant) for predictions [N] (or [N, 1])
  and labels [N]."""
  preds = np.asarray(preds, np.float64)
  if preds.ndim == 2 and preds.shape[1] == 1:
    preds = preds[:, 0]
  labels = np.asarray(labels, np.float64).reshape(-1)
  if preds.ndim != 1 or preds.shape != labels.shape or preds.size == 0:
    raise ValueError(f"preds {preds.shape} and labels {labels.shape} must be equal, non-empty [N]")
  import scipy.stats  # in jax's dependencies; imported here, where it is needed
  mse = float(np.mean((preds - labels) ** 2))
  with warnings.catch_warnings():  # a constant side (an untrained head) gives NaN, not a warning per eval
    warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
    pearson, spearman = scipy.stats.pearsonr(preds, labels)[0], scipy.stats.spearmanr(preds, labels)[0]
  return {"mse": mse, "pearson": float(pearson), "spearman": float(spearman), "loss": mse,
          "num_examples": int(preds.size)}


def format_confusion_table(cm: Sequence[Sequence[int]], names: Sequence[str]) -> str:
  """Plain-text table, rows = true label, columns = predicted label."""
  cm = np.asarray(cm)
  if cm.shape != (len(names), len(names)):
    raise ValueError(f"confusion matrix {cm.shape} does not match {len(names)} names")
  corner = "true \\ pred"
  row_w = max([len(corner)] + [len(str(n)) for n in names])
  col_w = max([len(str(n)) for n in names] + [len(str(v)) for v in cm.flat])
  lines = [" ".join([corner.ljust(row_w)] + [str(n).rjust(col_w) for n in names])]
  for name, row in zip(names, cm):
    lines.append(" ".join([str(name).ljust(row_w)] + [str(v).rjust(col_w) for v in row]))
  return "\n".join(lines)


def save_confusion_png(cm: Sequence[Sequence[int]], names: Sequence[str], path: str) -> None:
  """Writes the confusion matrix as a heat map with counts, rows = true, columns = predicted."""
  # The Figure + Agg canvas API avoids pyplot's global state and never needs a display.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  cm = np.asarray(cm)
  k = len(names)
  if cm.shape != (k, k):
    raise ValueError(f"confusion matrix {cm.shape} does not match {k} names")
  size = 1.5 + 0.6 * k
  fig = Figure(figsize=(size, size))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.imshow(cm, cmap="Blues")
  ax.set_xticks(range(k), [str(n) for n in names], rotation=45, ha="right")
  ax.set_yticks(range(k), [str(n) for n in names])
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  threshold = cm.max() / 2 if cm.size else 0
  for i in range(k):
    for j in range(k):
      ax.text(j, i, str(cm[i, j]), ha="center", va="center",
              color="white" if cm[i, j] > threshold else "black")
  fig.tight_layout()
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, dpi=100)
