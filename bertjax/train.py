"""Fine-tunes a BERT-family checkpoint for text classification.

  python -m bertjax.train --config configs/NAME.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

Re-running the same command with the same workdir resumes from its latest checkpoint. With
`--lower_only=cuda` it only lowers the run's steps for that platform and reports them (bertjax.lower).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bertjax import cli_setup
from bertjax.errors import UserError, WriteFailed, bound_distributed_exit, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary (resumed if present).")
flags.DEFINE_string("lower_only", None, "Build the run, lower its train and eval steps for this platform (cuda, "
                    "rocm, tpu, cpu), print their parameters, FLOPs and sizes, and exit; writes nothing.")
cli_setup.define_flags()


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise UserError("--config is required: --config configs/NAME.py[:variant]")
  if not flags.FLAGS.workdir:
    raise UserError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cli_setup.start_jax(_CONFIG.value.train.deterministic)  # a re-run or resume skips compiling the shapes it has seen
  from bertjax import trainer  # after flag parsing, so a bad flag fails fast
  if flags.FLAGS.lower_only:
    from bertjax import lower
    lower.lower_only(_CONFIG.value, flags.FLAGS.workdir, flags.FLAGS.lower_only)
    return
  try:
    trainer.train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir)
  except WriteFailed as e:
    print(f"error: {e}", file=sys.stderr)
    bound_distributed_exit(1)  # the other processes may be waiting for this one
    sys.exit(1)


def run():
  from bertjax.config_base import exit_on_bad_command_line
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # before jax creates its CPU client
  exit_on_bad_command_line(sys.argv)
  try:
    app.run(main)
  except UserError as e:  # a bad --config file or key, or raised while the config file is evaluated
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
