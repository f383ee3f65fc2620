"""Pure train and eval steps: (state, batch) -> (state, metrics), jitted once per batch shape."""

import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bertjax import sharding
from bertjax.data.batching import Batch
from bertjax.errors import UserError
from bertjax.models.heads import SequenceClassifier, model_inputs


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key; dropout keys are fold_in(rng, step)


def new_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A run's first state: step 0, the optimizer's initial state, the raw key of `seed`. Traceable: jit it (with
  out_shardings) to build it on the devices, or `jax.eval_shape` it for its shapes."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed))


def per_example_loss(logits_BxSxC, labels_BxS, regression: bool):
  if regression:
    return jnp.square(logits_BxSxC[..., 0] - labels_BxS)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxSxC, labels_BxS)


def class_weight_vector(setting, labels: np.ndarray, num_labels: int) -> np.ndarray | None:
  """train.class_weights as one float32 weight per class id (None for `none`): `balanced` gives class c the
  weight n / (num_labels * count_c) over the training labels (as scikit-learn's), 0 for a class without
  examples; a list is taken as given, and must have one entry per class."""
  if setting == "none":
    return None
  if setting == "balanced":
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_labels)
    return np.where(counts > 0, len(labels) / (num_labels * np.maximum(counts, 1)), 0.0).astype(np.float32)
  if len(setting) != num_labels:
    raise UserError(f"train.class_weights has {len(setting)} weights for the {num_labels} classes; give one per "
                    "class, in label id order (labels.json of a run lists them)")
  return np.asarray(setting, np.float32)


def loss_sums(model: SequenceClassifier, params, batch: Batch, regression: bool, dropout_key,
              class_weights: np.ndarray | None = None):
  """(sum of the real examples' losses, each times its class's weight, (correct predictions, real examples)):
  the forward pass of a train step (dropout with `dropout_key`; None: none), before any averaging."""
  deterministic = dropout_key is None
  rngs = None if deterministic else {"dropout": dropout_key}
  fields = batch.fields()
  logits = model.apply({"params": params}, **model_inputs(fields), deterministic=deterministic, rngs=rngs)
  mask = fields["example_mask"]
  labels = fields["labels"] if regression else fields["labels"].astype(jnp.int32)
  weights = mask if class_weights is None else mask * jnp.asarray(class_weights)[labels]
  loss_sum = jnp.sum(per_example_loss(logits, labels, regression) * weights)
  if regression:
    correct = jnp.zeros(())
  else:
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  return loss_sum, (correct, jnp.sum(mask))


