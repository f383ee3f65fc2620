"""Runs host-side batch building ahead of the device in a background thread."""

import collections
import queue
import threading
import time
from typing import Callable, Iterable, Iterator

_END = object()
CHUNK = 16  # items per handover (and per transform call) at most


class Prefetch:
  """Iterates the items of `source`, in order, built ahead in a thread, each chunk of them passed through
  `transform` (a list -> a list as long, e.g. one host-to-device copy for the whole chunk).

  The thread hands items over in chunks of up to `chunk`, at most `depth` chunks ahead: a chunk goes as soon
  as the consumer has nothing left to take, else when it is full. Small batches (a few hundred tokens) take
  tens of microseconds to build and copy, about what one handover between threads costs, so handing them one
  at a time would halve the rate the host can feed the devices, and one device_put of 16 batches costs about
  half as much per batch as 16 calls (docs/gpu.md, the host pipeline).

  `wait_seconds` accumulates the time the consumer spent blocked on the queue, so the trainer can
  report which fraction of the wall time the device waited for data.
  """

  def __init__(self, source: Iterable, transform: Callable[[list], list] = lambda items: items, depth: int = 2,
               chunk: int = CHUNK):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._chunk = chunk
    self._ready: collections.deque = collections.deque()  # the consumer's current chunk
    self._ended = False
    self.wait_seconds = 0.0
    self._thread = threading.Thread(target=self._fill, args=(iter(source), transform), daemon=True)
    self._thread.start()

  def _fill(self, it: Iterator, transform: Callable) -> None:
    pending = []
    try:
      for item in it:
        if self._stop.is_set():
          return
        pending.append(item)
        if len(pending) >= self._chunk or self._queue.empty():
          self._put(transform(pending))
          pending = []
      if pending:
        self._put(transform(pending))
      self._put(_END)
    except BaseException as e:  # re-raised in the consumer (after the items before it), which owns error reporting
      if pending:
        try:
          self._put(transform(pending))
        except BaseException:  # pylint: disable=broad-except
          pass  # the transform's own failure: the first error is the one to report
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
    if not self._ready:
      if self._ended:
        raise StopIteration
      t = time.perf_counter()
      item = self._queue.get()
      self.wait_seconds += time.perf_counter() - t
      if item is _END:
        self._ended = True
        raise StopIteration
      if isinstance(item, BaseException):
        self._ended = True
        raise item
      self._ready.extend(item)
    return self._ready.popleft()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
