"""Training checkpoints: orbax `CheckpointManager` for a workdir's `checkpoints/` folder.

Each step folder holds two items: `state` (a pytree of jax arrays: params, optimizer
state, step, raw uint32 rng key) and `meta` (JSON: data-iterator position, label names,
config snapshot). Orbax (0.12.8, local disk) writes a step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every item is on
disk, so a run killed mid-save leaves a tmp folder that is never listed as a step and
is deleted by the next run before its first save.

Retention keeps exactly two checkpoints: the latest one, and the best one by `best_metric`
(`train.best_metric`: the lowest `eval_loss` by default, else the highest accuracy, macro_f1, ...)
among those saved with metrics (they may coincide). Orbax 0.12.8 says this
with one preservation policy, `AnyPreservationPolicy([LatestN(1), BestN(n=1)])`; old
steps are deleted only after the new step is finalised, so a failed save never costs
an earlier checkpoint.

All processes must call `save`/`restore`/`wait`/`close` (orbax synchronises them and
its primary host writes the JSON files); `is_primary` only decides who logs. Orbax names
its barriers after the step, so two managers saving the same step at once (a trial
group's members) need distinct `sync_name`s, equal on every process.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from bertjax.metrics import BEST_MODES

PyTree = Any

_STATE = "state"
_META = "meta"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; earlier finalised checkpoints are untouched."""


def _ranking(metric: str):
  """The key orbax ranks checkpoints by, lowest best: the metric, negated when higher is better, then the
  step, so that the earlier of two equal evals wins (as in the training loop, `metrics.is_better`); a NaN
  or missing value never wins."""
  sign = 1.0 if BEST_MODES[metric] == "min" else -1.0

  def key(metrics: dict[str, Any]) -> tuple[float, int]:
    value = metrics.get(metric)
    if value is None or math.isnan(float(value)):
      return math.inf, 0
    return sign * float(value), int(metrics.get("step", 0))

  return key


