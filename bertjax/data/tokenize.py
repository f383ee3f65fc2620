"""Tokenize single texts or pairs with the model's special tokens, truncate, and cache.

Texts are encoded without special tokens in large batches by the fast (Rust) tokenizer
(bertjax.data.tokenizer), then truncated and wrapped in the template the tokenizer's own post-processor uses (BERT
`[CLS] a [SEP] b [SEP]`, RoBERTa `<s> a </s></s> b </s>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bertjax.data.sources import Examples
from bertjax.data.tokenizer import Tokenizer
from bertjax.errors import UserError
from bertjax.files import atomic_write

TRUNCATIONS = ("longest_first", "proportional")
_CACHE_VERSION = 1  # bump when the cached arrays change meaning


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """Every example's token ids (with special tokens) and token types, in two flat buffers: example i is
  `flat_ids[offsets[i]:offsets[i + 1]]`. Batches are gathered from the buffers with one index array per
  step (bertjax.data.batching), not example by example."""
  flat_ids: np.ndarray       # int32 [total tokens]
  flat_type_ids: np.ndarray  # int32 [total tokens]
  lengths: np.ndarray        # int32 [N]
  pad_id: int
  offsets: np.ndarray = dataclasses.field(init=False, repr=False)  # int64 [N + 1]

  def __post_init__(self):
    offsets = np.zeros(len(self.lengths) + 1, np.int64)
    np.cumsum(self.lengths, out=offsets[1:])
    if offsets[-1] != len(self.flat_ids) or len(self.flat_ids) != len(self.flat_type_ids):
      raise ValueError(f"{len(self.flat_ids)} ids and {len(self.flat_type_ids)} token types for "
                       f"{int(offsets[-1])} tokens")
    object.__setattr__(self, "offsets", offsets)

  @classmethod
  def from_lists(cls, ids: Sequence[np.ndarray], type_ids: Sequence[np.ndarray], pad_id: int) -> "Tokenized":
    lengths = np.fromiter(map(len, ids), np.int32, len(ids))
    return cls(_flat(ids), _flat(type_ids), lengths, pad_id)

  def __len__(self) -> int:
    return len(self.lengths)

  def ids(self, i: int) -> np.ndarray:
    return self.flat_ids[self.offsets[i]:self.offsets[i + 1]]

  def type_ids(self, i: int) -> np.ndarray:
    return self.flat_type_ids[self.offsets[i]:self.offsets[i + 1]]

  def select(self, start: int, stop: int) -> "Tokenized":
    """Examples [start, stop) (e.g. one host's shard)."""
    lo, hi = self.offsets[start], self.offsets[stop]
    return Tokenized(self.flat_ids[lo:hi], self.flat_type_ids[lo:hi], self.lengths[start:stop], self.pad_id)


def check_truncation(truncation: str) -> None:
  if truncation not in TRUNCATIONS:
    raise UserError(f"data.truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")


def truncate_lengths(len_a: np.ndarray, len_b: np.ndarray | None, budget: int,
                     truncation: str) -> tuple[np.ndarray, np.ndarray | None]:
  """How many tokens each text keeps so that the pair fits `budget` (specials excluded)."""
  check_truncation(truncation)
  if len_b is None:
    return np.minimum(len_a, budget), None
  total = len_a + len_b
  fits = total <= budget
  if truncation == "longest_first":
    # Trimming the longer text one token at a time (as Hugging Face tokenizers do) ends
    # here: the shorter text stays whole if it is at most half the budget, otherwise both
    # get half and the longer one (the second on a tie) the odd token.
    a_short = len_a <= len_b
    short = np.where(a_short, len_a, len_b)
    keep_short = np.where(2 * short <= budget, short, budget // 2)
    keep_long = np.where(2 * short <= budget, budget - short, budget // 2 + budget % 2)
    keep_a = np.where(a_short, keep_short, keep_long)
    keep_b = np.where(a_short, keep_long, keep_short)
  else:
    # Each text keeps a share proportional to its length, at least one token each.
    share = np.rint(budget * len_a / np.maximum(total, 1)).astype(np.int64)
    keep_a = np.clip(share, np.minimum(len_a, 1), np.minimum(len_a, budget - 1))
    keep_b = np.minimum(len_b, budget - keep_a)
  keep_a = np.where(fits, len_a, keep_a)
  keep_b = np.where(fits, len_b, keep_b)
  return keep_a.astype(np.int32), keep_b.astype(np.int32)


def tokenize(tokenizer: Tokenizer, examples: Examples, max_length: int, truncation: str,
             use_token_types: bool) -> Tokenized:
  """Token ids with special tokens, truncated to max_length tokens in total."""
  if not examples.texts:
    if examples.total:  # an empty shard of a non-empty source (more shards than rows)
      empty = np.zeros(0, np.int32)
      return Tokenized(empty, empty, empty, tokenizer.pad_token_id or 0)
    raise UserError(f"{examples.source}: no examples to tokenize")
  num_texts = len(examples.texts[0])
  template = tokenizer.template
  specials = (sum(map(len, template.pair)) if num_texts == 2
              else sum(map(len, template.single)))
  budget = max_length - specials
  if budget < num_texts:
    raise UserError(f"max_length={max_length} leaves no room for text after {specials} "
                    "special tokens")
  enc_a = tokenizer.encode([t[0] for t in examples.texts])
  enc_b = tokenizer.encode([t[1] for t in examples.texts]) if num_texts == 2 else None
  len_a = np.fromiter(map(len, enc_a), np.int64, len(enc_a))
  len_b = None if enc_b is None else np.fromiter(map(len, enc_b), np.int64, len(enc_b))
  keep_a, keep_b = truncate_lengths(len_a, len_b, budget, truncation)

  ids, type_ids = [], []
  if enc_b is None:
    prefix, suffix = template.single
    for tokens, k in zip(enc_a, keep_a.tolist()):
      ids += prefix
      ids += tokens[:k]
      ids += suffix
    lengths = (keep_a + len(prefix) + len(suffix)).astype(np.int32)
    type_ids = np.zeros(len(ids), np.int32)
  else:
    prefix, middle, suffix = template.pair
    t_prefix, t_middle, t_suffix = template.pair_types
    for a, b, ka, kb in zip(enc_a, enc_b, keep_a.tolist(), keep_b.tolist()):
      ids += prefix
      ids += a[:ka]
      ids += middle
      ids += b[:kb]
      ids += suffix
      if use_token_types:
        type_ids += t_prefix
        type_ids += [template.type_a] * ka
        type_ids += t_middle
        type_ids += [template.type_b] * kb
        type_ids += t_suffix
    lengths = (keep_a + keep_b + len(prefix) + len(middle) + len(suffix)).astype(np.int32)
    type_ids = np.array(type_ids, np.int32) if use_token_types else np.zeros(len(ids), np.int32)
  pad_id = tokenizer.pad_token_id
  return Tokenized(np.array(ids, np.int32), type_ids, lengths, 0 if pad_id is None else int(pad_id))


def cache_key(examples: Examples, text_fields: Sequence[Any], tokenizer: Tokenizer, max_length: int,
              truncation: str, use_token_types: bool) -> str:
  """Hash of everything the cached arrays depend on."""
  path = Path(examples.source)
  if path.is_file():
    stat = path.stat()
    origin = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
  else:  # tfds: the name and split identify the data
    origin = [examples.source]
  key = {"version": _CACHE_VERSION, "origin": origin, "n": len(examples),
         **({"rows": [examples.start, examples.total]} if examples.total is not None else {}),
         "fields": [str(f) for f in text_fields], "tokenizer": tokenizer.fingerprint,
         "max_length": max_length, "truncation": truncation,
         "use_token_types": use_token_types}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_cached(cache_dir: str | Path | None, tokenizer: Tokenizer, examples: Examples,
                    max_length: int, truncation: str, use_token_types: bool,
                    text_fields: Sequence[Any] = ()) -> Tokenized:
  """`tokenize`, reusing `<cache_dir>/tokens-<key>.npz` when it exists (None: no cache)."""
  if cache_dir is None:
    return tokenize(tokenizer, examples, max_length, truncation, use_token_types)
  cache_dir = Path(cache_dir)
  key = cache_key(examples, text_fields, tokenizer, max_length, truncation, use_token_types)
  path = cache_dir / f"tokens-{key}.npz"
  if path.is_file():
    try:
      return _load(path)
    except (OSError, ValueError, KeyError):
      pass  # a damaged cache file is rebuilt below
  tokenized = tokenize(tokenizer, examples, max_length, truncation, use_token_types)
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    _save(path, tokenized)
  except OSError as e:
    raise UserError(f"cannot write the token cache in {cache_dir}: {e.strerror}") from None
  return tokenized


def _save(path: Path, tokenized: Tokenized) -> None:
  with atomic_write(path, "wb") as f:
    np.savez(f, ids=tokenized.flat_ids, type_ids=tokenized.flat_type_ids, lengths=tokenized.lengths,
             pad_id=np.int32(tokenized.pad_id))


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
  return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


def _load(path: Path) -> Tokenized:
  with np.load(path) as data:
    return Tokenized(data["ids"], data["type_ids"], data["lengths"], int(data["pad_id"]))
