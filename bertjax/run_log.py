"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events, summary.json,
a progress line and its log lines on stderr. Only the primary process writes; elsewhere these are no-ops.

`metrics.jsonl` is the record of truth (one flushed JSON object per line, so a killed
run loses at most the line being written); TensorBoard events mirror it for plotting.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from typing import Any, Callable, Literal, TextIO

import numpy as np

from bertjax.files import atomic_write

Kind = Literal["train", "eval"]
KINDS = ("train", "eval")


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is installed
  (to accept torch tensors, which a run never passes), and that import alone took 1.2-2 s and ~300 MB of every
  run's process. torch stays hidden only during this import, and only if nothing imported it before; hiding it
  is seen by every thread, so this runs when a RunLog is made, before the run starts its input thread."""
  hide = "torch" not in sys.modules and "tensorboardX" not in sys.modules  # once imported, nothing to hide
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide and "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


def log(msg: str) -> None:
  """A line on stderr from the primary process (one line per event, not one per process)."""
  import jax
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _scalar(value: Any) -> float | int:
  """A JSON-ready number from a python, numpy or jax scalar (one device fetch)."""
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f"expected a scalar, got shape {value.shape}")
  value = value.reshape(()).item()
  return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _json_default(value: Any) -> Any:
  """Lets summaries hold numpy/jax scalars and arrays."""
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def write_summary(workdir: str, summary: dict[str, Any]) -> str:
  """Writes `workdir/summary.json` atomically: readers never see half a file."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "summary.json")
  with atomic_write(path, fsync=True) as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")
  return path


class RunLog:
  """Appends train/eval scalars to `workdir/metrics.jsonl` and `workdir/tensorboard`."""

  def __init__(self, workdir: str, is_primary: bool):
    self._is_primary = is_primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self._file: TextIO | None = None
    self._writer = None
    self._purge_step: int | None = None
    if is_primary:
      os.makedirs(workdir, exist_ok=True)
      self._writer_class = _summary_writer_class()

  def truncate_after(self, step: int) -> int:
    """On resume from `step`: drops logged lines with a later step; returns lines kept.

    Those steps will be trained and logged again; TensorBoard is told to hide its
    copies of them (a `purge_step` start event in the next events file).
    """
    if not self._is_primary:
      return 0
    self._close_file()
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # the line a killed run was writing
          if record.get("step", math.inf) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
      with atomic_write(self.path) as f:
        f.writelines(kept)
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    self._purge_step = step + 1
    return len(kept)

  def write(self, step: int, scalars: dict[str, Any], kind: Kind) -> None:
    """Logs one line `{"step", "kind", **scalars}` and the TensorBoard tags `kind/name`."""
    if not self._is_primary:
      return
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    values = {name: _scalar(v) for name, v in scalars.items()}
    clash = {"step", "kind"} & set(values)
    if clash:
      raise ValueError(f"scalar names {sorted(clash)} are reserved")
    if self._file is None:
      self._file = open(self.path, "a")
    self._file.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
    self._file.flush()
    writer = self._tensorboard()
    for name, value in values.items():
      writer.add_scalar(f"{kind}/{name}", value, global_step=int(step))
    writer.flush()

  def write_record(self, step: int, kind: str, fields: dict[str, Any]) -> None:
    """Logs one non-scalar line `{"step", "kind", **fields}` (e.g. a resumed run's changed settings) to
    metrics.jsonl only; readers of scalars skip kinds other than train and eval."""
    if not self._is_primary:
      return
    if kind in KINDS:
      raise ValueError(f"kind {kind!r} is for scalars: use write()")
    if self._file is None:
      self._file = open(self.path, "a")
    self._file.write(json.dumps({"step": int(step), "kind": kind, **fields}) + "\n")
    self._file.flush()

  def _tensorboard(self):
    if self._writer is None:
      self._writer = self._writer_class(
          logdir=self.tensorboard_dir, purge_step=self._purge_step, flush_secs=10,
          filename_suffix=self._event_file_suffix())
      self._purge_step = None
    return self._writer

  def _event_file_suffix(self) -> str:
    """Keeps a new events file from overwriting one opened in the same second.

    tensorboardX names files `events.out.tfevents.<whole seconds>.<host>` and opens
    them with "wb"; a resumed run (or a reopened writer) can land in the same second.
    `.001`, `.002`... sort after the bare name, so TensorBoard reads them in order.
    """
    prefix = f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}"
    taken = 0
    if os.path.isdir(self.tensorboard_dir):
      taken = sum(n.startswith(prefix) for n in os.listdir(self.tensorboard_dir))
    return f".{taken:03d}" if taken else ""

  def _close_file(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> None:
    """Flushes everything to disk (TensorBoard writes from a background thread)."""
    self._close_file()
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> RunLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Prints `step 120/1000 [###-------] 12.0% 3.41 steps/s ETA 4m18s loss 0.4321`.

  One plain line per report (no carriage returns), so it reads the same in a terminal
  and in a log file. Reports when `every_steps` steps or `every_secs` seconds have
  passed since the last one, whichever comes first. The rate is measured over the
  steps since the previous report, so a resumed run's ETA is not skewed.
  """

  def __init__(self, total_steps: int, *, is_primary: bool, every_steps: int = 100,
               every_secs: float = 60.0, stream: TextIO | None = None,
               clock: Callable[[], float] = time.monotonic, width: int = 20):
    self._total = total_steps
    self._is_primary = is_primary
    self._every_steps = every_steps
    self._every_secs = every_secs
    self._stream = stream
    self._clock = clock
    self._width = width
    self._last: tuple[int, float] | None = None  # (step, time) of the last report

  def update(self, step: int, loss: Any = None) -> str | None:
    """Call after each step; returns the printed line, or None if nothing was due."""
    if not self._is_primary:
      return None
    now = self._clock()
    if self._last is None:
      self._last = (step, now)  # the first call only starts the clock
      return None
    last_step, last_time = self._last
    due = (step - last_step >= self._every_steps or now - last_time >= self._every_secs
           or step >= self._total)
    if not due or step <= last_step:
      return None
    rate = (step - last_step) / max(now - last_time, 1e-9)
    self._last = (step, now)
    frac = min(step / self._total, 1.0) if self._total else 1.0
    filled = int(frac * self._width)
    line = (f"step {step}/{self._total} [{'#' * filled}{'-' * (self._width - filled)}] "
            f"{100 * frac:.1f}% {rate:.2f} steps/s "
            f"ETA {_duration(max(self._total - step, 0) / rate)}")
    if loss is not None:
      line += f" loss {_scalar(loss):.4f}"
    stream = self._stream or sys.stderr
    print(line, file=stream, flush=True)
    return line