def _json_metrics(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
  """Turns jax/numpy scalars into floats: orbax stores metrics as JSON."""
  if metric not in metrics:
    raise ValueError(
        f"checkpoint metrics need {metric!r} to rank checkpoints; got keys "
        f"{sorted(metrics)}")
  out = {}
  for name, value in metrics.items():
    out[name] = value if isinstance(value, (str, bool, int)) else float(value)
  return out


def steps_on_disk(checkpoint_dir) -> list[int]:
  """The steps saved in a checkpoints folder (its numbered subfolders), without opening a manager."""
  checkpoint_dir = Path(checkpoint_dir)
  return sorted(int(p.name) for p in checkpoint_dir.glob("*") if p.name.isdigit()) \
      if checkpoint_dir.is_dir() else []


def _check_abstract(abstract_state: PyTree) -> None:
  """Refuses targets without shardings: orbax would silently return numpy arrays."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      raise ValueError(
          f"abstract state leaf {jax.tree_util.keystr(path)} has no sharding; "
          "set one (e.g. jax.ShapeDtypeStruct(shape, dtype, sharding=...)) so the "
          "restored value is a jax.Array placed like the training state")


def _from_orbax(tb) -> bool:
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _orphaned_orbax_tasks(record) -> bool:
  """A logging filter for asyncio's logger: after a failed write, the writes orbax started alongside it end
  with the same error, and asyncio logs each ("Task exception was never retrieved", with its traceback) when
  the task is collected, after our CheckpointError has said it; those records are dropped, any other kept."""
  return not (record.exc_info and _from_orbax(record.exc_info[2]))


def _orbax_errors_in_one_line(record) -> bool:
  """A logging filter: orbax logs a failed background write with its whole traceback (about 30 lines per writer
  thread) before `wait` raises our one-line CheckpointError with the same reason. Its record keeps one line: its
  message and the exception's type and first line."""
  if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
    error, message = record.exc_info[1], record.getMessage()
    first = str(error).split("\n", 1)[0] if error is not None else ""
    if first and first not in message:  # a reason said only in the exception stays in the line
      record.msg, record.args = f"{message} ({type(error).__name__}: {first})", ()
    record.exc_info, record.exc_text = None, None
  return True


def _quiet_closed_event_loops() -> None:
  """When a write fails, tensorstore's callbacks still reach for the closed event loop of orbax's writer thread,
  and Python prints each "Event loop is closed" as an unraisable exception (37 tracebacks after one failed save
  of a tiny model, some before `wait` sees the failure); they say nothing the CheckpointError does not. Every
  other unraisable exception is printed."""
  if getattr(sys.unraisablehook, "quiet_closed_event_loops", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.quiet_closed_event_loops = True
  sys.unraisablehook = hook


class Checkpoints:
  """Saves, lists, prunes and restores the checkpoints of one training run.

  The first one made installs, for the whole process, the filter that keeps orbax's logged errors to a line
  and the hook that leaves unprinted the "Event loop is closed" errors of a failed write (see those two)."""

  def __init__(self, directory: str, keep_best: bool = True,
               async_save: bool = True, *, is_primary: bool, sync_name: str = "checkpoints",
               best_metric: str = "eval_loss"):
    self._is_primary = is_primary
    self.best_metric = best_metric
    ranking = _ranking(best_metric)
    directory = os.path.abspath(directory)  # orbax refuses relative paths at save time
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=1)]
    if keep_best:
      # reverse=True sorts by descending key and BestN keeps the tail: the lowest.
      # Checkpoints without metrics are the LatestN policy's business only.
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=ranking, reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn is what makes orbax record metrics and answer best_step();
        # the preservation policy alone decides what is deleted.
        best_fn=ranking,
        best_mode="min",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # Deletes tmp folders left by a killed save (in the background; orbax
        # awaits it before this run's first save).
        cleanup_tmp_directories=True,
        create=True,
        # Prefixes the names of orbax's cross-process barriers ("_async_write_complete.<step>"):
        # without it, concurrent saves of one step by two managers collide ("already ongoing").
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=sync_name),
    )
    self._manager = ocp.CheckpointManager(
        directory, options=options, item_names=(_STATE, _META))
    self._pending_step: int | None = None
    absl_logger, asyncio_logger = logging.get_absl_logger(), std_logging.getLogger("asyncio")
    if _orbax_errors_in_one_line not in absl_logger.filters:
      absl_logger.addFilter(_orbax_errors_in_one_line)
      asyncio_logger.addFilter(_orphaned_orbax_tasks)
    _quiet_closed_event_loops()

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def save(self, step: int, state: PyTree, meta: dict[str, Any],
           metrics: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Starts writing `step` (asynchronously unless async_save=False).

    `metrics`, when given, must contain `best_metric`; it ranks the checkpoint for
    retention. Returns whether a save was started. Raises CheckpointError if this
    save, or the previous asynchronous one it waits for, fails.
    """
    json_metrics = None if metrics is None else {**_json_metrics(metrics, self.best_metric), "step": step}
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(meta),
    })
    # Orbax would wait for the previous asynchronous save inside `save`; waiting
    # here first lets a failure name the step that actually broke.
    self.wait()
    try:
      started = self._manager.save(step, args=args, metrics=json_metrics, force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      self._resync()
      raise CheckpointError(
          f"checkpoint save of step {step} failed in {self.directory}: {e}") from e
    if started:
      self._pending_step = step
      if self._is_primary:
        logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return started

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointError if it failed."""
    step, self._pending_step = self._pending_step, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._resync()
      raise CheckpointError(
          f"checkpoint save of step {step} failed in {self.directory}: {e}") from e

  def _resync(self) -> None:
    """Re-reads the step list from disk after a failure.

    Orbax drops the steps it planned to delete from its cache before the new step is
    finalised; when that step fails they are still on disk and still restorable.
    The writes it had not started are never awaited now: Python's warning about each at exit is left unsaid.
    """
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    try:
      self._manager.reload()
    except Exception:  # pylint: disable=broad-except
      logging.exception("checkpoint: could not re-read %s", self.directory)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step best by `best_metric`, or None if none was saved with metrics."""
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Returns (state, meta) of `step`, shaped, typed and sharded like `abstract_state`.

    `abstract_state`: `jax.eval_shape` output (or `jax.ShapeDtypeStruct`s) with
    `.sharding` set on every leaf, or concrete arrays of the same structure.
    """
    _check_abstract(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state),
        _META: ocp.args.JsonRestore(),
    }))
    if self._is_primary:
      logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored[_STATE], restored[_META]

  def close(self) -> None:
    """Waits for the pending save, then releases orbax's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
