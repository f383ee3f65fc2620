"""The jitted evaluator: per-example logits over a whole split (last batch masked, never dropped)."""

import numpy as np
import jax
from jax.experimental import multihost_utils

from bertjax import metrics as metrics_lib
from bertjax import sharding
from bertjax.data.batching import Batcher
from bertjax.data.prefetch import Prefetch
from bertjax.models.heads import SequenceClassifier
from bertjax.step import CompiledByShape, make_eval_step


def _host(x: jax.Array) -> np.ndarray:
  """The whole (global) array on this host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """Compiles one eval step per batch shape and assembles logits in dataset order."""

  def __init__(self, model: SequenceClassifier, mesh, param_shardings):
    self.mesh = mesh
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.step = CompiledByShape(jax.jit(make_eval_step(model), in_shardings=(param_shardings, self.batch_sharding),
                                        out_shardings=self.batch_sharding), "eval step")

  def logits(self, params, batcher: Batcher, num_examples: int) -> np.ndarray:
    """[num_examples, C] float32 logits, row i for example i."""
    out = None
    seen = np.zeros(num_examples, bool)
    pending = None

    def collect(item):
      nonlocal out
      logits, ids = _host(item[0]), _host(item[1])
      if out is None:
        out = np.zeros((num_examples, logits.shape[-1]), np.float32)
      real = ids >= 0
      out[ids[real]] = logits[real]
      seen[ids[real]] = True

    batches = Prefetch(batcher.iterate(0), lambda b: sharding.global_batch(b, self.batch_sharding))
    try:
      for batch in batches:
        current = (self.step(params, batch), batch["example_ids"])
        if pending is not None:
          collect(pending)  # read the previous batch while this one runs
        pending = current
      if pending is not None:
        collect(pending)
    finally:
      batches.close()
    if not seen.all():
      raise RuntimeError(f"evaluation missed {int((~seen).sum())} of {num_examples} examples")
    return out

  def evaluate(self, params, batcher: Batcher, labels: np.ndarray, task: str,
               label_names: list[str] | None = None) -> dict:
    logits = self.logits(params, batcher, len(labels))
    return compute_metrics(logits, labels, task, label_names)


def compute_metrics(logits: np.ndarray, labels: np.ndarray, task: str, label_names=None) -> dict:
  if task == "regression":
    return metrics_lib.regression_metrics(logits[:, 0], labels)
  return metrics_lib.classification_metrics(logits, labels, label_names)
