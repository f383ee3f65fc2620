"""SIGTERM/SIGINT during training: the loop checkpoints at the current step and exits."""

import os
import signal


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

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
