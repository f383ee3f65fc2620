"""Parquet, arrow, datasets.save_to_disk folders and JSON arrays: the same examples as the TSV of the same data,
and one-line errors for what is wrong with them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertjax.data import sources
from bertjax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# Written by datasets 5.2.0 (DatasetDict.save_to_disk): train (6 rows) and validation (3 rows), a ClassLabel
# label with names negative/positive.
HF_FOLDER = REPO / "tests" / "data" / "sentiment_hf"
TRAIN = [("a gripping , moving film .", 1), ("the plot is dull .", 0), ("the cast was not boring .", 1),
         ("clumsy and tedious .", 0), ("a delightful surprise .", 1), ("the ending feels flat .", 0)]
NAMES = ["negative", "positive"]
# How datasets records a ClassLabel in an arrow or parquet schema (the folder above carries the same).
HF_META = {b"huggingface": json.dumps({"info": {"features": {
    "sentence": {"dtype": "string", "_type": "Value"},
    "label": {"names": NAMES, "_type": "ClassLabel"}}}}).encode()}


def _table(meta=True) -> pa.Table:
  table = pa.table({"sentence": [t for t, _ in TRAIN], "label": pa.array([y for _, y in TRAIN], pa.int64())})
  return table.replace_schema_metadata(HF_META if meta else None)


def _write(kind: str, root: Path) -> str:
  """The training rows as `kind`; returns the source spec."""
  if kind == "tsv":
    path = root / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{NAMES[y]}\n" for t, y in TRAIN))
  elif kind == "parquet":
    pq.write_table(_table(), path := root / "train.parquet")
  elif kind in ("arrow_file", "arrow_stream"):
    path = root / f"{kind}.arrow"
    table = _table()
    with pa.OSFile(str(path), "wb") as sink:
      opener = pa.ipc.new_file if kind == "arrow_file" else pa.ipc.new_stream
      with opener(sink, table.schema) as writer:
        writer.write_table(table)
  elif kind == "json_array":
    path = root / "train.json"
    path.write_text(json.dumps([{"sentence": t, "label": NAMES[y]} for t, y in TRAIN], indent=1))
  elif kind == "datasets_split":
    return f"{HF_FOLDER}:train"
  elif kind == "datasets_dataset":
    return str(HF_FOLDER / "train")
  else:
    raise ValueError(kind)
  return str(path)


def _read(spec, **kw):
  return sources.read_examples(spec, ("sentence",), "label", **kw)


def _encoded(examples):
  names = sources.label_names(examples.labels, examples.label_names)
  return names, sources.encode_labels(examples, names, "classification").tolist()


@pytest.mark.parametrize("kind", ["parquet", "arrow_file", "arrow_stream", "json_array", "datasets_split",
                                  "datasets_dataset"])
def test_each_format_gives_the_examples_of_the_tsv(tmp_path, kind):
  tsv = _read(_write("tsv", tmp_path))
  other = _read(_write(kind, tmp_path))
  assert other.texts == tsv.texts == [(t,) for t, _ in TRAIN]
  # Class ids through the ClassLabel names (or the names themselves in JSON) equal the TSV's.
  assert _encoded(other) == _encoded(tsv) == (NAMES, [y for _, y in TRAIN])
  if kind != "json_array":
    assert other.line_numbers == list(range(1, 7))  # table rows, 1-based


def test_parquet_without_class_names_keeps_numeric_ids(tmp_path):
  pq.write_table(_table(meta=False), path := tmp_path / "plain.parquet")
  examples = _read(str(path))
  assert examples.label_names is None and _encoded(examples) == (["0", "1"], [y for _, y in TRAIN])


def test_shards_of_a_parquet_file_are_its_rows(tmp_path):
  spec = _write("parquet", tmp_path)
  parts = [_read(spec, shard=(k, 3)) for k in range(3)]
  assert sum((p.texts for p in parts), []) == _read(spec).texts
  assert [(p.start, p.total, p.line_numbers) for p in parts] == [(0, 6, [1, 2]), (2, 6, [3, 4]), (4, 6, [5, 6])]


def test_json_array_errors_name_the_line_of_the_element(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[\n {"sentence": "fine", "label": 1},\n\n {"sentence": "", "label": 0}\n]\n')
  with pytest.raises(UserError, match=r"bad.json:4: empty text$"):
    _read(str(path))
  path.write_text('[\n {"sentence": "fine", "label": 1}\n {"sentence": "x", "label": 0}]')
  with pytest.raises(UserError, match=r"bad.json:3: invalid JSON \(expected ',' or '\]'"):
    _read(str(path))
  # A .json file that is not an array is read as JSON lines, as before.
  path.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "good", "label": 0}\n')
  assert _read(str(path)).line_numbers == [1, 2]


@pytest.mark.parametrize("make,match", [
    (lambda d: pq.write_table(_table().slice(0, 0), d / "empty.parquet") or d / "empty.parquet",
     r"empty.parquet: no data rows$"),
    (lambda d: pq.write_table(pa.table({"sentence": [1, 2], "label": [0, 1]}), d / "ints.parquet") or
     d / "ints.parquet", r"ints.parquet: column 'sentence' holds int64, expected strings for the text$"),
    (lambda d: pq.write_table(pa.table({"text": ["a"], "label": [0]}), d / "cols.parquet") or d / "cols.parquet",
     r"column 'sentence' \(data.text_fields\) not in .*cols.parquet; columns: text, label$"),
    (lambda d: pq.write_table(pa.table({"sentence": ["a", None], "label": [0, 1]}), d / "null.parquet") or
     d / "null.parquet", r"null.parquet:2: missing text$"),
    (lambda d: f"{HF_FOLDER}:test", r"sentiment_hf: no split 'test'; splits: train, validation$"),
    (lambda d: HF_FOLDER, r"sentiment_hf holds the splits train, validation: name one, as .*sentiment_hf:train$"),
    (lambda d: (d / "x.arrow").write_bytes(b"not arrow") and d / "x.arrow", r"x.arrow: cannot read it as arrow"),
])
def test_bad_tables_are_one_line(tmp_path, make, match):
  with pytest.raises(UserError, match=match) as e:
    _read(str(make(tmp_path)))
  assert "\n" not in str(e.value)


def _train_cli(tmp_path, *overrides):
  from conftest import tiny_bert_with_tokenizer
  model = tmp_path / "model"
  if not model.exists():
    tiny_bert_with_tokenizer(model)
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny,data_dir={tmp_path / 'demo'}",
         f"--workdir={tmp_path / 'w'}", f"--config.model.name_or_path={model}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
@pytest.mark.parametrize("source,match", [
    ("empty.parquet", r"empty.parquet: no data rows"),
    ("ints.parquet", r"column 'sentence' holds int64"),
    (f"{HF_FOLDER}:test", r"no split 'test'"),
])
def test_bad_tables_exit_2_and_write_nothing(tmp_path, source, match):
  pq.write_table(_table().slice(0, 0), tmp_path / "empty.parquet")
  pq.write_table(pa.table({"sentence": [1, 2], "label": [0, 1]}), tmp_path / "ints.parquet")
  spec = source if source.startswith("/") else str(tmp_path / source)
  result = _train_cli(tmp_path, f"--config.data.train={spec}")
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert re.search(match, lines[0]) and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_training_reads_a_datasets_folder(tmp_path):
  """Both splits of a save_to_disk folder feed a run; its ClassLabel names become the run's labels."""
  from conftest import tiny_bert_with_tokenizer
  from bertjax import trainer
  from test_train import demo_config
  model = tiny_bert_with_tokenizer(tmp_path / "model")
  config = demo_config(tmp_path, model, **{"data.train": f"{HF_FOLDER}:train", "data.eval": f"{HF_FOLDER}:validation",
                                           "train.max_steps": 2})
  summary = trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert summary["num_train_examples"] == 6 and summary["num_eval_examples"] == 3
  assert json.loads((tmp_path / "w" / "labels.json").read_text())["label_names"] == NAMES
  assert np.isfinite(summary["final"]["eval_loss"])
