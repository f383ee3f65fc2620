"""What train and sweep share on the command line: the multi-process flags and the compilation cache."""

import os

from absl import flags


def define_flags() -> None:
  """--coordinator_address/--num_processes/--process_id/--heartbeat_timeout and --compilation_cache."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds after which the other processes give up on a dead one.")
  flags.DEFINE_string("compilation_cache", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bertjax", "xla"),
                      "Persistent XLA compilation cache folder, shared by runs ('' = off).")


def start_jax() -> None:
  """The compilation cache (equal shapes compile once across runs), then jax.distributed from the flags or
  the cluster's environment (a no-op for one process). Call before anything touches a device."""
  import jax
  f = flags.FLAGS
  if f.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compilation_cache))
  from bertjax import sharding
  sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, f.heartbeat_timeout)
