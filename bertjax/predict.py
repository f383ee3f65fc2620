"""Batched, jitted predictions from a training workdir, an exported folder or a Hugging Face checkpoint.

  python -m bertjax.predict --model DIR --input FILE|- --output FILE.jsonl [--checkpoint best]
      [--input_format auto|lines|data] [--max_length N] [--text_fields a,b] [--batch_size 64] [--skip_bad_lines]

Input, by --input_format: `lines`, one example per line with a tab between the two texts of a pair (no
header, no quoting); `data`, read as bertjax.train reads data (.tsv/.txt tab-separated, .csv, .jsonl, .json,
.parquet, .arrow, a datasets folder) with the run's data options (text_fields, header, quoting). `auto` (the
default) takes `lines` for stdin (`-`) and .txt files, `data` for the rest; the last line says which.
Output: one JSON object per example, in input order: `line` (its line in the input), `label`,
`label_id`, `probs`, `logits` (regression: `score`, `logits`). Texts are truncated to the run's
data.max_length (128 for a plain checkpoint unless --max_length). A malformed line stops the
command with `file:line: reason` and writes nothing; `--skip_bad_lines` skips such lines instead.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from bertjax.errors import UserError, exit_on_user_error
from bertjax.evaluate import Predictor
from bertjax.files import atomic_write
from bertjax.metrics import softmax

EXPORT_INFO = "bertjax.json"  # written by bertjax.export: the run's data options and origin
PLAIN_MAX_LENGTH = 128


@dataclasses.dataclass
class Model:
  source: str
  model_cfg: Any
  params: dict
  tokenizer: Any
  task: str
  label_names: list[str] | None
  data: ml_collections.ConfigDict  # text_fields, has_header, quoting, max_length, truncation, packing, ...
  num_texts: int | None  # texts per example when known (a run or an export), else from the input


def _data_options(overrides: dict) -> ml_collections.ConfigDict:
  from bertjax.config_base import base_config
  data = base_config().data
  for key, value in overrides.items():
    if key in data:
      data[key] = value
  return data


def _is_workdir(path: Path) -> bool:
  return (path / "checkpoints").is_dir() and (path / "labels.json").is_file()


def input_options(path: str | Path, text_fields: list[str] | None = None):
  """(data options, texts per example) for reading a model folder's input, without loading it.

  Texts per example is None when a plain checkpoint leaves it to the input; `text_fields`
  overrides the saved columns.
  """
  from bertjax.data.pipeline import text_fields as fields_of
  path = Path(path)
  if _is_workdir(path):
    data, known = _data_options(json.loads((path / "config.json").read_text())["data"]), True
  else:
    info_path = path / EXPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    data, known = _data_options(info.get("data", {"max_length": PLAIN_MAX_LENGTH})), bool(info)
  if text_fields:
    data.text_fields, known = tuple(text_fields), True
  return data, len(fields_of(data)) if known else None


def load_model(path: str | Path, checkpoint: str = "best", max_length: int = 0,
               text_fields: list[str] | None = None) -> Model:
  """A training workdir (params from its orbax checkpoint) or a Hugging Face folder with a trained head."""
  from bertjax.data.tokenizer import load_tokenizer
  from bertjax.models import hf_weights
  path = Path(path)
  if not path.is_dir():
    raise UserError(f"model folder {path} does not exist")
  data, num_texts = input_options(path, text_fields)
  if _is_workdir(path):
    from bertjax.workdir import load_run
    run = load_run(path, checkpoint)
    cfg, params, task, names = run.model_cfg, run.params, run.task, run.label_names
    tokenizer, source = load_tokenizer(path / "model"), f"{path} (step {run.step})"
  else:
    loaded = hf_weights.load(str(path), dtype="float32")
    if loaded.fresh_head:
      raise UserError(f"{path}: the checkpoint has no classification head (a base model); fine-tune it with "
                      "bertjax.train, then predict from the workdir or its export")
    cfg, params, hf = loaded.cfg, loaded.params, loaded.hf_config
    task = "regression" if hf.get("problem_type") == "regression" or cfg.num_labels == 1 else "classification"
    id2label = hf.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(cfg.num_labels)]
    names = None if task == "regression" else names
    tokenizer, source = load_tokenizer(path), str(path)
  limit = cfg.max_position_embeddings - cfg.position_offset
  if max_length:
    data.max_length = max_length
  if data.max_length > limit:
    raise UserError(f"max_length={data.max_length} exceeds the model's {limit} positions")
  return Model(source, cfg, params, tokenizer, task, names, data, num_texts)


# ----- input ---------------------------------------------------------------------------------


def _plain_lines(path: str, num_texts: int | None, on_bad: Any):
  """Examples from a .txt file or stdin: one per line, a tab between the texts of a pair."""
  from bertjax.data.sources import Examples
  if path == "-":
    source, text = "<stdin>", sys.stdin.read()
  else:
    source = path
    try:
      text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as e:
      raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
      raise UserError(f"{path}: not valid UTF-8 ({e.reason})") from None
  texts, lines = [], []
  for n, line in enumerate(text.splitlines(), start=1):
    fields = line.split("\t")
    expected = num_texts or (len(texts[0]) if texts else None)
    try:
      if len(fields) > 2 or (expected is not None and len(fields) != expected):
        want = f"{expected} text{'s' if expected != 1 else ''}" if expected else "1 or 2 texts"
        raise UserError(f"{source}:{n}: expected {want} (a tab separates a pair), found {len(fields)} fields")
      if any(not f.strip() for f in fields):
        raise UserError(f"{source}:{n}: empty text")
    except UserError as e:
      on_bad(str(e))
      continue
    texts.append(tuple(fields))
    lines.append(n)
  if not texts:
    raise UserError(f"{source}: no examples")
  return Examples(texts, [None] * len(texts), lines, source)


INPUT_FORMATS = ("auto", "lines", "data")


def input_format(path: str, requested: str = "auto") -> str:
  """`lines` or `data` for --input_format (auto: lines for stdin and .txt, data for the rest)."""
  if requested not in INPUT_FORMATS:
    raise UserError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {requested!r}")
  if requested != "auto":
    return requested
  return "lines" if path == "-" or Path(path).suffix.lower() == ".txt" else "data"


def read_input(data: ml_collections.ConfigDict, num_texts: int | None, path: str, skip_bad_lines: bool = False,
               fmt: str = "auto"):
  """(Examples, messages of skipped lines) read with a model's `input_options` in the input format `fmt`;
  without skip_bad_lines the first bad line raises."""
  from bertjax.data import pipeline, sources
  skipped: list[str] = []

  def on_bad(message: str) -> None:
    if not skip_bad_lines:
      raise UserError(message)
    skipped.append(message)

  if input_format(path, fmt) == "lines":
    examples = _plain_lines(path, num_texts, on_bad)
  elif path == "-":
    raise UserError("--input_format=data reads a file or folder, not stdin (-)")
  else:
    examples = sources.read_examples(path, pipeline.text_fields(data), None, has_header=data.has_header,
                                     task=data.task, quoting=data.quoting,
                                     on_bad_row=on_bad if skip_bad_lines else None)
  return examples, skipped


# ----- prediction ----------------------------------------------------------------------------


def predict_logits(model: Model, examples, batch_size: int = 64, predictor: Predictor | None = None):
  """[N, C] logits and timing stats (examples/sec counts tokenization and batching, not compilation)."""
  from bertjax.data.tokenize import tokenize
  predictor = predictor or Predictor()
  compile_before = predictor.compile_seconds
  t0 = time.perf_counter()
  d = model.data
  tokens = tokenize(model.tokenizer, examples, d.max_length, d.truncation, model.model_cfg.type_vocab_size > 1)
  logits = predictor.logits(model.model_cfg, model.params, tokens, batch_size=batch_size, packing=d.packing,
                            max_length=d.max_length, max_per_row=d.max_per_row)
  compile_seconds = predictor.compile_seconds - compile_before
  seconds = max(time.perf_counter() - t0 - compile_seconds, 1e-9)
  return logits, {"num_examples": len(examples), "seconds": seconds, "examples_per_sec": len(examples) / seconds,
                  "compile_seconds": compile_seconds, "num_compilations": predictor.num_compilations}


def records(model: Model, examples, logits: np.ndarray):
  """One output dict per example."""
  if model.task == "regression":
    for line, row in zip(examples.line_numbers, logits):
      yield {"line": line, "score": float(row[0]), "logits": [float(row[0])]}
    return
  probs = softmax(logits)
  for line, row, p in zip(examples.line_numbers, logits, probs):
    k = int(np.argmax(row))
    yield {"line": line, "label": model.label_names[k], "label_id": k, "probs": [float(x) for x in p],
           "logits": [float(x) for x in row]}


def write_jsonl(path: str, rows) -> None:
  """All rows, or (on any failure) no file at all: written to a temporary file, then renamed."""
  if path == "-":
    for row in rows:
      sys.stdout.write(json.dumps(row) + "\n")
    return
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path) as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  for name in ("model", "input", "output"):
    if not f[name].value:
      raise UserError(f"--{name} is required")
  if not Path(f.model).is_dir():
    raise UserError(f"model folder {f.model} does not exist")
  # The input is checked before the model is loaded, so a bad line fails fast.
  examples, skipped = read_input(*input_options(f.model, f.text_fields), f.input, f.skip_bad_lines, f.input_format)
  model = load_model(f.model, f.checkpoint, f.max_length, f.text_fields)
  if skipped:
    shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    print(f"skipped {len(skipped)} bad line{'s' if len(skipped) != 1 else ''}: {shown}", file=sys.stderr)
  logits, stats = predict_logits(model, examples, f.batch_size)
  write_jsonl(f.output, records(model, examples, logits))
  print(f"predicted {stats['num_examples']} examples with {model.source} in {stats['seconds']:.2f}s: "
        f"{stats['examples_per_sec']:.1f} examples/sec (plus {stats['compile_seconds']:.1f}s compiling "
        f"{stats['num_compilations']} batch shapes); read {f.input} as {input_format(f.input, f.input_format)} "
        f"(--input_format); wrote {f.output}", file=sys.stderr)


def _define_flags() -> None:
  """Defined only when run as a program, so other modules can import this one."""
  flags.DEFINE_string("model", None, "Training workdir, bertjax export, or Hugging Face folder with a trained head.")
  flags.DEFINE_string("input", None, "Input file, datasets folder, or - (stdin).")
  flags.DEFINE_string("input_format", "auto", "lines (one example per line, tab between a pair), data (as "
                      "bertjax.train reads data, with the run's columns) or auto (lines for - and .txt, else data).")
  flags.DEFINE_string("output", None, "Output .jsonl (- for stdout).")
  flags.DEFINE_string("checkpoint", "best", "For a workdir: best | latest | STEP.")
  flags.DEFINE_integer("max_length", 0, "Truncate to this many tokens; 0 = the run's data.max_length (128 plain).")
  flags.DEFINE_list("text_fields", None, "Input columns (one, or two for pairs); default the run's data.text_fields.")
  flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
  flags.DEFINE_bool("skip_bad_lines", False, "Skip malformed input lines (and say how many) instead of stopping.")


if __name__ == "__main__":
  from absl import logging
  from bertjax.cli_setup import run_cli
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # before jax creates its CPU client
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  run_cli(main)
