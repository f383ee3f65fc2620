"""Runs host-side batch building ahead of the device in a background thread."""

import queue
import threading
import time
from typing import Callable, Iterable, Iterator

_END = object()


class Prefetch:
  """Iterates `transform(item)` for the items of `source`, `depth` items ahead, in a thread.

  `wait_seconds` accumulates the time the consumer spent blocked on the queue, so the trainer can
  report which fraction of the wall time the device waited for data.
  """

  def __init__(self, source: Iterable, transform: Callable = lambda x: x, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self.wait_seconds = 0.0
    self._thread = threading.Thread(target=self._fill, args=(iter(source), transform), daemon=True)
    self._thread.start()

  def _fill(self, it: Iterator, transform: Callable) -> None:
    try:
      for item in it:
        if self._stop.is_set():
          return
        self._put(transform(item))
      self._put(_END)
    except BaseException as e:  # re-raised in the consumer, which owns error reporting
      self._put(e)

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    t = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - t
    if item is _END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
