"""From the `data` config group to batchers: read, map labels, tokenize (cached), batch."""

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from bertjax.data import sources
from bertjax.data.batching import Batcher
from bertjax.data.tokenize import tokenize_cached
from bertjax.errors import UserError
from bertjax.models.config import EncoderConfig


@dataclasses.dataclass
class Split:
  examples: sources.Examples
  labels: np.ndarray
  batcher: Batcher


@dataclasses.dataclass
class TaskData:
  task: str
  label_names: list[str] | None  # None for regression
  train: Split | None
  eval: Split | None

  @property
  def num_labels(self) -> int:
    return 1 if self.task == "regression" else len(self.label_names)


def load_tokenizer(folder: Path):
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(str(folder))
  except Exception as e:  # transformers raises many types for a folder without tokenizer files
    raise UserError(f"{folder}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None


def text_fields(data_cfg) -> tuple:
  fields = data_cfg.text_fields
  fields = tuple(fields) if isinstance(fields, (list, tuple)) else (fields,)
  if not 1 <= len(fields) <= 2:
    raise UserError(f"data.text_fields must name one or two columns, got {fields!r}")
  return fields


def read(data_cfg, path: str, labelled: bool = True) -> sources.Examples:
  return sources.read_examples(path, text_fields(data_cfg), data_cfg.label_field if labelled else None,
                               has_header=data_cfg.has_header, task=data_cfg.task, quoting=data_cfg.quoting,
                               tfds_data_dir=data_cfg.get("tfds_data_dir", ""))


def resolve_label_names(data_cfg, train: sources.Examples) -> list[str] | None:
  """Class names from the config, the source (tfds, a names file) or the training labels."""
  if data_cfg.task == "regression":
    return None
  given = list(data_cfg.label_names) if data_cfg.label_names else None
  if data_cfg.label_names_file:
    if given:
      raise UserError("set data.label_names or data.label_names_file, not both")
    given = sources.read_label_names(data_cfg.label_names_file)
  given = given or train.label_names
  return sources.label_names(train.labels, given, data_cfg.num_labels or None)


def build(data_cfg, tokenizer, model_cfg: EncoderConfig, cache_dir: Path | None, *, global_batch_size: int,
          eval_batch_size: int, seed: int, process_index: int, process_count: int, row_multiple: int,
          label_names: list[str] | None = None) -> TaskData:
  """Reads, tokenizes and batches data.train and data.eval. `label_names` (from a resumed run)
  overrides what the data would infer, so ids never shift between runs. The training order is
  shuffled with data.shuffle_seed, or with `seed` (train.seed) when that is -1."""
  if data_cfg.get("shuffle_seed", -1) >= 0:
    seed = int(data_cfg.shuffle_seed)
  limit = model_cfg.max_position_embeddings - model_cfg.position_offset
  if data_cfg.max_length > limit:
    raise UserError(f"data.max_length={data_cfg.max_length} exceeds the model's {limit} positions")
  if data_cfg.truncation not in ("longest_first", "proportional"):
    raise UserError(f"data.truncation must be longest_first or proportional, got {data_cfg.truncation!r}")
  if not data_cfg.train:
    raise UserError("data.train is empty: give a .tsv/.csv/.jsonl path or tfds:NAME:SPLIT")
  train = read(data_cfg, data_cfg.train)
  names = label_names if label_names is not None else resolve_label_names(data_cfg, train)
  evals = read(data_cfg, data_cfg.eval) if data_cfg.eval else None
  common = dict(max_length=data_cfg.max_length, packing=data_cfg.packing, max_per_row=data_cfg.max_per_row,
                process_index=process_index, process_count=process_count, row_multiple=row_multiple)

  def split(examples, batch_size, shuffle):
    labels = sources.encode_labels(examples, names or [], data_cfg.task)
    tokens = tokenize_cached(cache_dir, tokenizer, examples, data_cfg.max_length, data_cfg.truncation,
                             model_cfg.type_vocab_size > 1, text_fields(data_cfg))
    batcher = Batcher(tokens, labels, global_batch_size=batch_size, seed=seed, shuffle=shuffle, **common)
    return Split(examples, labels, batcher)

  return TaskData(task=data_cfg.task, label_names=names, train=split(train, global_batch_size, True),
                  eval=split(evals, eval_batch_size, False) if evals is not None else None)


def example_count(split: Split | None) -> int:
  return 0 if split is None else len(split.examples)


def describe(data: TaskData) -> dict[str, Any]:
  return {"task": data.task, "label_names": data.label_names,
          "num_train_examples": example_count(data.train), "num_eval_examples": example_count(data.eval)}
