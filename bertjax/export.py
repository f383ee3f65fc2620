"""A training run's checkpoint as a Hugging Face folder that transformers loads in PyTorch.

  python -m bertjax.export --workdir DIR --output OUT [--checkpoint best|latest|STEP] [--overwrite]

OUT holds config.json (with id2label/label2id), model.safetensors, the tokenizer files, and
bertjax.json (the run's data options, so `bertjax.predict --model OUT` truncates and reads input
as the run did). `AutoModelForSequenceClassification.from_pretrained(OUT)` loads it.
"""

import json
import shutil
import sys
from pathlib import Path

from absl import flags

from bertjax.errors import UserError, exit_on_user_error
from bertjax.predict import EXPORT_INFO

_DATA_KEYS = ("text_fields", "label_field", "has_header", "quoting", "max_length", "truncation", "task",
              "packing", "max_per_row")


def export(workdir: str | Path, output: str | Path, checkpoint: str = "best", overwrite: bool = False) -> Path:
  """Writes the run's params at `checkpoint` to `output`; returns the folder."""
  from bertjax.models import hf_weights
  from bertjax.workdir import load_run
  out = Path(output)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise UserError(f"{out} exists and is not empty; choose another --output or pass --overwrite")
  run = load_run(workdir, checkpoint, dtype="float32")
  hf_weights.save(out, run.model_cfg, run.params, run.hf_config, run.label_names, run.task == "regression")
  for path in (Path(workdir) / "model").iterdir():
    if path.is_file() and path.name != "config.json":  # the tokenizer files
      shutil.copy(path, out / path.name)
  data = run.config.data.to_dict()
  info = {"workdir": str(Path(workdir).resolve()), "checkpoint_step": run.step,
          "data": {k: data[k] for k in _DATA_KEYS if k in data}}
  (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
  return out


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir or not f.output:
    raise UserError("--workdir and --output are required")
  out = export(f.workdir, f.output, f.checkpoint, f.overwrite)
  print(f"exported {f.workdir} ({f.checkpoint}) to {out}", file=sys.stderr)


def _define_flags() -> None:
  """Defined only when run as a program, so other modules can import this one."""
  flags.DEFINE_string("workdir", None, "Training workdir.")
  flags.DEFINE_string("output", None, "Folder to write (must be new or empty unless --overwrite).")
  flags.DEFINE_string("checkpoint", "best", "best | latest | STEP.")
  flags.DEFINE_bool("overwrite", False, "Write into a non-empty --output.")


if __name__ == "__main__":
  from absl import logging
  from bertjax.cli_setup import run_cli
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  run_cli(main)
