"""Labelled text examples from local files (.tsv/.txt, .csv, .jsonl, .json arrays, .parquet, .arrow), a
`datasets.save_to_disk` folder (`DIR`, or `DIR:SPLIT` of a DatasetDict) or `tfds:NAME[/CONFIG]:SPLIT`.

Every kind goes through the same column selection, label parsing and checks. Errors name the file and
line (the row number of a parquet or arrow table, the tfds record) of the offending row, in one line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bertjax.data import tables
from bertjax.errors import UserError

Field = str | int
QUOTINGS = ("auto", "none", "csv")
_DELIMITERS = {".tsv": "\t", ".txt": "\t", ".csv": ","}
_TFDS_RE = re.compile(r"^tfds:([^:]+):(.+)$")  # the split may be sliced: train[:10%]


class _ColumnError(UserError):
  """A column that no row can have: never skipped as a bad row."""


@dataclasses.dataclass(frozen=True)
class Examples:
  """Texts (one or two per example), raw labels and where each row came from.

  labels hold str for classification, float for regression, None for unlabelled data.
  line_numbers are 1-based file lines (the row's first line), table rows or tfds record numbers.
  label_names is set when the source itself declares class names (a tfds or datasets ClassLabel).
  A shard of a source holds its examples [start, start + len) of `total`.
  """
  texts: list[tuple[str, ...]]
  labels: list[Any]
  line_numbers: list[int]
  source: str
  label_names: list[str] | None = None
  start: int = 0
  total: int | None = None  # None: the whole source

  def __len__(self) -> int:
    return len(self.texts)

  def where(self, i: int) -> str:
    """`source:line` of example i, for error messages."""
    return f"{self.source}:{self.line_numbers[i]}"


def read_examples(source: str | Path, text_fields: Field | Sequence[Field],
                  label_field: Field | None = None, *, has_header: bool = True,
                  task: str = "classification", quoting: str = "auto",
                  on_bad_row: Callable[[str], None] | None = None, tfds_data_dir: str = "",
                  shard: tuple[int, int] = (0, 1)) -> Examples:
  """Reads examples from a local file (by extension), a datasets folder (`DIR[:SPLIT]`) or a
  `tfds:NAME[/CONFIG]:SPLIT` spec (prepared in `tfds_data_dir`, or tfds's default folder / $TFDS_DATA_DIR
  when empty).

  A malformed row raises a UserError naming its line; with `on_bad_row`, the message is passed
  to it instead and the row skipped (a file the csv reader cannot parse still fails).
  shard=(k, K): only the k-th of K contiguous blocks of rows is decoded, checked and returned
  (a file is still scanned to find the rows; a tfds split is read by record index).
  """
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard {index} not in [0, {count})")
  if count > 1 and on_bad_row is not None:
    raise ValueError("skipping bad rows would shift the rows of later shards")
  fields = check_fields(text_fields)
  label_field = None if label_field == "" else label_field
  if quoting not in QUOTINGS:
    raise UserError(f"quoting must be one of {', '.join(QUOTINGS)}, got {quoting!r}")
  source = str(source)
  match = _TFDS_RE.match(source)
  if match:
    return _read_tfds(source, match.group(1), match.group(2), fields, label_field, task, tfds_data_dir, shard)
  if source.startswith("tfds:"):
    raise UserError(f"bad tfds source {source!r}: expected tfds:NAME[/CONFIG]:SPLIT")
  path, split = tables.local_source(source)
  suffix = path.suffix.lower()
  if path.is_dir() or suffix in tables.TABLES:
    table = tables.dataset_folder(path, split) if path.is_dir() else tables.read_table(path)
    name = f"{path}:{split}" if split else str(path)
    return _table_examples(name, table, fields, label_field, task, on_bad_row, shard)
  if not path.is_file():
    raise UserError(f"data file not found: {path}")
  if suffix in (".jsonl", ".json"):
    rows = _json_rows(path, suffix)
    header = None
  elif suffix in _DELIMITERS:
    text = _decode(path)
    delimiter = _DELIMITERS[suffix]
    mode = quoting if quoting != "auto" else _detect_quoting(text, delimiter)
    rows = _delimited_rows(path, text, delimiter, mode)
    header = None
    if has_header:
      first = next(rows, None)
      if first is None:
        raise UserError(f"{path}: empty file (expected a header line)")
      header = first[1]
  else:
    raise UserError(f"unsupported data file type {suffix!r} for {path}: use .csv, .tsv or .txt (tab-separated), "
                    ".jsonl, .json, .parquet, .arrow or a datasets.save_to_disk folder")
  if count == 1:
    return _collect(str(path), rows, header, fields, label_field, task, on_bad_row)
  rows = list(rows)
  start, stop = len(rows) * index // count, len(rows) * (index + 1) // count
  # Without a header the file's first row fixes the number of fields, for every shard.
  width = len(rows[0][1]) if header is None and rows and isinstance(rows[0][1], list) else None
  return _collect(str(path), iter(rows[start:stop]), header, fields, label_field, task,
                  start=start, total=len(rows), width=width)


def read_label_names(path: str | Path) -> list[str]:
  """One class name per line (e.g. THUCNews `class.txt`); blank lines are skipped."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"label names file not found: {path}")
  names = [line.strip() for line in _decode(path).splitlines() if line.strip()]
  if len(set(names)) != len(names):
    raise UserError(f"{path}: duplicate label names")
  return names


def label_names(train_labels: Sequence[Any], given_names: Sequence[str] | None = None,
                num_labels: int | None = None) -> list[str]:
  """Class names in id order.

  Given names win. Otherwise labels that are all integers 0..K-1 keep their numeric order
  (missing classes included); any other labels are sorted (numerically if all integers).
  """
  if given_names:
    names = [str(n) for n in given_names]
    if num_labels is not None and num_labels != len(names):
      raise UserError(f"{len(names)} label names given but num_labels={num_labels}")
    return names
  distinct = {str(label) for label in train_labels if label is not None}
  if not distinct:
    raise UserError("the training data has no labels")
  ints = [_as_int(label) for label in distinct]
  if all(i is not None for i in ints):
    if min(ints) == 0:
      k = max(max(ints) + 1, num_labels or 0)
      names = [str(i) for i in range(k)]
    else:
      names = [str(i) for i in sorted(ints)]
  else:
    names = sorted(distinct)
  if num_labels is not None and len(names) != num_labels:
    raise UserError(f"the training data has {len(names)} labels ({_short(names)}) "
                    f"but num_labels={num_labels}")
  return names


def encode_labels(examples: Examples, names: Sequence[str], task: str) -> np.ndarray:
  """int32 class ids (by name, or by id when the file stores ids) or float32 scores (`task`, as `read_examples`
  checked it)."""
  for i, label in enumerate(examples.labels):
    if label is None:
      raise UserError(f"{examples.where(i)}: missing label ({examples.source} is unlabelled)")
  if task == "regression":
    return np.asarray(examples.labels, dtype=np.float32)
  ids = {str(name): i for i, name in enumerate(names)}
  out = np.empty(len(examples), dtype=np.int32)
  for i, label in enumerate(examples.labels):
    key = str(label)
    if key in ids:
      out[i] = ids[key]
      continue
    as_id = _as_int(key)
    if as_id is None or not 0 <= as_id < len(names):
      raise UserError(f"{examples.where(i)}: unknown label {key!r}; known: {_short(names)}")
    out[i] = as_id  # files such as THUCNews store ids, with names in a separate file
  return out


# ----- delimited files ------------------------------------------------------------------


def _decode(path: Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")  # drops a byte-order mark if there is one
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise UserError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def _reader(text: str, delimiter: str, mode: str):
  if mode == "none":
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                      quoting=csv.QUOTE_NONE)
  return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)


