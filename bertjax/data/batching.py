"""Deterministic global batch plans and this host's share of each batch.

The examples are split into `num_shards` contiguous shards, and each shard fills its own equal
block of every step's rows (shuffled, packed or batched on its own). Every host computes the same
plan from (seed, epoch) and the global token lengths, so all hosts agree on each step's examples
and array shapes without talking to each other; each then materialises only its own rows, which
come from its own shards when it owns num_shards / process_count of them (so it only needs the
tokens of those). For a given num_shards, the plan does not depend on the number of hosts; packed
rows per step do depend on the device count (times accumulation steps), to which they are rounded.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from bertjax.data.tokenize import Tokenized
from bertjax.errors import UserError

Batch = dict[str, np.ndarray]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, shard: int | None = None) -> np.ndarray:
  """The order examples are visited in an epoch: a permutation from (seed, epoch[, shard]), or 0..n-1."""
  if shuffle:
    return np.random.default_rng([seed, epoch] + ([] if shard is None else [shard])).permutation(n)
  return np.arange(n)


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
  """[start, stop) of a shard's examples: contiguous, sizes differ by at most one."""
  return n * shard // num_shards, n * (shard + 1) // num_shards


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
  """Row lengths of unpacked batches: powers of two from `smallest`, and max_length."""
  buckets, b = [], smallest
  while b < max_length:
    buckets.append(b)
    b *= 2
  return buckets + [max_length]


def stream_rows(global_batch_size: int, mean_length: float, max_length: int, multiple: int = 1) -> int:
  """Rows of one packed global step that hold `global_batch_size` examples of the mean length,
  rounded to the nearest multiple of `multiple` (at least one multiple)."""
  rows = global_batch_size * mean_length / max_length
  return max(multiple, multiple * round(rows / multiple))


def pack_stream(lengths: np.ndarray, order: Sequence[int], rows: int, max_length: int, max_per_row: int,
                window: int) -> list[list[list[int]]]:
  """Packs the example stream `order` into steps of `rows` rows of `max_length` tokens.

  Each step looks at the oldest `window` waiting examples in stream order and puts each one into the
  fullest row it still fits (best fit); an example that fits nowhere waits for the next step, where it
  is among the first placed, so no example waits long. Returns rows of example indices per step; every
  example of `order` appears exactly once, and only the last steps can be partly empty.
  """
  lengths = np.asarray(lengths, np.int64)
  shortest = int(lengths[list(order)].min()) if len(order) else 1
  steps: list[list[list[int]]] = []
  waiting: list[int] = []
  stream = iter(int(i) for i in order)
  exhausted = False
  while True:
    while not exhausted and len(waiting) < window:
      i = next(stream, None)
      if i is None:
        exhausted = True
      else:
        waiting.append(i)
    if not waiting:
      return steps
    packed: list[list[int]] = [[] for _ in range(rows)]
    room = [max_length] * rows  # 0 once a row has max_per_row examples
    left: list[int] = []
    for pos, i in enumerate(waiting):
      need = int(lengths[i])
      best = -1
      for r in range(rows):
        if need <= room[r] and (best < 0 or room[r] < room[best]):
          best = r
      if best < 0:
        left.append(i)
        continue
      packed[best].append(i)
      room[best] = room[best] - need if len(packed[best]) < max_per_row else 0
      if max(room) < shortest:  # nothing else can fit: keep the rest for the next step
        left.extend(waiting[pos + 1:])
        break
    waiting = left
    steps.append(packed)


def real_tokens(batch: Batch) -> int:
  """Real (non-padding) tokens in a batch."""
  return int(np.count_nonzero(batch["segment_ids"]))


