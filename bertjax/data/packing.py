"""Epoch plans: which examples each step holds, in which row and slot, as flat arrays.

Packing is best fit in stream order: each step looks at the oldest `window` waiting examples and puts each
into the fullest of its `rows` rows that still has room; an example that fits nowhere waits for the next
step. Rows' free room is kept in buckets (one heap of row indices per room value, and a bit mask of the
non-empty buckets), so finding the fullest row that fits costs a few integer operations, whatever the
row count; runs of examples that fit nowhere are skipped with one numpy search. The plan is the same as
scanning every row for every example (tests/test_data.py keeps that reference), 3-18x faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq

import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every step of an epoch: step s holds entries bounds[s]:bounds[s + 1], rows in order and each
  row's examples in packing order (slot 0, 1, ...)."""
  bounds: np.ndarray    # int64 [steps + 1]
  examples: np.ndarray  # int64 [entries]: example indices
  rows: np.ndarray      # int32 [entries]: row within the step
  slots: np.ndarray     # int32 [entries]: place within the row

  @property
  def num_steps(self) -> int:
    return len(self.bounds) - 1

  def sizes(self) -> np.ndarray:
    """Examples per step."""
    return np.diff(self.bounds)

  def per_step_sum(self, values: np.ndarray) -> np.ndarray:
    """values[example] summed over each step's examples (e.g. real tokens per step)."""
    cumulative = np.zeros(len(self.examples) + 1, np.int64)
    np.cumsum(values[self.examples], out=cumulative[1:])
    return cumulative[self.bounds[1:]] - cumulative[self.bounds[:-1]]

  def per_step_max(self, values: np.ndarray) -> np.ndarray:
    """values[example] maximised over each step's examples (steps are never empty)."""
    if not self.num_steps:
      return np.zeros(0, values.dtype)
    return np.maximum.reduceat(values[self.examples], self.bounds[:-1])

  def step_lists(self) -> list[list[int]]:
    """The examples of each step as lists (rows in order)."""
    return [part.tolist() for part in np.split(self.examples, self.bounds[1:-1])] if self.num_steps else []


def _from_lists(examples: list[int], rows: list[int], slots: list[int], bounds: list[int]) -> Plan:
  return Plan(np.asarray(bounds, np.int64), np.asarray(examples, np.int64), np.asarray(rows, np.int32),
              np.asarray(slots, np.int32))


def in_batches(order: np.ndarray, rows: int, drop_remainder: bool = False) -> Plan:
  """Unpacked: consecutive runs of `rows` examples of `order`, one example per row."""
  order = np.asarray(order, np.int64)
  n = len(order) - len(order) % rows if drop_remainder else len(order)
  order = order[:n]
  position = np.arange(n)
  bounds = np.append(np.arange(0, n, rows), n) if n else np.zeros(1, np.int64)
  return Plan(bounds.astype(np.int64), order, (position % rows).astype(np.int32), np.zeros(n, np.int32))


def pack_stream(lengths: np.ndarray, order: np.ndarray, rows: int, length: int, max_per_row: int,
                window: int) -> Plan:
  """Packs the example stream `order` into steps of `rows` rows of `length` tokens (best fit, see above).
  Every example of `order` appears exactly once; only the last steps can be partly empty."""
  lengths = np.asarray(lengths, np.int64)
  order = np.asarray(order, np.int64)
  out_examples: list[int] = []
  out_rows: list[int] = []
  out_slots: list[int] = []
  bounds = [0]
  if not len(order):
    return _from_lists(out_examples, out_rows, out_slots, bounds)
  shortest = int(lengths[order].min())
  length = int(length)
  heappop, heappush = heapq.heappop, heapq.heappush
  waiting = order[:0]
  taken_from_stream = 0
  while True:
    if len(waiting) < window and taken_from_stream < len(order):
      more = order[taken_from_stream:taken_from_stream + window - len(waiting)]
      taken_from_stream += len(more)
      waiting = np.concatenate([waiting, more])
    if not len(waiting):
      return _from_lists(out_examples, out_rows, out_slots, bounds)
    needs_np = lengths[waiting]
    needs, ids = needs_np.tolist(), waiting.tolist()
    rooms = {length: list(range(rows))}  # free room -> heap of the rows with that much room
    nonempty = 1 << length  # bit v set: some row has exactly v tokens of room (v > 0)
    counts = [0] * rows
    packed: list[list[int]] = [[] for _ in range(rows)]
    placed = np.zeros(len(ids), bool)
    pos = 0
    while pos < len(ids):
      need = needs[pos]
      fitting = nonempty >> need
      if not fitting:  # fits in no row: skip to the next example that fits in the roomiest row
        later = np.flatnonzero(needs_np[pos + 1:] <= nonempty.bit_length() - 1)
        if not len(later):
          break
        pos += 1 + int(later[0])
        continue
      room = need + (fitting & -fitting).bit_length() - 1  # the smallest room that fits
      heap = rooms[room]
      row = heappop(heap)  # the lowest row index among the fullest that fit
      if not heap:
        del rooms[room]
        nonempty ^= 1 << room
      packed[row].append(ids[pos])
      counts[row] += 1
      left = room - need if counts[row] < max_per_row else 0
      if left:
        if left in rooms:
          heappush(rooms[left], row)
        else:
          rooms[left] = [row]
          nonempty |= 1 << left
      placed[pos] = True
      if nonempty.bit_length() - 1 < shortest:  # nothing else can fit: the rest waits for the next step
        break
      pos += 1
    for row, examples in enumerate(packed):
      out_examples += examples
      out_rows += [row] * len(examples)
      out_slots += range(len(examples))
    bounds.append(len(out_examples))
    waiting = waiting[~placed]