def _consistent(text: str, delimiter: str, mode: str) -> bool:
  """Whether every non-blank row parses with the same number of fields."""
  width = None
  try:
    for row in _reader(text, delimiter, mode):
      if not row:
        continue
      if width is None:
        width = len(row)
      elif len(row) != width:
        return False
  except csv.Error:
    return False
  return True


def _detect_quoting(text: str, delimiter: str) -> str:
  """Plain ("none") or CSV double-quote escaping ("csv") for a delimited file.

  A CSV writer always quotes a field that contains `"`, so a quote inside an unquoted field
  means plain text (GLUE's STS-B: `"I had mainly been" is fine`). When both readings give
  consistent rows, that rule decides; otherwise the consistent reading wins.
  """
  if '"' not in text:
    return "none"
  if delimiter == ",":
    return "csv"  # comma-separated files are CSV by definition
  csv_ok = _consistent(text, delimiter, "csv")
  none_ok = _consistent(text, delimiter, "none")
  if csv_ok != none_ok:
    return "csv" if csv_ok else "none"
  if not csv_ok:
    return "none"  # neither reads cleanly: report malformed rows as plain TSV
  for line in text.splitlines():
    for field in line.split(delimiter):
      if '"' in field and not _is_quoted_field(field):
        return "none"
  return "csv"