class Batcher:
  """Yields this host's numpy batches of tokenized examples, unpacked or packed.

  Unpacked: `global_batch_size` examples per step, one per row, rows padded to a length bucket.
  Packed (stream packing): every step has the same shape [rows, row_length], filled from the
  shuffled example stream (`pack_stream`); row_length is the longest example's length rounded up to 16
  (at most max_length), and rows are chosen from the mean example length so that
  `global_batch_size` is the mean number of examples per step, and the number of steps per epoch
  can differ by a step or two between epochs (`steps_in_epoch`).
  With several shards, each shard fills rows // num_shards rows of every step; a shard that runs
  out before the others leaves its rows empty in the epoch's last steps.
  """

  def __init__(self, tokenized: Tokenized, labels: np.ndarray | None, *,
               global_batch_size: int, max_length: int, packing: bool = False,
               max_per_row: int = 16, seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = False, process_index: int = 0,
               process_count: int = 1, row_multiple: int = 1, lookahead: int = 256,
               num_shards: int = 1, lengths: np.ndarray | None = None, local_start: int = 0):
    """tokenized: the examples [local_start, local_start + len(tokenized)) of the whole set, whose
    token `lengths` (all examples) are given when this host holds only part of it.
    labels: int32 ids or float32 scores per example (all examples), None for unlabelled data.
    row_multiple: rows per host must be a multiple of it (the local device count times the
    accumulation steps, so rows shard evenly); packed row counts are rounded to it.
    lookahead: packed steps choose among the next (examples per step + lookahead) examples.
    drop_remainder: unpacked only (a packed epoch ends when the stream is used up).
    """
    if not 0 <= process_index < process_count:
      raise UserError(f"process index {process_index} not in [0, {process_count})")
    if global_batch_size < 1:
      raise UserError(f"global batch size must be >= 1, got {global_batch_size}")
    if num_shards < 1:
      raise UserError(f"data.num_shards must be >= 1, got {num_shards}")
    if not packing and global_batch_size % math.lcm(process_count, num_shards):
      raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes and {num_shards} data shards")
    if not packing and (global_batch_size // process_count) % row_multiple:
      raise UserError(f"{global_batch_size // process_count} rows per host are not divisible by "
                      f"{row_multiple} devices")
    if max_per_row < 1:
      raise UserError(f"max_per_row must be >= 1, got {max_per_row}")
    self.lengths = np.asarray(tokenized.lengths if lengths is None else lengths, np.int64)
    if not 0 <= local_start <= local_start + len(tokenized) <= len(self.lengths):
      raise ValueError(f"examples [{local_start}, {local_start + len(tokenized)}) outside the "
                       f"{len(self.lengths)} examples")
    longest = int(self.lengths.max(initial=0))
    if longest > max_length:
      raise UserError(f"an example has {longest} tokens, more than max_length={max_length}")
    if labels is not None and len(labels) != len(self.lengths):
      raise UserError(f"{len(labels)} labels for {len(self.lengths)} examples")
    self.tokenized = tokenized
    self.local_start = local_start
    self.pad_id = tokenized.pad_id  # fills input_ids where segment_ids == 0
    self.labels = labels
    self.label_dtype = np.float32 if labels is not None and labels.dtype.kind == "f" else np.int32
    self.global_batch_size = global_batch_size
    self.max_length = max_length
    self.packing = packing
    self.max_per_row = max_per_row if packing else 1
    self.seed = seed
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder and not packing
    self.process_index = process_index
    self.process_count = process_count
    self.num_shards = num_shards
    self.buckets = length_buckets(max_length)
    # Packed rows are as long as the longest example, rounded up to 16 tokens (at most max_length):
    # attention costs each token the row's length, so short texts run faster in shorter rows.
    self.row_length = min(max_length, -(-max(longest, 1) // 16) * 16) if packing else max_length
    if packing:
      mean = float(self.lengths.mean()) if len(self.lengths) else 1.0
      multiple = math.lcm(row_multiple * process_count, num_shards)
      self.rows_per_step = stream_rows(global_batch_size, mean, self.row_length, multiple)
    else:
      self.rows_per_step = global_batch_size
    self.rows_per_host = self.rows_per_step // process_count
    self.rows_per_shard = self.rows_per_step // num_shards
    if packing:
      self.window = int(np.ceil(self.rows_per_shard * self.row_length / mean)) + lookahead
    self._cached: tuple[int, list] | None = None  # (epoch, layout) of the last epoch asked for

  def _shard_steps(self, shard: int, epoch: int) -> list[list[list[int]]]:
    """Rows (example indices per row) of each step of one shard's block."""
    start, stop = shard_bounds(len(self.lengths), shard, self.num_shards)
    order = start + epoch_order(stop - start, self.seed, epoch, self.shuffle,
                                shard if self.num_shards > 1 else None)
    rows = self.rows_per_shard
    if self.packing:
      return pack_stream(self.lengths, order, rows, self.row_length, self.max_per_row, self.window)
    end = len(order) - len(order) % rows if self.drop_remainder else len(order)
    return [[[int(i)] for i in order[k:k + rows]] for k in range(0, end, rows)]

  def _epoch(self, epoch: int) -> list[list[list[int]]]:
    """Global rows (example indices per row, [] for an empty row) of each step; unpacked rows hold
    one example."""
    if self._cached is None or self._cached[0] != epoch:
      shards = [self._shard_steps(s, epoch) for s in range(self.num_shards)]
      rows = self.rows_per_shard
      steps = []
      count = (min if self.drop_remainder else max)(len(blocks) for blocks in shards)
      for t in range(count):
        step: list[list[int]] = []
        for blocks in shards:
          block = blocks[t] if t < len(blocks) else []
          step += block + [[] for _ in range(rows - len(block))]
        steps.append(step)
      self._cached = (epoch, steps)
    return self._cached[1]

  def plan(self, epoch: int) -> list[list[int]]:
    """Global example indices of each step of an epoch (rows in order, host 0's rows first)."""
    return [[i for row in step for i in row] for step in self._epoch(epoch)]

  def steps_in_epoch(self, epoch: int) -> int:
    return len(self._epoch(epoch))

  def steps_per_epoch(self) -> int:
    """Steps of epoch 0: exact when unpacked, within a step or two of every epoch when packed."""
    return self.steps_in_epoch(0)

  def shapes(self) -> list[tuple[int, int, int]]:
    """Every (rows, length, slots per row) a batch of this host can have."""
    if self.packing:
      return [(self.rows_per_host, self.row_length, self.max_per_row)]
    return [(self.rows_per_host, b, 1) for b in self.buckets]

  def _layout(self, step: list[list[int]]) -> tuple[list[list[int]], int, int]:
    """This host's rows (example indices per row) and the step's (rows, length)."""
    start = self.rows_per_host * self.process_index
    mine = step[start:start + self.rows_per_host]
    if self.packing:
      return mine, self.rows_per_host, self.row_length
    longest = int(max(self.lengths[row[0]] for row in step if row))
    return mine, self.rows_per_host, next(b for b in self.buckets if b >= longest)

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
        local = i - self.local_start
        if not 0 <= local < len(tok):
          raise RuntimeError(f"example {i} is not among this host's examples "
                             f"[{self.local_start}, {self.local_start + len(tok)})")
        batch["input_ids"][r, start:end] = tok.ids[local]
        batch["token_type_ids"][r, start:end] = tok.type_ids[local]
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
    for step in self._epoch(epoch)[start_step:]:
      yield self._materialise(*self._layout(step))

  def step_shapes(self, epoch: int) -> list[tuple[int, int]]:
    """(rows, length) of each step of an epoch, without building the arrays."""
    return [self._layout(step)[1:] for step in self._epoch(epoch)]

  def global_real_tokens(self, epoch: int) -> np.ndarray:
    """Real tokens per global step (all hosts), for tokens/sec."""
    return np.array([int(self.lengths[step].sum()) for step in self.plan(epoch)], np.int64)

  def padding_fraction(self, epoch: int = 0) -> float:
    """Share of the epoch's token slots (all hosts) that hold padding."""
    real = int(self.global_real_tokens(epoch).sum())
    slots = sum(r * l for r, l in self.step_shapes(epoch)) * self.process_count
    return 1.0 - real / slots if slots else 0.0
