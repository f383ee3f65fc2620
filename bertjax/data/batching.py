"""Deterministic global batch plans and this host's share of each batch.

The examples are split into `num_shards` contiguous shards, and each shard fills its own equal
block of every step's rows (shuffled, packed or batched on its own). Every host computes the same
plan from (seed, epoch) and the global token lengths, so all hosts agree on each step's examples
and array shapes without talking to each other; each then materialises only its own rows, which
come from its own shards when it owns num_shards / process_count of them (so it only needs the
tokens of those). For a given num_shards, the plan does not depend on the number of hosts; packed
rows per step do depend on the device count (times accumulation steps), to which they are rounded.

A batch is one int32 array (`Batch`), so one transfer per step carries it to the devices; `Batch.fields()`
names its parts on the host and inside a step. The next epoch is planned in a background thread
while the current one runs, and a step's arrays are gathered from the flat token buffers with one index
array, not example by example.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bertjax.data.packing import Plan, choose_layout, in_batches, merge_shards, pack_stream
from bertjax.data.tokenize import Tokenized
from bertjax.errors import UserError

TOKEN_FIELDS = ("input_ids", "token_type_ids", "segment_ids", "position_ids")
SLOT_FIELDS = ("cls_index", "labels", "example_mask", "example_ids")


@flax.struct.dataclass
class Batch:
  """One step's rows on a host (numpy) or on the devices (jax): a single int32 array, so that one transfer
  per step carries it. data[r, k, :length] is token field k of row r (TOKEN_FIELDS); data[r, k, length:] is
  slot field k (SLOT_FIELDS: each example's first token, its label as a float32 bit pattern, 1 for a real
  example, its index or -1) for the row's num_slots examples."""
  data: Any  # int32 [rows, 4, length + num_slots]
  num_slots: int = flax.struct.field(pytree_node=False)

  @property
  def length(self) -> int:
    return self.data.shape[-1] - self.num_slots

  @property
  def shape(self) -> tuple[int, int, int]:
    """(rows, length, slots per row)."""
    return self.data.shape[0], self.length, self.num_slots

  def fields(self) -> dict:
    """The named arrays: int32 [rows, length] token fields, and per slot cls_index, labels (float32: class
    ids or scores), example_mask (float32 1/0) and example_ids."""
    tokens, slots = self.data[:, :, :self.length], self.data[:, :, self.length:]
    out = {name: tokens[:, k] for k, name in enumerate(TOKEN_FIELDS)}
    if isinstance(slots, np.ndarray):
      labels = np.ascontiguousarray(slots[:, 1]).view(np.float32)
    else:  # a traced or device array
      labels = jax.lax.bitcast_convert_type(slots[:, 1], jnp.float32)
    return {**out, "cls_index": slots[:, 0], "labels": labels, "example_mask": slots[:, 2].astype(np.float32),
            "example_ids": slots[:, 3]}


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


def real_tokens(batch: Batch) -> int:
  """Real (non-padding) tokens in a batch."""
  return int(np.count_nonzero(batch.fields()["segment_ids"]))