def _is_quoted_field(field: str) -> bool:
  return (len(field) >= 2 and field[0] == '"' and field[-1] == '"'
          and '"' not in field[1:-1].replace('""', ""))


def _delimited_rows(path: Path, text: str, delimiter: str,
                    mode: str) -> Iterator[tuple[int, list[str]]]:
  """(first line number, fields) per non-blank row."""
  reader = _reader(text, delimiter, mode)
  line = 1
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise UserError(f"{path}:{line}: cannot parse row ({e}); try quoting='none' or 'csv'")
    if row:
      yield line, row
    line = reader.line_num + 1


def _json_rows(path: Path, suffix: str) -> Iterator[tuple[int, Any]]:
  """(line, value) per JSON value: the lines of a .jsonl file, or the elements of a .json file's top-level
  array (a .json file that is not an array is read as JSON lines)."""
  text = _decode(path)
  if suffix == ".json" and text.lstrip().startswith("["):
    return _json_array_rows(path, text)
  return _jsonl_rows(path, text)


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
  """The elements of a JSON array, each with the line it starts on; malformed JSON stops the read."""
  decoder, i = json.JSONDecoder(), text.index("[") + 1
  line, counted = 1, 0  # line of position `counted`

  def line_at(pos: int) -> int:
    nonlocal line, counted
    line, counted = line + text.count("\n", counted, pos), pos
    return line

  def skip(pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
      pos += 1
    return pos

  i = skip(i)
  if i < len(text) and text[i] == "]":
    i += 1
  else:
    while True:
      try:
        value, end = decoder.raw_decode(text, i)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
      yield line_at(i), value
      i = skip(end)
      if i < len(text) and text[i] == ",":
        i = skip(i + 1)
        continue
      if i < len(text) and text[i] == "]":
        i += 1
        break
      raise UserError(f"{path}:{line_at(min(i, len(text)))}: invalid JSON (expected ',' or ']' in the array)")
  if skip(i) != len(text):
    raise UserError(f"{path}:{line_at(i)}: invalid JSON (extra data after the array)")


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
  for line_no, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      yield line_no, UserError(f"{path}:{line_no}: invalid JSON ({e.msg})")


# ----- rows to examples -----------------------------------------------------------------


def check_fields(text_fields: Field | Sequence[Field]) -> tuple[Field, ...]:
  """`data.text_fields` as a tuple of one or two column names or indices."""
  fields = (text_fields,) if isinstance(text_fields, (str, int)) else tuple(text_fields)
  if not 1 <= len(fields) <= 2 or any(f in ("", None) for f in fields):
    raise UserError(f"data.text_fields must be one or two column names or indices, "
                    f"got {text_fields!r}")
  return fields


def _column(field: Field, header: list[str] | None, width: int, where: str, key: str) -> int:
  """Index of a named or numbered column; `key` is the config key that names it (for the error)."""
  if isinstance(field, int) or (header is None and str(field).isdigit()):
    index = int(field)
    if not 0 <= index < width:
      raise _ColumnError(f"column index {index} out of range in {where} (rows have {width} fields)")
    return index
  if header is None:
    raise _ColumnError(f"column {field!r} given by name but {where} has no header "
                    "(set data.has_header or use column indices)")
  if field not in header:
    raise _ColumnError(f"column {field!r} ({key}) not in {where}; columns: {', '.join(header)}")
  return header.index(field)


def _collect(source: str, rows: Iterator[tuple[int, Any]], header: list[str] | None,
             fields: tuple[Field, ...], label_field: Field | None, task: str,
             on_bad_row: Callable[[str], None] | None = None, start: int = 0,
             total: int | None = None, width: int | None = None) -> Examples:
  texts, labels, lines = [], [], []
  getter = None
  width = len(header) if header is not None else width
  for line, row in rows:
    try:
      if isinstance(row, UserError):
        raise row
      getter, width, example = _row_example(source, line, row, header, fields, label_field, task, getter, width)
    except UserError as e:
      if on_bad_row is None or isinstance(e, _ColumnError):
        raise
      on_bad_row(str(e))
      continue
    texts.append(example[0])
    labels.append(example[1])
    lines.append(line)
  if not texts and not total:  # a shard may be empty, its source not
    raise UserError(f"{source}: no data rows")
  return Examples(texts, labels, lines, source, start=start, total=total)


def _row_example(source, line, row, header, fields, label_field, task, getter, width):
  """(getter, width, (texts, label)) of one row; the column getter and width are fixed by the first row."""
  where = f"{source}:{line}"
  if isinstance(row, dict):
    values = [_json_value(row, f, where) for f in fields]
    raw_label = None if label_field is None else _json_value(row, label_field, where)
  else:
    if not isinstance(row, list):
      raise UserError(f"{where}: expected a JSON object or array, got {type(row).__name__}")
    if width is None:
      width = len(row)
    if len(row) != width:
      raise UserError(f"{where}: expected {width} fields, found {len(row)} (malformed row)")
    if getter is None:
      text_cols = [_column(f, header, width, source, "data.text_fields") for f in fields]
      label_col = None if label_field is None else _column(label_field, header, width, source, "data.label_field")
      getter = (text_cols, label_col)
    values = [row[c] for c in getter[0]]
    raw_label = None if getter[1] is None else row[getter[1]]
  for value in values:
    if value is None:
      raise UserError(f"{where}: missing text")
    if not isinstance(value, str):
      raise UserError(f"{where}: text field is {type(value).__name__}, expected a string")
    if not value.strip():
      raise UserError(f"{where}: empty text")
  # a null label (JSON null, tfds -1) marks an unlabelled example
  label = None if raw_label is None else _parse_label(raw_label, task, where)
  return getter, width, (tuple(values), label)


def _json_value(row: dict, field: Field, where: str) -> Any:
  if field not in row:
    raise UserError(f"{where}: key {field!r} missing; keys: {', '.join(map(str, row))}")
  return row[field]


def _parse_label(raw: Any, task: str, where: str) -> str | float:
  if task == "regression":
    try:
      value = float(raw)
    except (TypeError, ValueError):
      raise UserError(f"{where}: regression label {raw!r} is not a number") from None
    if not np.isfinite(value):
      raise UserError(f"{where}: regression label {raw!r} is not finite")
    return value
  if isinstance(raw, float) and raw.is_integer():
    raw = int(raw)
  label = str(raw).strip() if raw is not None else ""
  if not label:
    raise UserError(f"{where}: empty label")
  return label


def _as_int(label: str) -> int | None:
  try:
    value = int(label)
  except (TypeError, ValueError):
    return None
  return value if value >= 0 else None


def _short(names: Sequence[str], limit: int = 10) -> str:
  shown = ", ".join(map(str, names[:limit]))
  return shown + (", ..." if len(names) > limit else "")


# ----- parquet, arrow and datasets folders (bertjax.data.tables) -----------------------------


def _table_examples(source: str, table, fields: tuple[Field, ...], label_field: Field | None, task: str,
                    on_bad_row: Callable[[str], None] | None, shard: tuple[int, int]) -> Examples:
  """Examples from an arrow table's columns, row by row through the checks every source shares."""
  if table is None or table.num_columns == 0:
    raise UserError(f"{source}: no data rows")
  for column, kind in [(f, "text") for f in fields] + ([(label_field, "label")] if label_field is not None else []):
    problem = tables.column_problem(table, source, column, kind, task,
                                    "data.text_fields" if kind == "text" else "data.label_field")
    if problem:
      raise _ColumnError(problem)
  names = tables.class_names(table, label_field) if label_field is not None and task == "classification" else None
  total = table.num_rows
  start, stop = total * shard[0] // shard[1], total * (shard[0] + 1) // shard[1]
  columns = list(dict.fromkeys(list(fields) + ([label_field] if label_field is not None else [])))
  values = [table.column(c).slice(start, stop - start).to_pylist() for c in columns]
  if names:  # datasets marks a missing label with -1
    label = values[columns.index(label_field)]
    values[columns.index(label_field)] = [None if v == -1 else v for v in label]
  rows = ((start + i + 1, dict(zip(columns, row))) for i, row in enumerate(zip(*values)))
  sharded = {"start": start, "total": total} if shard[1] > 1 else {}
  examples = _collect(source, rows, None, fields, label_field, task, on_bad_row, **sharded)
  return dataclasses.replace(examples, label_names=names)


# ----- tensorflow-datasets --------------------------------------------------------------


def _read_tfds(source: str, name: str, split: str, fields: tuple[Field, ...],
               label_field: Field | None, task: str, data_dir: str = "",
               shard: tuple[int, int] = (0, 1)) -> Examples:
  """Random-access records of a prepared (array_record) tfds split, read through grain threads; no
  TensorFlow needed. Downloading and preparing a dataset is tfds's job (`tfds build`, or `tfds.load`
  with TensorFlow), done once where there is network."""
  try:
    import grain  # optional extra, with tensorflow-datasets
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(f"reading {source} needs tensorflow-datasets and grain: "
                    "pip install 'bertjax[tfds]'") from None
  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises many types for unknown names, splits, missing data
    reason = " ".join(str(e).split()).split(" Available datasets:")[0] or type(e).__name__
    raise UserError(f"cannot open {source}{f' in {data_dir}' if data_dir else ''}: {reason[:300]} "
                    "(prepare it once with network: tfds build NAME --file_format=array_record)") from None
  features = data.dataset_info.features
  available = list(features.keys())
  for f in list(fields) + ([label_field] if label_field is not None else []):
    if f not in available:
      raise UserError(f"feature {f!r} not in {source}; features: {', '.join(available)}")
  names = None
  if label_field is not None and task == "classification":
    names = list(getattr(features[label_field], "names", None) or []) or None

  def row(record: dict) -> dict:
    out = {f: _tfds_text(record[f]) for f in fields}
    if label_field is not None:
      value = record[label_field]
      value = value.item() if hasattr(value, "item") else value
      # GLUE test splits mark missing labels with -1
      out[label_field] = None if names and value == -1 else _tfds_text(value)
    return out

  total = len(data)
  start, stop = total * shard[0] // shard[1], total * (shard[0] + 1) // shard[1]
  rows = grain.MapDataset.source(data)[start:stop].map(row).to_iter_dataset(grain.ReadOptions(num_threads=8))
  sharded = {"start": start, "total": total} if shard[1] > 1 else {}
  examples = _collect(source, enumerate(rows, start=start + 1), None, fields, label_field, task, **sharded)
  return dataclasses.replace(examples, label_names=names)


def _tfds_text(value: Any) -> Any:
  return value.decode("utf-8") if isinstance(value, bytes) else value
