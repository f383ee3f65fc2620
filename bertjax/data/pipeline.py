"""From the `data` config group to batchers: read, map labels, tokenize (cached), batch."""

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bertjax.data import sources
from bertjax.data.batching import Batcher
from bertjax.data.tokenize import check_truncation, tokenize_cached
from bertjax.errors import UserError
from bertjax.models.config import EncoderConfig


@dataclasses.dataclass
class Split:
  examples: sources.Examples  # this host's shard (all of it when not sharded)
  labels: np.ndarray  # every example's label
  batcher: Batcher

  def __len__(self) -> int:
    return len(self.labels)


Gather = Callable[[np.ndarray], np.ndarray]  # all processes' arrays, concatenated in process order


def agreed(gather: Gather | None, work: Callable[[], Any], what: str) -> Any:
  """`work()`, which reads this process's data shard. With several processes (`gather`), a bad-input error
  (or any exception) on one process stops them all here, each with its line, instead of leaving the others
  waiting for it."""
  if gather is None:
    return work()
  try:
    result, error = work(), None
  except Exception as e:  # a UserError, or anything unexpected: the others must not wait for this process
    result, error = None, e
  failed = gather(np.array([error is not None], np.int32))
  if error is not None:
    raise error
  if failed.any():
    raise UserError(f"stopped: process {int(np.argmax(failed))} failed on its shard of {what} (see its output)")
  return result


def gather_strings(gather: Gather, values: list[str]) -> list[str]:
  """All processes' lists of strings, concatenated (through `gather`, which moves numbers)."""
  raw = np.frombuffer(json.dumps(values).encode(), np.uint8).astype(np.int32)
  mine = np.concatenate([np.array([len(raw)], np.int32), raw])
  everything, out = gather(mine), []
  while len(everything):
    n = int(everything[0])
    out += json.loads(bytes(everything[1:1 + n].astype(np.uint8)).decode())
    everything = everything[1 + n:]
  return out


@dataclasses.dataclass
class TaskData:
  task: str
  label_names: list[str] | None  # None for regression
  train: Split | None
  eval: Split | None

  @property
  def num_labels(self) -> int:
    return 1 if self.task == "regression" else len(self.label_names)


def text_fields(data_cfg) -> tuple:
  return sources.check_fields(data_cfg.text_fields)


def read(data_cfg, path: str, labelled: bool = True, shard: tuple[int, int] = (0, 1)) -> sources.Examples:
  return sources.read_examples(path, text_fields(data_cfg), data_cfg.label_field if labelled else None,
                               has_header=data_cfg.has_header, task=data_cfg.task, quoting=data_cfg.quoting,
                               tfds_data_dir=data_cfg.get("tfds_data_dir", ""), shard=shard)


def resolve_label_names(data_cfg, train: sources.Examples, gather: Gather | None = None) -> list[str] | None:
  """Class names from the config, the source (tfds, a names file) or the training labels (of
  every shard, through `gather`, when this host read only its own)."""
  if data_cfg.task == "regression":
    return None
  given = list(data_cfg.label_names) if data_cfg.label_names else None
  if data_cfg.label_names_file:
    if given:
      raise UserError("set data.label_names or data.label_names_file, not both")
    given = sources.read_label_names(data_cfg.label_names_file)
  given = given or train.label_names
  seen = train.labels
  if gather is not None and not given:
    seen = gather_strings(gather, sorted({str(label) for label in train.labels if label is not None}))
  return sources.label_names(seen, given, data_cfg.num_labels or None)


def build(data_cfg, tokenizer, model_cfg: EncoderConfig, cache_dir: Path | None, *, global_batch_size: int,
          eval_batch_size: int, seed: int, process_index: int, process_count: int, row_multiple: int,
          label_names: list[str] | None = None, gather: Gather | None = None) -> TaskData:
  """Reads, tokenizes and batches data.train and data.eval. `label_names` (from a resumed run)
  overrides what the data would infer, so ids never shift between runs. The training order is
  shuffled with data.shuffle_seed, or with `seed` (train.seed) when that is -1.

  With data.num_shards a multiple of the processes (0 = one shard per process), each process
  reads and tokenizes only its own shards and learns the token lengths and labels of the others
  through `gather` (needed then); otherwise every process reads everything."""
  if data_cfg.get("shuffle_seed", -1) >= 0:
    seed = int(data_cfg.shuffle_seed)
  limit = model_cfg.max_position_embeddings - model_cfg.position_offset
  if data_cfg.max_length > limit:
    raise UserError(f"data.max_length={data_cfg.max_length} exceeds the model's {limit} positions")
  check_truncation(data_cfg.truncation)
  if not data_cfg.train:
    raise UserError("data.train is not set: add --config.data.train=PATH (see docs/data.md)")
  num_shards = data_cfg.get("num_shards", 0) or process_count
  if num_shards < 0:
    raise UserError(f"data.num_shards must be >= 0, got {num_shards}")
  sharded = process_count > 1 and num_shards % process_count == 0
  if sharded and gather is None:
    raise ValueError("reading shards on several processes needs `gather`")
  shard = (process_index, process_count) if sharded else (0, 1)
  each = gather if sharded else None  # reading shards: agree on errors before exchanging anything
  train = agreed(each, lambda: read(data_cfg, data_cfg.train, shard=shard), data_cfg.train)
  names = label_names if label_names is not None else resolve_label_names(data_cfg, train, each)
  evals = agreed(each, lambda: read(data_cfg, data_cfg.eval, shard=shard), data_cfg.eval) if data_cfg.eval else None
  common = dict(max_length=data_cfg.max_length, packing=data_cfg.packing, max_per_row=data_cfg.max_per_row,
                process_index=process_index, process_count=process_count, row_multiple=row_multiple,
                num_shards=num_shards)

  def split(examples, batch_size, shuffle):
    labels, tokens = agreed(each, lambda: (
        sources.encode_labels(examples, names or [], data_cfg.task),
        tokenize_cached(cache_dir, tokenizer, examples, data_cfg.max_length, data_cfg.truncation,
                        model_cfg.type_vocab_size > 1, text_fields(data_cfg))), examples.source)
    lengths = None
    if sharded:  # this host's share; the plan needs every example's length, metrics every label
      labels, lengths = gather(labels), gather(tokens.lengths.astype(np.int32))
    batcher = Batcher(tokens, labels, global_batch_size=batch_size, seed=seed, shuffle=shuffle,
                      lengths=lengths, local_start=examples.start, **common)
    return Split(examples, labels, batcher)

  return TaskData(task=data_cfg.task, label_names=names, train=split(train, global_batch_size, True),
                  eval=split(evals, eval_batch_size, False) if evals is not None else None)


def example_count(split: Split | None) -> int:
  return 0 if split is None else len(split)


def describe(data: TaskData) -> dict[str, Any]:
  return {"task": data.task, "label_names": data.label_names,
          "num_train_examples": example_count(data.train), "num_eval_examples": example_count(data.eval)}
