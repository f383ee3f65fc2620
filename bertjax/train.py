"""Fine-tunes a BERT-family checkpoint for text classification.

  python -m bertjax.train --config configs/NAME.py[:variant] [--workdir DIR] [--config.KEY=VALUE ...]

The workdir defaults to runs/NAME (runs/NAME-variant). Re-running the same command resumes from its latest
checkpoint. With `--lower_only=cuda` it only lowers the run's steps for that platform and reports them
(bertjax.lower).
"""

import re
import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from bertjax import cli_setup
from bertjax.config_base import config_file_arg, exit_on_bad_command_line
from bertjax.errors import UserError, WriteFailed, bound_distributed_exit, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary (resumed if present); default "
                    "runs/NAME[-variant] for --config configs/NAME.py[:variant].")
flags.DEFINE_string("lower_only", None, "Build the run, lower its train and eval steps for this platform (cuda, "
                    "rocm, tpu, cpu), print their parameters, FLOPs and sizes, and exit; writes nothing.")
cli_setup.define_flags()


def default_workdir(config_spec: str) -> str:
  """runs/NAME for configs/NAME.py, runs/NAME-VARIANT for configs/NAME.py:VARIANT (characters other than
  letters, digits and . , = - become _)."""
  path, _, variant = config_spec.partition(":")
  name = Path(path).stem + (f"-{variant}" if variant else "")
  return str(Path("runs") / re.sub(r"[^A-Za-z0-9.,=-]+", "_", name))


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise UserError("--config is required: --config configs/NAME.py[:variant]")
  workdir = flags.FLAGS.workdir or default_workdir(config_file_arg(sys.argv))
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cli_setup.start_jax(_CONFIG.value.train.deterministic)  # a re-run or resume skips compiling the shapes it has seen
  from bertjax import trainer  # after flag parsing, so a bad flag fails fast
  if not flags.FLAGS.workdir:
    trainer.log(f"workdir: {workdir} (the default for this config; --workdir=DIR for another)")
  if flags.FLAGS.lower_only:
    from bertjax import lower
    lower.lower_only(_CONFIG.value, workdir, flags.FLAGS.lower_only)
    return
  try:
    trainer.train_and_evaluate(_CONFIG.value, workdir)
  except WriteFailed as e:
    print(f"error: {e}", file=sys.stderr)
    bound_distributed_exit(1)  # the other processes may be waiting for this one
    sys.exit(1)


def run():
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # before jax creates its CPU client
  exit_on_bad_command_line(sys.argv)
  try:
    cli_setup.run_cli(main)
  except UserError as e:  # a bad --config file or key, or raised while the config file is evaluated
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