class Batcher:
  """Yields this host's numpy batches of tokenized examples, unpacked or packed.

  Unpacked: `global_batch_size` examples per step, one per row, rows padded to a length bucket.
  Packed (stream packing): every step has the same shape [rows, row_length], filled from the
  shuffled example stream (`pack_stream`). `choose_layout` picks the rows the plan fills
  (plan_rows) and their length from the token lengths and the batch size alone, so that
  `global_batch_size` is the mean number of examples per step on any device count; the number of steps
  per epoch can differ by a step or two between epochs (`steps_in_epoch`). The arrays have
  rows_per_step rows: plan_rows rounded up to a multiple of the devices (times accumulation steps),
  the extra rows empty.
  With several shards, each shard fills plan_rows // num_shards of its rows_per_step // num_shards rows
  of every step; a shard that runs out before the others leaves its rows empty in the epoch's last steps.
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
    accumulation steps, so rows shard evenly); packed steps get empty rows up to it.
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
    if packing:
      # Rows and row length from the lengths and the batch size alone (choose_layout), so the plan
      # is the same on any device count; the arrays get empty rows up to a multiple of the devices.
      self.plan_rows, self.row_length = choose_layout(self.lengths, global_batch_size, max_length,
                                                      self.max_per_row, num_shards, lookahead)
      mean = float(self.lengths.mean()) if len(self.lengths) else 1.0
      self.window = int(np.ceil(self.plan_rows // num_shards * self.row_length / mean)) + lookahead
    else:
      self.plan_rows, self.row_length = global_batch_size, max_length
    if not packing and (global_batch_size // process_count) % row_multiple:
      raise UserError(f"{global_batch_size // process_count} rows per host are not divisible by "
                      f"{row_multiple} devices")
    self.row_multiple = math.lcm(row_multiple * process_count, num_shards)
    self.rows_per_step = -(-self.plan_rows // self.row_multiple) * self.row_multiple
    self.rows_per_host = self.rows_per_step // process_count
    self.rows_per_shard = self.rows_per_step // num_shards
    self._lock = threading.Lock()
    self._plans: dict[int, concurrent.futures.Future] = {}  # the latest epochs' plans (or being planned)
    self._summaries: dict[int, tuple] = {}  # every planned epoch's per-step counts

  # ----- plans ---------------------------------------------------------------------------

  def _shard_plan(self, shard: int, epoch: int) -> Plan:
    start, stop = shard_bounds(len(self.lengths), shard, self.num_shards)
    order = start + epoch_order(stop - start, self.seed, epoch, self.shuffle,
                                shard if self.num_shards > 1 else None)
    if self.packing:
      return pack_stream(self.lengths, order, self.plan_rows // self.num_shards, self.row_length,
                                 self.max_per_row, self.window)
    return in_batches(order, self.rows_per_shard, self.drop_remainder)

  def _compute(self, epoch: int) -> Plan:
    plans = [self._shard_plan(s, epoch) for s in range(self.num_shards)]
    return merge_shards(plans, self.rows_per_shard, self.drop_remainder)

  def _plan(self, epoch: int) -> Plan:
    """The epoch's plan: computed here, or waited for if `plan_ahead` started it."""
    with self._lock:
      future = self._plans.get(epoch)
      mine = future is None
      if mine:
        future = self._plans[epoch] = concurrent.futures.Future()
        self._forget_old_plans()
    if mine:
      try:
        future.set_result(self._compute(epoch))
      except BaseException as e:
        future.set_exception(e)
    plan = future.result()
    if epoch not in self._summaries:
      self._summaries[epoch] = (plan.sizes(), plan.per_step_sum(self.lengths), self._step_lengths(plan))
    return plan

  def plan_ahead(self, epoch: int) -> None:
    """Starts planning `epoch` in a background thread (a no-op if it is planned or being planned)."""
    with self._lock:
      if epoch in self._plans:
        return
      future = self._plans[epoch] = concurrent.futures.Future()
      self._forget_old_plans()

    def work():
      try:
        future.set_result(self._compute(epoch))
      except BaseException as e:  # re-raised in the thread that asks for the plan
        future.set_exception(e)
    threading.Thread(target=work, name=f"plan-epoch-{epoch}", daemon=True).start()

  def _forget_old_plans(self) -> None:
    """Keeps the few most recent plans (the current epoch's and the next one's), not every epoch's."""
    while len(self._plans) > 3:
      oldest = next(e for e, f in self._plans.items() if f.done() or e != max(self._plans))
      del self._plans[oldest]

  def _step_lengths(self, plan: Plan) -> np.ndarray:
    """Row length of each step: the packed row length, or the bucket of the step's longest example."""
    if self.packing:
      return np.full(plan.num_steps, self.row_length, np.int64)
    buckets = np.asarray(self.buckets)
    return buckets[np.searchsorted(buckets, plan.per_step_max(self.lengths))]

  def _summary(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(examples, real tokens, row length) per step, kept for every epoch asked for."""
    if epoch not in self._summaries:
      self._plan(epoch)
    return self._summaries[epoch]

  def plan(self, epoch: int) -> list[list[int]]:
    """Global example indices of each step of an epoch (rows in order, host 0's rows first)."""
    return self._plan(epoch).step_lists()

  def steps_in_epoch(self, epoch: int) -> int:
    return len(self._summary(epoch)[0])

  def steps_per_epoch(self) -> int:
    """Steps of epoch 0: exact when unpacked, within a step or two of every epoch when packed."""
    return self.steps_in_epoch(0)

  def examples_per_step(self, epoch: int) -> np.ndarray:
    """Examples (all hosts) in each step of an epoch."""
    return self._summary(epoch)[0]

  def global_real_tokens(self, epoch: int) -> np.ndarray:
    """Real tokens per global step (all hosts), for tokens/sec."""
    return self._summary(epoch)[1]

  def step_shapes(self, epoch: int) -> list[tuple[int, int]]:
    """(rows, length) of this host's batch in each step of an epoch, without building the arrays."""
    return [(self.rows_per_host, int(n)) for n in self._summary(epoch)[2]]

  def shapes(self) -> list[tuple[int, int, int]]:
    """Every (rows, length, slots per row) a batch of this host can have."""
    if self.packing:
      return [(self.rows_per_host, self.row_length, self.max_per_row)]
    return [(self.rows_per_host, b, 1) for b in self.buckets]

  # ----- batches --------------------------------------------------------------------------

  def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """This host's batches of an epoch, from start_step (to resume mid-epoch); the next epoch is planned
    meanwhile. Runs of steps with the same shape are built together, up to ~64k tokens at a time."""
    plan = self._plan(epoch)
    lengths = self._summary(epoch)[2]
    self.plan_ahead(epoch + 1)
    step = start_step
    while step < plan.num_steps:
      length = int(lengths[step])
      stop = step + 1
      most = step + max(1, 2 ** 16 // (self.rows_per_host * length))
      while stop < min(most, plan.num_steps) and lengths[stop] == length:
        stop += 1
      data = self._materialise(plan, step, stop, length)
      for k in range(stop - step):
        yield Batch(data[k], self.max_per_row)
      step = stop

  def stream(self, epoch: int, start_step: int, steps: int) -> Iterator[Batch]:
    """`steps` batches of this host from step `start_step` of `epoch` on, running on through the next epochs."""
    while steps > 0:
      for batch in itertools.islice(self.iterate(epoch, start_step), steps):
        yield batch
        steps -= 1
      epoch, start_step = epoch + 1, 0

  def _materialise(self, plan: Plan, first: int, stop: int, length: int) -> np.ndarray:
    """This host's rows of steps [first, stop), all of row length `length`, as Batch data
    [steps, rows, 4, length + max_per_row], gathered from the flat token buffers with one index array."""
    lo, hi = plan.bounds[first], plan.bounds[stop]
    rows_per_host, first_row = self.rows_per_host, self.rows_per_host * self.process_index
    rows = plan.rows[lo:hi] - first_row
    mine = (rows >= 0) & (rows < rows_per_host)
    step_of = np.repeat(np.arange(stop - first), np.diff(plan.bounds[first:stop + 1]))[mine]
    rows = step_of * rows_per_host + rows[mine]  # row among all the steps' rows
    examples, slots = plan.examples[lo:hi][mine], plan.slots[lo:hi][mine]
    tok = self.tokenized
    local = examples - self.local_start
    if len(local) and (local.min() < 0 or local.max() >= len(tok)):
      bad = int(examples[(local < 0) | (local >= len(tok))][0])
      raise RuntimeError(f"example {bad} is not among this host's examples "
                         f"[{self.local_start}, {self.local_start + len(tok)})")
    n = self.lengths[examples]
    before = np.cumsum(n) - n  # tokens of the earlier examples (a row's examples are consecutive)
    row_start = np.maximum.accumulate(np.where(slots == 0, np.arange(len(n)), 0)) if len(n) else n
    start = before - before[row_start]  # each example's first token within its row
    token_example = np.repeat(np.arange(len(n)), n)
    within = np.arange(int(n.sum())) - before[token_example]  # position within the example
    width = length + self.max_per_row
    plane = 4 * width  # one row's int32s: 4 fields of `width`
    target = (rows * plane + start)[token_example] + within  # in the input-id field, flattened
    source = tok.offsets[local][token_example] + within
    steps = stop - first
    data = np.zeros((steps, rows_per_host, 4, width), np.int32)
    data[:, :, 0, :length] = self.pad_id
    data[:, :, 3, length:] = -1
    flat = data.reshape(-1)
    flat[target] = tok.flat_ids[source]
    flat[target + width] = tok.flat_type_ids[source]
    flat[target + 2 * width] = slots[token_example] + 1
    flat[target + 3 * width] = within
    slot = rows * plane + length + slots  # in the first slot field, flattened
    flat[slot] = start
    if self.labels is not None:
      flat[slot + width] = self.labels[examples].astype(np.float32).view(np.int32)
    flat[slot + 2 * width] = 1
    flat[slot + 3 * width] = examples
    return data

  def padding_fraction(self, epoch: int = 0) -> float:
    """Share of the epoch's token slots (all hosts) that hold padding."""
    real = int(self.global_real_tokens(epoch).sum())
    slots = int(self._summary(epoch)[2].sum()) * self.rows_per_step
    return 1.0 - real / slots if slots else 0.0