def merge_shards(plans: list[Plan], rows_per_shard: int, drop_remainder: bool = False) -> Plan:
  """One global plan from each shard's plan: step t holds shard k's step t in rows
  [k * rows_per_shard, (k + 1) * rows_per_shard). A shard with fewer steps leaves its rows empty in the
  last steps (or, with drop_remainder, the steps that not every shard fills are dropped)."""
  if len(plans) == 1 and not drop_remainder:
    return plans[0]
  count = (min if drop_remainder else max)(p.num_steps for p in plans)
  parts = []
  for shard, plan in enumerate(plans):
    entries = int(plan.bounds[min(count, plan.num_steps)])
    step = np.repeat(np.arange(min(count, plan.num_steps)), np.diff(plan.bounds[:count + 1]))
    parts.append((step * len(plans) + shard, plan.examples[:entries],
                  plan.rows[:entries] + shard * rows_per_shard, plan.slots[:entries]))
  key, examples, rows, slots = (np.concatenate(x) for x in zip(*parts))
  order = np.argsort(key, kind="stable")  # by step, then shard; each shard's entries keep their order
  step_of = key[order] // len(plans)
  bounds = np.searchsorted(step_of, np.arange(count + 1)).astype(np.int64)
  return Plan(bounds, examples[order], rows[order].astype(np.int32), slots[order].astype(np.int32))


def _full_step_mean(lengths: np.ndarray, rows: int, length: int, max_per_row: int, lookahead: int) -> float:
  """Mean examples per step of a packed epoch of `lengths` (in a fixed shuffled order), not counting the
  last steps, which the end of the stream leaves partly empty."""
  order = np.random.default_rng(0).permutation(len(lengths))
  window = int(np.ceil(rows * length / lengths.mean())) + lookahead
  sizes = pack_stream(lengths, order, rows, length, max_per_row, window).sizes()
  full = sizes[:-2] if len(sizes) > 4 else sizes
  return float(full.mean())


def choose_layout(lengths: np.ndarray, batch_size: int, max_length: int, max_per_row: int, num_shards: int = 1,
                  lookahead: int = 256) -> tuple[int, int]:
  """`_choose_layout`, remembered per lengths and settings: a sweep's trials (and a group's) in one process
  read the same split and would pack the same sample a dozen times each."""
  lengths = np.asarray(lengths, np.int64)
  key = (hashlib.blake2b(lengths.tobytes(), digest_size=16).digest(), len(lengths), batch_size, max_length,
         max_per_row, num_shards, lookahead)
  if key not in _layouts:
    _layouts[key] = _choose_layout(lengths, batch_size, max_length, max_per_row, num_shards, lookahead)
  return _layouts[key]


_layouts: dict[tuple, tuple[int, int]] = {}


def _choose_layout(lengths: np.ndarray, batch_size: int, max_length: int, max_per_row: int, num_shards: int,
                   lookahead: int) -> tuple[int, int]:
  """(rows per step, row length) of packed steps that hold `batch_size` examples on average, from the
  token lengths alone: the same on any number of devices, so an epoch's plan is too.

  The row length starts from the longest example rounded up to 16 (attention costs each token its
  row's length, so rows stay short). Rows per step are a multiple of num_shards, and of the largest
  of 8, 4, 2 that keeps the row length between the longest example and 1.5x that start, so that 1, 2,
  4 and 8 data-parallel devices split a step's rows evenly (other counts get empty rows, see
  `Batcher`). The row length is then tuned, a token at a time, until the mean examples per step of a
  packed sample of the lengths (about 80 steps' worth, and at least 16,384 examples or the data four times
  over, whichever is fewer) is as close to `batch_size` as it gets."""
  lengths = np.asarray(lengths, np.int64)
  if not len(lengths):
    return num_shards, 16
  longest, mean = int(lengths.max()), float(lengths.mean())
  start = min(max_length, -(-longest // 16) * 16)
  cap = max(3 * start // 2, longest)
  tokens = batch_size * mean
  rows = None
  for multiple in (8, 4, 2, 1):
    step = int(np.lcm(multiple, num_shards))
    fits = [r for r in range(step, int(tokens // longest) + 1, step) if tokens / r <= cap]
    if fits:
      rows = min(fits, key=lambda r: abs(tokens / r - start))
      break
  if rows is None:  # a step holds less than one longest example: one row per shard
    rows = num_shards
  count = min(max(80 * batch_size, min(2 ** 14, 4 * len(lengths))), 2 ** 16)
  pick = np.random.default_rng(1).permutation(max(count, len(lengths)))[:count] % len(lengths)
  sample = lengths[pick]
  mean_at: dict[int, float] = {}

  def examples(length: int) -> float:
    if length not in mean_at:
      mean_at[length] = _full_step_mean(sample, rows, length, max_per_row, lookahead)
    return mean_at[length]

  # The smallest row length whose steps hold at least batch_size examples (the mean grows with the
  # row length), then the closer of it and the one below.
  low, high = longest, max(longest, int(np.ceil(tokens / rows)))
  while examples(high) < batch_size and high < 4 * cap:
    low, high = high, 2 * high
  while low < high:
    middle = (low + high) // 2
    if examples(middle) < batch_size:
      low = middle + 1
    else:
      high = middle
  best = min((length for length in (high - 1, high) if length >= longest),
             key=lambda length: abs(examples(length) - batch_size))
  return rows, best
