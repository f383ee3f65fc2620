"""The training loop's state: where it is in the data, what it has measured, and each run's evals and how it
ended. A run's checkpoint holds its train state and this state (as the checkpoint's JSON meta), so a resumed run
goes on exactly where it stopped."""

from __future__ import annotations

import dataclasses

from bertjax import checkpoint as ckpt_lib
from bertjax import resume
from bertjax.errors import WriteFailed, first_line
from bertjax.run_log import log


@dataclasses.dataclass
class Stats:
  """Totals over every session of a run (a resume adds to them)."""
  train_seconds: float = 0.0  # in train steps, compilation excluded
  wait_seconds: float = 0.0  # of which the steps waited for their batches
  wall_seconds: float = 0.0
  examples: int = 0
  tokens: int = 0  # real tokens
  slots: int = 0  # token slots, padding included
  num_compilations: int = 0
  compile_seconds: float = 0.0


@dataclasses.dataclass
class RunRecord:
  """One run's evals and how it ended (a trial group keeps one per trial)."""
  best: dict | None = None  # the best eval by train.best_metric (run_summary.best_entry)
  evals_since_best: int = 0
  last_eval: dict | None = None  # {"step", **eval scalars}
  skipped_steps: int = 0  # updates skipped for a non-finite loss (train.skip_nonfinite_steps)
  stopped_by: str | None = None  # why it stopped before the loop's end: early stopping, a non-finite loss
  end_step: int | None = None  # where it stopped
  error: str | None = None  # a non-finite loss: what its run alone raises (it writes no summary.json)


@dataclasses.dataclass
class LoopState:
  """The position (steps done, and the epoch and step in it the next batch comes from), the stats, and one
  record per run."""
  step: int = 0
  epoch: int = 0
  step_in_epoch: int = 0
  mesh: dict | None = None  # the device mesh's shape it was saved on (a resume may run on other devices)
  # stats.wall_seconds when the last checkpoint was saved (train.checkpoint_every_minutes); None: a checkpoint
  # written before this field existed, whose stats.wall_seconds is that time
  last_save_wall_seconds: float | None = None
  stats: Stats = dataclasses.field(default_factory=Stats)
  runs: list[RunRecord] = dataclasses.field(default_factory=lambda: [RunRecord()])

  def to_meta(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, meta: dict, step: int) -> LoopState:
    """The state a checkpoint's meta holds. `step`: its train state's (meta written before this dataclass has
    no step, its records in other places and skipped_steps in its stats)."""
    if "runs" in meta:
      runs = meta["runs"]
    elif "members" in meta:  # an old trial group's checkpoint
      runs = meta["members"]
    else:
      runs = [{"best": meta["best"], "evals_since_best": meta["evals_since_best"], "last_eval": meta.get("last_eval"),
               "skipped_steps": meta["stats"].get("skipped_steps", 0)}]
    stats = {f.name: meta["stats"][f.name] for f in dataclasses.fields(Stats) if f.name in meta["stats"]}
    # Every other field as saved (a field added later starts at its default when resuming an older checkpoint).
    rest = {f.name: meta[f.name] for f in dataclasses.fields(cls)
            if f.name not in ("step", "stats", "runs") and f.name in meta}
    return cls(step=meta.get("step", step), stats=Stats(**stats), runs=[RunRecord(**r) for r in runs], **rest)

  def of_run(self, k: int) -> LoopState:
    """The state as run k's own checkpoint holds it (a trial's is that of a run alone)."""
    return dataclasses.replace(self, runs=[self.runs[k]])

  def training(self) -> list[int]:
    """The runs that have not stopped."""
    return [k for k, r in enumerate(self.runs) if r.stopped_by is None]


def resumed_line(where: str, loop: LoopState, trainer) -> str:
  """The log line of a resumed run: its checkpoint, its data position, and how the devices changed since."""
  batcher = trainer.data.train.batcher
  if loop.step_in_epoch == 0 and loop.epoch > 0:
    position = f"at the end of epoch {loop.epoch}"
  else:
    position = f"{loop.step_in_epoch} of {batcher.steps_in_epoch(loop.epoch)} steps into epoch {loop.epoch + 1}"
  return (f"resumed from {where} ({position})"
          + resume.mesh_note(loop.mesh, dict(trainer.mesh.shape), trainer.config.train.global_batch_size))


def restore_run(checkpoints: ckpt_lib.Checkpoints, trainer, label: str = ""):
  """(train state, loop state) of the latest checkpoint of `trainer`'s run, or None when it has none."""
  latest = checkpoints.latest_step()
  if latest is None:
    return None
  state, meta = checkpoints.restore(latest, trainer.abstract_state())
  loop = LoopState.from_meta(meta, latest)
  log(label + resumed_line(f"{trainer.workdir}/checkpoints/{latest}", loop, trainer))
  return state, loop


def save_run(checkpoints: ckpt_lib.Checkpoints, state, loop: LoopState) -> None:
  """A run's checkpoint of step loop.step (`loop` holding its record alone): its train state and loop state,
  ranked by its eval scalars (train.best_metric) when it was evaluated at that step."""
  last = loop.runs[0].last_eval
  metrics = last if last and last["step"] == loop.step else None
  try:
    checkpoints.save(loop.step, state, loop.to_meta(), metrics=metrics)
  except ckpt_lib.CheckpointError as e:
    raise WriteFailed(f"saving the checkpoint of step {loop.step} failed ({first_line(e)}); the previous "
                      f"checkpoint (step {checkpoints.latest_step()}) is intact") from None
