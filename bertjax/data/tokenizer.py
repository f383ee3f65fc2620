"""A model folder's tokenizer: the Rust `tokenizers` pipeline, its pad token, and where it puts special tokens.

A folder with a `tokenizer.json` that carries its post-processor (the special-token template) is read by
`tokenizers` alone; transformers is imported only to convert a folder that has just a vocabulary (vocab.txt,
spm.model, vocab.json + merges.txt), so a run does not pay transformers' and torch's import (~1.7 s) for
the common case. `save` writes files that both this loader and transformers' AutoTokenizer read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from pathlib import Path

from bertjax.errors import UserError

# What transformers writes or reads as a tokenizer's files (vocabularies of WordPiece, BPE and sentencepiece).
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
         "vocab.json", "merges.txt", "spm.model", "spiece.model", "sentencepiece.bpe.model")


@dataclasses.dataclass(frozen=True)
class Template:
  """Special-token ids around one text (prefix, suffix) or two (prefix, middle, suffix)."""
  single: tuple[list[int], list[int]]
  pair: tuple[list[int], list[int], list[int]]
  pair_types: tuple[list[int], list[int], list[int]]  # token types of the three parts
  type_a: int  # token type of the first text's tokens
  type_b: int  # and of the second's


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  backend: object  # tokenizers.Tokenizer with truncation and padding off (we do both ourselves)
  pad_token_id: int | None
  folder: Path  # read from here; `save` copies its vocabulary files

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

  @functools.cached_property
  def template(self) -> Template:
    """Where the post-processor puts its special tokens, read off the encoding of a sample pair."""
    a, b = "hello", "world"
    n_a, n_b = (len(self.backend.encode(t, add_special_tokens=False).ids) for t in (a, b))
    pair, single = self.backend.encode(a, b), self.backend.encode(a)

    def spans(enc, runs: list[int]) -> list[tuple[int, int]]:
      """Spans of the special-token runs around each run of len(run) consecutive text tokens."""
      mask, out, pos = enc.special_tokens_mask, [], 0
      for run in runs:
        start = pos
        while pos < len(mask) and mask[pos]:
          pos += 1
        out.append((start, pos))
        if mask[pos:pos + run] != [0] * run:
          raise UserError(f"{self.folder}: cannot derive where the tokenizer puts its special tokens")
        pos += run
      out.append((pos, len(mask)))
      return out

    pair_spans, single_spans = spans(pair, [n_a, n_b]), spans(single, [n_a])
    return Template(single=tuple(single.ids[s:e] for s, e in single_spans),
                    pair=tuple(pair.ids[s:e] for s, e in pair_spans),
                    pair_types=tuple(pair.type_ids[s:e] for s, e in pair_spans),
                    type_a=pair.type_ids[pair_spans[0][1]], type_b=pair.type_ids[pair_spans[1][1]])

  @functools.cached_property
  def fingerprint(self) -> str:
    """Identity of the tokenization: the whole serialised pipeline and the pad token."""
    return hashlib.sha256(f"{self.pad_token_id}\n{self.backend.to_str()}".encode()).hexdigest()

  def save(self, folder: Path) -> None:
    """The source folder's tokenizer files; when it had no tokenizer.json (transformers converted its vocabulary),
    also the pipeline as tokenizer.json, and the pad token in tokenizer_config.json if that file is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
      if (self.folder / name).is_file() and self.folder.resolve() != folder.resolve():
        shutil.copyfile(self.folder / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
      self.backend.save(str(folder / "tokenizer.json"))
    pad = None if self.pad_token_id is None else self.backend.id_to_token(self.pad_token_id)
    if pad is not None and not (folder / "tokenizer_config.json").is_file():
      (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}, indent=2) + "\n")


def load_tokenizer(folder: Path) -> Tokenizer:
  """The tokenizer in `folder`; a one-line UserError when it has none."""
  from tokenizers import Tokenizer as Rust  # pylint: disable=import-outside-toplevel
  folder = Path(folder)
  path = folder / "tokenizer.json"
  backend = None
  if path.is_file():
    try:
      backend = Rust.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for a damaged file
      raise UserError(f"{path}: cannot read the tokenizer ({str(e).splitlines()[0][:150]})") from None
    if backend.post_processor is None:  # transformers builds the template from the tokenizer class
      backend = None
  if backend is None:
    backend, pad_id = _converted(folder)
  else:
    pad_id = _pad_id(folder, backend)
  backend.no_truncation()
  backend.no_padding()
  return Tokenizer(backend, pad_id, folder)


def _converted(folder: Path):
  """The fast tokenizer transformers builds from the folder's vocabulary, and its pad id."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    hf = AutoTokenizer.from_pretrained(str(folder))
  except Exception as e:  # transformers raises many types for a folder without tokenizer files
    raise UserError(f"{folder}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None
  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:
    raise UserError(f"{folder}: {type(hf).__name__} is not a fast tokenizer (needs tokenizer.json or a vocabulary "
                    "transformers can convert)")
  from tokenizers import Tokenizer as Rust  # pylint: disable=import-outside-toplevel
  return Rust.from_str(backend.to_str()), hf.pad_token_id


def _pad_id(folder: Path, backend) -> int | None:
  """The pad token named by tokenizer_config.json or special_tokens_map.json (as transformers reads it), else
  the tokenizer.json's padding, else the model config's pad_token_id."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    token = _read_json(folder / name).get("pad_token")
    if isinstance(token, dict):
      token = token.get("content")
    if isinstance(token, str) and backend.token_to_id(token) is not None:
      return backend.token_to_id(token)
  if backend.padding is not None:
    return backend.padding["pad_id"]
  pad = _read_json(folder / "config.json").get("pad_token_id")
  return pad if isinstance(pad, int) else None


def _read_json(path: Path) -> dict:
  try:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not readable JSON ({e})") from None
  return data if isinstance(data, dict) else {}
