"""Deterministic global batch plans and this host's share of each batch.

Every host computes the same plan from (seed, epoch) and the global token lengths, so all
hosts agree on each step's examples and array shapes without talking to each other; each then
materialises only its own rows (see the batch contract in `bertjax.data`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from bertjax.data.tokenize import Tokenized
from bertjax.errors import UserError

Batch = dict[str, np.ndarray]


def plan_epoch(lengths: Sequence[int] | np.ndarray, global_batch_size: int, seed: int,
               epoch: int, shuffle: bool, drop_remainder: bool = False) -> list[list[int]]:
  """Example indices of each global step; the last partial batch is kept unless dropped."""
  n = len(lengths)
  if global_batch_size < 1:
    raise UserError(f"global batch size must be >= 1, got {global_batch_size}")
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(n)
  else:
    order = np.arange(n)
  stop = n - n % global_batch_size if drop_remainder else n
  return [order[i:i + global_batch_size].tolist() for i in range(0, stop, global_batch_size)]


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
  """Row lengths of unpacked batches: powers of two from `smallest`, and max_length."""
  buckets, b = [], smallest
  while b < max_length:
    buckets.append(b)
    b *= 2
  return buckets + [max_length]


def row_counts(max_rows: int, multiple: int = 1) -> list[int]:
  """Allowed row counts of packed batches: 1, 2, 3, 4, 6, 8, 12, ... (x1.5 / x2 steps),
  rounded up to `multiple` (e.g. the local device count), capped by max_rows."""
  counts, b = set(), 1
  while b < max_rows:
    counts.update((b, b + b // 2) if b >= 2 else (b,))
    b *= 2
  counts.add(max_rows)
  rounded = {-(-c // multiple) * multiple for c in counts if c <= max_rows}
  return sorted(rounded)


def pack(lengths: Sequence[int], max_length: int, max_per_row: int) -> list[list[int]]:
  """First-fit decreasing: positions into `lengths` for each row, longest first."""
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  rows: list[list[int]] = []
  room: list[int] = []
  for i in order:
    need = lengths[i]
    for r, free in enumerate(room):
      if free >= need and len(rows[r]) < max_per_row:
        rows[r].append(i)
        room[r] -= need
        break
    else:
      rows.append([i])
      room.append(max_length - need)
  return rows


def host_slice(step: Sequence[int], process_index: int, process_count: int) -> list[int]:
  """This host's contiguous share of a step's examples (balanced for a partial last step)."""
  n = len(step)
  start = n * process_index // process_count
  stop = n * (process_index + 1) // process_count
  return list(step[start:stop])


def real_tokens(batch: Batch) -> int:
  """Real (non-padding) tokens in a batch."""
  return int(np.count_nonzero(batch["segment_ids"]))


class Batcher:
  """Yields this host's numpy batches of tokenized examples, unpacked or packed."""

  def __init__(self, tokenized: Tokenized, labels: np.ndarray | None, *,
               global_batch_size: int, max_length: int, packing: bool = False,
               max_per_row: int = 16, seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = False, process_index: int = 0,
               process_count: int = 1, row_multiple: int = 1):
    """labels: int32 ids or float32 scores per example, None for unlabelled data.

    row_multiple: packed row counts are rounded up to a multiple of it (the local device
    count, so rows shard evenly); unpacked rows per host must already be a multiple.
    """
    if not 0 <= process_index < process_count:
      raise UserError(f"process index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
      raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes")
    rows = global_batch_size // process_count
    if not packing and rows % row_multiple:
      raise UserError(f"{rows} rows per host are not divisible by {row_multiple} devices")
    if max_per_row < 1:
      raise UserError(f"max_per_row must be >= 1, got {max_per_row}")
    longest = int(tokenized.lengths.max(initial=0))
    if longest > max_length:
      raise UserError(f"an example has {longest} tokens, more than max_length={max_length}")
    if labels is not None and len(labels) != len(tokenized):
      raise UserError(f"{len(labels)} labels for {len(tokenized)} examples")
    self.tokenized = tokenized
    self.pad_id = tokenized.pad_id  # fills input_ids where segment_ids == 0
    self.lengths = np.asarray(tokenized.lengths, np.int64)
    self.labels = labels
    self.label_dtype = np.float32 if labels is not None and labels.dtype.kind == "f" else np.int32
    self.global_batch_size = global_batch_size
    self.max_length = max_length
    self.packing = packing
    self.max_per_row = max_per_row if packing else 1
    self.seed = seed
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.process_count = process_count
    self.rows_per_host = rows
    self.buckets = length_buckets(max_length)
    self.row_counts = row_counts(rows, row_multiple)

  def plan(self, epoch: int) -> list[list[int]]:
    """Global example indices per step of an epoch."""
    return plan_epoch(self.lengths, self.global_batch_size, self.seed, epoch, self.shuffle,
                      self.drop_remainder)

  def steps_per_epoch(self) -> int:
    n = len(self.lengths)
    full, rest = divmod(n, self.global_batch_size)
    return full + (1 if rest and not self.drop_remainder else 0)

  def shapes(self) -> list[tuple[int, int, int]]:
    """Every (rows, length, slots per row) a batch of this host can have."""
    if self.packing:
      return [(r, self.max_length, self.max_per_row) for r in self.row_counts]
    return [(self.rows_per_host, b, 1) for b in self.buckets]

  def _layout(self, step: list[int]) -> tuple[list[list[int]], int, int]:
    """This host's rows (example indices per row) and the step's (rows, length)."""
    if not self.packing:
      longest = int(self.lengths[step].max())
      length = next(b for b in self.buckets if b >= longest)
      mine = host_slice(step, self.process_index, self.process_count)
      return [[i] for i in mine], self.rows_per_host, length
    # Pack every host's share to learn the largest row count, so all hosts agree on it.
    most, mine = 0, []
    for p in range(self.process_count):
      share = host_slice(step, p, self.process_count)
      packed = pack(self.lengths[share].tolist(), self.max_length, self.max_per_row)
      most = max(most, len(packed))
      if p == self.process_index:
        mine = [[share[j] for j in row] for row in packed]
    rows = next(r for r in self.row_counts if r >= most)
    return mine, rows, self.max_length

  def _materialise(self, rows_ex: list[list[int]], rows: int, length: int) -> Batch:
    slots = self.max_per_row
    tok = self.tokenized
    batch = {
        "input_ids": np.full((rows, length), tok.pad_id, np.int32),
        "token_type_ids": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "position_ids": np.zeros((rows, length), np.int32),
        "cls_index": np.zeros((rows, slots), np.int32),
        "labels": np.zeros((rows, slots), self.label_dtype),
        "example_mask": np.zeros((rows, slots), np.float32),
        "example_ids": np.full((rows, slots), -1, np.int32),
    }
    for r, examples in enumerate(rows_ex):
      start = 0
      for k, i in enumerate(examples):
        n = int(self.lengths[i])
        end = start + n
        batch["input_ids"][r, start:end] = tok.ids[i]
        batch["token_type_ids"][r, start:end] = tok.type_ids[i]
        batch["segment_ids"][r, start:end] = k + 1
        batch["position_ids"][r, start:end] = np.arange(n)
        batch["cls_index"][r, k] = start
        if self.labels is not None:
          batch["labels"][r, k] = self.labels[i]
        batch["example_mask"][r, k] = 1.0
        batch["example_ids"][r, k] = i
        start = end
    return batch

  def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """This host's batches of an epoch, from start_step (to resume mid-epoch)."""
    for step in self.plan(epoch)[start_step:]:
      yield self._materialise(*self._layout(step))

  def step_shapes(self, epoch: int) -> list[tuple[int, int]]:
    """(rows, length) of each step of an epoch, without building the arrays."""
    return [self._layout(step)[1:] for step in self.plan(epoch)]

  def global_real_tokens(self, epoch: int) -> np.ndarray:
    """Real tokens per global step (all hosts), for tokens/sec."""
    return np.array([int(self.lengths[step].sum()) for step in self.plan(epoch)], np.int64)

  def padding_fraction(self, epoch: int = 0) -> float:
    """Share of the epoch's token slots (all hosts) that hold padding."""
    real = int(self.global_real_tokens(epoch).sum())
    slots = sum(r * l for r, l in self.step_shapes(epoch)) * self.process_count
    return 1.0 - real / slots if slots else 0.0
