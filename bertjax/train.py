"""Fine-tunes a BERT-family checkpoint for text classification.

  python -m bertjax.train --config configs/NAME.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

Re-running the same command with the same workdir resumes from its latest checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bertjax.errors import UserError, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary (resumed if present).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds after which the other processes give up on a dead one.")
flags.DEFINE_string("compilation_cache", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bertjax", "xla"),
                    "Persistent XLA compilation cache folder, shared by runs ('' = off).")


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise UserError("--config is required: --config configs/NAME.py[:variant]")
  if not flags.FLAGS.workdir:
    raise UserError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax
  if flags.FLAGS.compilation_cache:  # a re-run or resume skips compiling the shapes it has seen
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(flags.FLAGS.compilation_cache))
  from bertjax import sharding
  sharding.initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                  flags.FLAGS.process_id, flags.FLAGS.heartbeat_timeout)
  from bertjax import trainer  # after flag parsing, so a bad flag fails fast
  try:
    trainer.train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir)
  except trainer.WriteFailed as e:
    print(f"error: {e}", file=sys.stderr)
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
