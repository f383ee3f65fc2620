"""SIGTERM/SIGINT during training: the loop checkpoints at the current step (on several processes, at a step
they agree on) and exits."""

import os
import signal

import numpy as np


class StopSignal:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the current step and exits.
  A second signal ends the process at once."""

  def __init__(self):
    self.received = None
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, _frame):
    if self.received is not None:  # a second signal: the user wants out now, checkpoint or not
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.received = signal.Signals(signum).name

  def agreed(self, may_exchange: bool) -> bool:
    """Whether to stop at this step. Several processes must stop at the same step (saving a checkpoint
    is collective), so they exchange their flags, only where every process passes `may_exchange=True`
    (log steps and checkpoint boundaries, which all processes reach together): any process's signal stops
    them all there. One process needs no exchange and stops at once."""
    import jax
    if jax.process_count() == 1:
      return self.received is not None
    if not may_exchange:
      return False
    from bertjax import sharding
    flags = sharding.gather_from_processes(np.array([self.received is not None], np.int32), "their stop signals")
    return bool(flags.any())

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
