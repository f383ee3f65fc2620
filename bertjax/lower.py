"""A run's steps lowered for a platform without running them: `python -m bertjax.train --lower_only=cuda`.

The run is built as training builds it (config, model, data shapes, optimizer, mesh), but nothing is
written to the workdir (not even the token cache) and no state is allocated: the jitted train step, with
the loop's shardings and donation, and the eval step are traced with abstract arguments and lowered to
StableHLO for the platform. That proves on a CPU-only machine that the real step lowers for a GPU (jax
checks each operation's lowering for the platform there), and reports its size and FLOPs. The mesh is
this host's devices: the lowered program is for as many devices as the run would use here.
"""

import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bertjax import flops, run_summary, sharding
from bertjax.data.batching import TOKEN_FIELDS, Batch
from bertjax.errors import UserError
from bertjax.evaluate import Evaluator

PLATFORMS = ("cuda", "rocm", "tpu", "cpu")


@dataclasses.dataclass
class LoweredStep:
  name: str  # "train step" | "eval step"
  shape: tuple[int, int]  # (global rows, row length) of the batch
  lowered: jax.stages.Lowered
  model_flops: float  # model FLOPs of one call (mean over epoch 0's steps for training; the eval pass per batch)

  @property
  def text(self) -> str:
    return self.lowered.as_text()

  def describe(self) -> str:
    ops = len(re.findall(r"\b(?:stablehlo|sdy)\.[a-z_]+", self.text))
    return (f"{self.name} {list(self.shape)}: {self.model_flops / 1e9:.3f} model GFLOP per call, StableHLO "
            f"{len(self.text) / 1024:.0f} KiB, {ops} ops")


def abstract_batches(batcher, mesh) -> list[Batch]:
  """The global batch of every shape the batcher can yield, as abstract arrays with the batch sharding."""
  spec = sharding.batch_sharding(mesh)
  return [Batch(jax.ShapeDtypeStruct((rows * jax.process_count(), len(TOKEN_FIELDS), length + slots), jnp.int32,
                                     sharding=spec), slots)
          for rows, length, slots in batcher.shapes()]


def lower_steps(trainer, platform: str) -> list[LoweredStep]:
  """The trainer's train step (each batch shape) and eval step, lowered for `platform` (one of PLATFORMS)."""
  state = trainer.abstract_state()
  shardings = jax.tree.map(lambda a: a.sharding, state)
  train_step = trainer.jit_train_step(shardings)
  batcher = trainer.data.train.batcher
  per_step = flops.train_flops(trainer.model_cfg, batcher.lengths) / batcher.steps_in_epoch(0)
  out = [LoweredStep("train step", b.shape[:2], train_step.trace(state, b).lower(
      lowering_platforms=(platform,)), per_step) for b in abstract_batches(batcher, trainer.mesh)]
  if trainer.data.eval is not None:
    evaluator = Evaluator(trainer.eval_model, trainer.mesh, shardings.params)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(evaluator.cast, state.params), shardings.params)
    eval_batcher = trainer.data.eval.batcher
    per_batch = flops.forward_flops(trainer.model_cfg, eval_batcher.lengths) / eval_batcher.steps_in_epoch(0)
    out += [LoweredStep("eval step", b.shape[:2], evaluator.step.jitted.trace(params, b).lower(
        lowering_platforms=(platform,)), per_batch) for b in abstract_batches(eval_batcher, trainer.mesh)]
  return out


def lower_only(config: ml_collections.ConfigDict, workdir: str, platform: str) -> list[LoweredStep]:
  """Builds the run for `workdir` without writing to it, lowers its steps for `platform` and prints what
  they are: parameters, model FLOPs and the size of each lowered step."""
  from bertjax.run_log import log
  from bertjax.trainer import Trainer
  if platform not in PLATFORMS:
    raise UserError(f"--lower_only must be one of {', '.join(PLATFORMS)}, got {platform!r}")
  trainer = Trainer(config, workdir, token_cache=False)
  for line in run_summary.start_lines(trainer, 0):
    log(line)
  steps = lower_steps(trainer, platform)
  if jax.process_index() == 0:
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.loaded.params))
    print(f"lowered for {platform} on mesh {dict(trainer.mesh.shape)}: {params:,} parameters", file=sys.stdout)
    for step in steps:
      print(step.describe(), file=sys.stdout, flush=True)
  return steps
