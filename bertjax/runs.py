"""What the training loop (`trainer.train`) trains: the `Runs` it needs, and their implementation for a run
alone, `SingleRun` (a trial group's, its runs stacked and stepped as one vmapped program, is
`trial_group.TrialGroup`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import jax

from bertjax import checkpoint as ckpt_lib
from bertjax import run_summary
from bertjax.loop_state import LoopState, restore_run, save_run
from bertjax.step import TrainState

if TYPE_CHECKING:
  from bertjax.trainer import Trainer


class Runs(Protocol):
  """What `train` trains: runs (Trainers) whose train states one jitted step advances together."""
  lead: Trainer  # its data, mesh, model and step count are every run's
  trainers: list[Trainer]
  labels: list[str]  # the prefix of each run's log lines
  state_shardings: TrainState  # of the state the step takes
  param_shardings: dict  # of one run's params

  def start(self, checkpoints: list[ckpt_lib.Checkpoints]) -> tuple[TrainState, LoopState | None]:
    """The state to train from: restored from the checkpoints (with the loop state), or fresh (None)."""

  def jit_train_step(self): ...

  def params(self, state: TrainState, k: int) -> dict:
    """Run k's params, to evaluate."""

  def split(self, metrics: dict) -> list[dict]:
    """The step's metrics, per run."""

  def save(self, state: TrainState, loop: LoopState, checkpoints: list[ckpt_lib.Checkpoints], which: list[int]):
    """Saves the checkpoints of runs `which` at loop.step."""

  def start_lines(self, step: int) -> list[str]: ...

  def summary_extra(self, k: int) -> dict: ...

  def close(self) -> None: ...


class SingleRun:
  """A run alone: its TrainState as the step takes it, saved in its own checkpoints."""

  def __init__(self, trainer: Trainer):
    self.lead, self.trainers, self.labels = trainer, [trainer], [""]
    self.state_shardings = jax.tree.map(lambda a: a.sharding, trainer.abstract_state())
    self.param_shardings = self.state_shardings.params

  def start(self, checkpoints):
    restored = restore_run(checkpoints[0], self.lead)
    return restored or (self.lead.init_state(), None)

  def jit_train_step(self):
    return self.lead.jit_train_step(self.state_shardings)

  def params(self, state, k):
    return state.params

  def split(self, metrics):
    return [metrics]

  def save(self, state, loop, checkpoints, which):
    save_run(checkpoints[0], state, loop)

  def start_lines(self, step):
    return run_summary.start_lines(self.lead, step)

  def summary_extra(self, k):
    return {}

  def close(self):
    pass
