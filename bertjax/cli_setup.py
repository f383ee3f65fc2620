"""What train and sweep share on the command line: the multi-process flags and the compilation cache."""

import os

from absl import flags


def define_flags() -> None:
  """--coordinator_address/--num_processes/--process_id/--heartbeat_timeout, --expected_devices and
  --compilation_cache."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds after which the other processes give up on a dead one.")
  flags.DEFINE_integer("expected_devices", None, "Refuse to start unless the run has this many devices in all "
                       "(for launchers whose environment bertjax cannot read; see docs/gpu.md).", lower_bound=1)
  flags.DEFINE_string("compilation_cache", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bertjax", "xla"),
                      "Persistent XLA compilation cache folder, shared by runs ('' = off).")


def start_jax() -> None:
  """The compilation cache (equal shapes compile once across runs), then jax.distributed from the flags or
  the launcher's environment (a no-op for one process), then the check that the process has the devices the
  job asked for. Call before anything touches a device."""
  import jax
  f = flags.FLAGS
  if f.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compilation_cache))
  from bertjax import launcher
  layout = launcher.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, f.heartbeat_timeout)
  launcher.check_device_counts(layout, jax.local_device_count(), jax.device_count(), jax.default_backend(),
                               f.expected_devices)
