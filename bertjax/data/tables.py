"""Columnar sources: .parquet and .arrow files and `datasets.save_to_disk` folders, read with pyarrow (no
`datasets` needed). `bertjax.data.sources` turns their rows into examples like any other source's."""

import json
from pathlib import Path

from bertjax.errors import UserError, first_line

TABLES = (".parquet", ".arrow")


def local_source(source: str) -> tuple[Path, str | None]:
  """(path, split) of a local source: `DIR:SPLIT` names a split of a datasets.save_to_disk DatasetDict folder
  (when DIR:SPLIT itself does not exist)."""
  path = Path(source)
  folder, _, split = source.rpartition(":")
  if not path.exists() and folder and split and Path(folder).is_dir():
    return Path(folder), split
  return path, None


def read_table(path: Path):
  """A .parquet file, or an .arrow file in Arrow's IPC file or stream format (datasets writes streams)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  if not path.is_file():
    raise UserError(f"data file not found: {path}")
  try:
    if path.suffix.lower() == ".parquet":
      return pq.read_table(path)
    try:
      return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
      return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
  except (pa.ArrowException, OSError) as e:
    raise UserError(f"{path}: cannot read it as {path.suffix.lower()[1:]} ({first_line(e)})") from None


def dataset_folder(folder: Path, split: str | None):
  """The table of a `datasets.save_to_disk` folder: a Dataset (state.json) or a DatasetDict's split."""
  import pyarrow as pa
  splits_file = folder / "dataset_dict.json"
  if splits_file.exists():
    splits = json.loads(splits_file.read_text())["splits"]
    if split is None:
      raise UserError(f"{folder} holds the splits {', '.join(splits)}: name one, as {folder}:{splits[0]}")
    if split not in splits:
      raise UserError(f"{folder}: no split {split!r}; splits: {', '.join(splits)}")
    folder = folder / split
  elif split is not None:
    raise UserError(f"{folder}: no split {split!r} (not a DatasetDict folder: no dataset_dict.json)")
  state = folder / "state.json"
  if not state.exists():
    raise UserError(f"{folder}: not a data file or a datasets.save_to_disk folder (no state.json or "
                    "dataset_dict.json)")
  files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
  return pa.concat_tables([read_table(f) for f in files]) if files else None


def class_names(table, column: str) -> list[str] | None:
  """A datasets ClassLabel column's names, from the schema metadata that datasets writes in arrow and parquet."""
  try:
    features = json.loads((table.schema.metadata or {})[b"huggingface"])["info"]["features"]
    feature = features[column]
  except (KeyError, TypeError, ValueError):
    return None
  return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None


def column_problem(table, source: str, column, kind: str, task: str, key: str) -> str | None:
  """Why a column cannot serve as the text or the label (None if it can): missing, or not holding strings for
  a text, numbers (or strings, for classes) for a label."""
  import pyarrow as pa
  if column not in table.column_names:
    return f"column {column!r} ({key}) not in {source}; columns: {', '.join(table.column_names)}"
  dtype = table.schema.field(column).type
  dtype = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
  strings = pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)
  numbers = pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
  ok = strings if kind == "text" else numbers if task == "regression" else \
      strings or numbers or pa.types.is_boolean(dtype)
  if ok:
    return None
  want = "strings" if kind == "text" else "numbers" if task == "regression" else "class names or ids"
  return f"{source}: column {column!r} holds {dtype}, expected {want} for the {kind}"