def make_train_step(model: SequenceClassifier, tx: optax.GradientTransformation, schedule: Callable,
                    regression: bool, grad_accum_steps: int = 1, skip_nonfinite: bool = False,
                    class_weights: np.ndarray | None = None) -> Callable:
  """The step: the loss of each real example divided by the number of real examples in the whole
  batch (known from `example_mask` before the forward pass), summed over `grad_accum_steps` row
  chunks, so accumulation and partial batches give the exact mean and the gradients need no
  separate division pass over every parameter. With `class_weights` (one per class id), each loss is
  multiplied by its class's weight and the sum divided by the batch's summed weights instead (the
  weighted mean of torch.nn.CrossEntropyLoss(weight=...)); accuracy still counts examples.

  With `skip_nonfinite`, a step whose loss or gradients are not finite leaves params and optimizer
  state unchanged (the step counter still advances) and reports `skipped` = 1."""

  def train_step(state: TrainState, batch: Batch):
    step_key = jax.random.fold_in(state.rng, state.step)
    fields = batch.fields()
    examples = jnp.maximum(jnp.sum(fields["example_mask"]), 1.0)
    denom = examples
    if class_weights is not None:
      weights = jnp.asarray(class_weights)[fields["labels"].astype(jnp.int32)]
      denom = jnp.maximum(jnp.sum(fields["example_mask"] * weights), 1e-12)

    def mean_loss(p, b, k):
      loss_sum, aux = loss_sums(model, p, b, regression, k, class_weights)
      return loss_sum / denom, aux

    vg = jax.value_and_grad(mean_loss, has_aux=True)
    if grad_accum_steps == 1:
      (loss, (correct, count)), grads = vg(state.params, batch, step_key)
    else:
      chunks = jax.tree.map(lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
                            batch)

      def body(carry, xs):
        i, mb = xs
        (l, (c, n)), g = vg(state.params, mb, jax.random.fold_in(step_key, i))
        acc_g, acc_l, acc_c, acc_n = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, acc_c + c, acc_n + n), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
      (grads, loss, correct, count), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum_steps), chunks))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    skipped = jnp.zeros((), jnp.int32)
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      skipped = (~ok).astype(jnp.int32)
    metrics = {"loss": loss, "accuracy": correct / examples, "examples": count,
               "grad_norm": grad_norm, "learning_rate": schedule(state.step), "skipped": skipped}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_train_step(step_fn: Callable, state_shardings, mesh) -> Callable:
  """A train step as the loop runs it: jitted with explicit in/out shardings (batch rows over the mesh), the
  state donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


# On a CPU a train step's time per example grows once a micro-batch's activations leave the caches: MiniLM
# (hidden 384) at batch 1024 in rows of 82 ran 154 examples/s in micro-batches of 6 rows (492 tokens) and
# 89-101 in micro-batches of 12-168 rows (984-13,776 tokens), alternating in one process (docs/large_batch.md).
# The budget holds for a wider model too: BERT-base (hidden 768) on rows of 108 ran a step of 4 rows in 1058 ms
# as one micro-batch (432 tokens) against 1213 ms as two, and 8 rows in 2056 ms as two against 2274 ms as one and
# 2220 ms as four (Intel Xeon, float32, 2026-12-07; docs/performance.md). Narrower models (the tests' hidden 32)
# keep proportionally more tokens: their activations per token are smaller.
CPU_MICROBATCH_TOKENS, CPU_MICROBATCH_WIDTH = 512, 384


def auto_accumulation(rows_per_device: int, row_length: int, hidden_size: int, backend: str) -> int:
  """`train.grad_accum_steps=auto`: how many micro-batches a step's rows on one device are split into.

  On accelerators, 1: the largest micro-batch is the fastest one that fits. On a CPU, the fewest
  micro-batches (a divisor of the rows, so none gets empty rows) of at most CPU_MICROBATCH_TOKENS tokens, times
  CPU_MICROBATCH_WIDTH / hidden_size for a narrower model; the gradient is the same sum either way."""
  if backend != "cpu" or rows_per_device <= 1:
    return 1
  budget = CPU_MICROBATCH_TOKENS * max(1.0, CPU_MICROBATCH_WIDTH / hidden_size)
  for steps in range(1, rows_per_device + 1):
    if rows_per_device % steps == 0 and rows_per_device // steps * row_length <= budget:
      return steps
  return rows_per_device


def make_eval_step(model: SequenceClassifier) -> Callable:
  """(per-slot logits [rows, slots, C], per-slot example ids [rows, slots]) of a batch; empty slots have
  id -1 (the caller drops them)."""

  def eval_step(params, batch: Batch):
    fields = batch.fields()
    return model.apply({"params": params}, **model_inputs(fields), deterministic=True), fields["example_ids"]

  return eval_step


class CompiledByShape:
  """Ahead-of-time compiles a jitted step once per batch shape and keeps the executables.

  The count is the number of compilations; `compile_seconds` lets the trainer keep compilation
  out of its throughput figures; the first compile reports its memory analysis.
  """

  def __init__(self, jitted: Callable, name: str, report: Callable[[str], None] | None = None):
    self.jitted = jitted
    self.name = name
    self.report = report
    self.executables: dict = {}
    self.compile_seconds = 0.0

  def __call__(self, first, batch):
    key = (jax.tree.structure(batch), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)))
    fn = self.executables.get(key)
    if fn is None:
      t = time.perf_counter()
      fn = self.jitted.lower(first, batch).compile()
      self.compile_seconds += time.perf_counter() - t
      if self.report is not None and not self.executables:
        self.report(f"{self.name}: compiled in {time.perf_counter() - t:.1f}s; {memory_summary(fn)}")
      self.executables[key] = fn
    return fn(first, batch)

  @property
  def num_compilations(self) -> int:
    return len(self.executables)


def memory_summary(compiled) -> str:
  """Per-device memory of a compiled step (arguments, outputs, temporaries), when XLA reports it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return "memory analysis unavailable"
  if m is None:
    return "memory analysis unavailable"
  mb = lambda n: f"{n / 2 ** 20:.1f} MiB"
  return (f"per device: arguments {mb(m.argument_size_in_bytes)}, outputs {mb(m.output_size_in_bytes)}, "
          f"temporaries {mb(m.temp_size_in_bytes)}, generated code {mb(m.generated_code_size_in_bytes)}")
