"""Combining several fine-tuned models' outputs: soft and hard votes, fitted weights, averages."""

from typing import Sequence

import numpy as np

from bertjax.errors import UserError
from bertjax.metrics import softmax

# Vote totals closer than this count as tied, so weights like 0.1 + 0.2 vs 0.3 tie.
_TIE_RTOL = 1e-9


def _stack(members: Sequence[np.ndarray], what: str) -> np.ndarray:
  """Stacks member outputs to [M, ...], checking they all have one shape."""
  if len(members) == 0:
    raise UserError(f"an ensemble needs at least one member's {what}")
  shapes = {np.shape(m) for m in members}
  if len(shapes) != 1:
    raise UserError(f"ensemble members' {what} have different shapes: {sorted(shapes)}")
  return np.stack([np.asarray(m, np.float64) for m in members])


def _weights(weights: Sequence[float] | None, num_members: int) -> np.ndarray:
  """Member weights normalised to sum to 1 (uniform when None)."""
  if weights is None:
    return np.full(num_members, 1.0 / num_members)
  w = np.asarray(weights, np.float64).reshape(-1)
  if w.size != num_members:
    raise UserError(f"{w.size} ensemble weights given for {num_members} members")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise UserError(f"ensemble weights must be >= 0 with a positive sum, got {w.tolist()}")
  return w / w.sum()


def soft_vote(logits_list: Sequence[np.ndarray],
              weights: Sequence[float] | None = None) -> np.ndarray:
  """Weighted mean of the members' softmax probabilities: [M] x [N, C] -> [N, C]."""
  logits = _stack(logits_list, "logits")
  w = _weights(weights, logits.shape[0])
  return np.tensordot(w, softmax(logits), axes=1)


def hard_vote(logits_list: Sequence[np.ndarray],
              weights: Sequence[float] | None = None) -> np.ndarray:
  """Weighted majority vote of the members' argmax predictions: [M] x [N, C] -> [N] ids.

  Each member gives its weight (1 when `weights` is None) to its argmax class. Tie rule:
  among the classes with the most votes, pick the one with the higher summed probability
  across members (weighted the same way); if that ties too, the lower class id.
  """
  logits = _stack(logits_list, "logits")
  m, n, c = logits.shape
  w = _weights(weights, m)
  probs = softmax(logits)
  votes = np.zeros((n, c))
  for member_w, member_logits in zip(w, logits):
    votes[np.arange(n), member_logits.argmax(axis=-1)] += member_w
  top = np.isclose(votes, votes.max(axis=1, keepdims=True), rtol=_TIE_RTOL, atol=0)
  prob_sum = np.tensordot(w, probs, axes=1)
  best = np.where(top, prob_sum, -np.inf).max(axis=1, keepdims=True)
  finalists = top & np.isclose(prob_sum, best, rtol=_TIE_RTOL, atol=0)
  return finalists.argmax(axis=1)  # first True: the lowest id among the finalists


def fit_vote_weights(member_logits_on_heldout: Sequence[np.ndarray], labels: np.ndarray,
                     max_iters: int = 1000, tol: float = 1e-10) -> np.ndarray:
  """Soft-vote weights [M] (summing to 1) that minimise the held-out log loss.

  The soft vote is a mixture of the members' predictive distributions, so the best mixture
  weights come from expectation-maximisation on the held-out labels: each step sets a
  member's weight to its mean share of the probability given to the true label. The loss is
  convex in the weights and EM never increases it, so this converges to the optimum from the
  uniform start without a step size.
  """
  logits = _stack(member_logits_on_heldout, "held-out logits")
  m, n, c = logits.shape
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != n:
    raise UserError(f"{n} held-out rows but {labels.shape[0]} labels")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= c:
    raise UserError(f"held-out labels must be class ids in [0, {c})")
  # p_true[k, i]: member k's probability of example i's true label; the floor keeps the
  # log and the shares finite when a member is certain and wrong.
  p_true = np.maximum(softmax(logits)[:, np.arange(n), labels], 1e-300)
  w = np.full(m, 1.0 / m)
  for _ in range(max_iters):
    mix = w @ p_true
    new_w = (w[:, None] * p_true / mix).mean(axis=1)
    new_w /= new_w.sum()
    done = np.max(np.abs(new_w - w)) < tol
    w = new_w
    if done:
      break
  return w


def regression_average(preds_list: Sequence[np.ndarray],
                       weights: Sequence[float] | None = None) -> np.ndarray:
  """Weighted mean of the members' regression predictions: [M] x [N] -> [N]."""
  preds = _stack(preds_list, "predictions")
  return np.tensordot(_weights(weights, preds.shape[0]), preds, axes=1)
