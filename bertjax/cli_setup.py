"""What the command-line tools share: how they start (`run_cli`), and for train and sweep the multi-process
flags, the compilation cache and XLA's deterministic GPU ops."""

import os
import sys
from typing import Callable

from absl import flags

from bertjax.errors import UserError, first_line

DETERMINISTIC = ("auto", "true", "false")
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def run_cli(main: Callable) -> None:
  """absl's app.run(main) for a bertjax command: a bad flag (unknown, or a value of the wrong type) is one line
  and exit code 2, as any bad input; third-party notes that do not concern the user stay off the terminal
  (transformers' "PyTorch was not found" on every start without torch, the normal case for a JAX user)."""
  from absl import app
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # read when transformers logs it

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except (flags.Error, UserError) as e:
      print(f"error: {first_line(e)}", file=sys.stderr)
      sys.exit(2)

  app.run(main, flags_parser=parse)


def define_flags() -> None:
  """--coordinator_address/--num_processes/--process_id/--heartbeat_timeout, --expected_devices and
  --compilation_cache."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds after which the other processes give up on a dead one.")
  flags.DEFINE_integer("expected_devices", None, "Refuse to start unless the run has this many devices in all "
                       "(for launchers whose environment bertjax cannot read; see docs/gpu.md).", lower_bound=1)
  flags.DEFINE_string("compilation_cache", os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bertjax", "xla"),
                      "Persistent XLA compilation cache folder, shared by runs ('' = off); default "
                      "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/bertjax/xla.")


def deterministic_ops(setting: str, backend: str, xla_flags: str | None = None) -> tuple[bool, str]:
  """(on, why) for `train.deterministic` on `backend`. CPU (and TPU) steps are deterministic anyway; a GPU's
  are only with XLA's deterministic ops (slower scatter-adds and reductions), which `auto` leaves off there.
  On a GPU, `true` needs DETERMINISTIC_FLAG in XLA_FLAGS (`xla_flags`, default: the environment's) before
  jax started, as `start_jax` sets it."""
  if setting not in DETERMINISTIC:
    raise UserError(f"train.deterministic must be one of {', '.join(DETERMINISTIC)}, got {setting!r}")
  if backend != "gpu":
    if setting == "false":
      return False, f"train.deterministic=false; {backend} steps are deterministic anyway"
    return True, f"{backend} steps are deterministic"
  if setting == "auto":
    return False, "auto: off on GPU, where they cost speed; train.deterministic=true for bitwise resume"
  if setting == "false":
    return False, "train.deterministic=false"
  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  if DETERMINISTIC_FLAG not in xla_flags.split():
    raise UserError(f"train.deterministic=true on a GPU needs XLA_FLAGS={DETERMINISTIC_FLAG} before jax starts "
                    "(python -m bertjax.train and bertjax.sweep set it)")
  return True, f"train.deterministic=true: {DETERMINISTIC_FLAG}"


def xla_flags_for(setting: str, xla_flags: str) -> str:
  """XLA_FLAGS with DETERMINISTIC_FLAG added (replacing any other value of it) when deterministic ops would be
  on for a GPU. The backend is not known before jax starts, and CPU builds accept and ignore the flag."""
  if not deterministic_ops(setting, "gpu", DETERMINISTIC_FLAG)[0]:
    return xla_flags
  name = DETERMINISTIC_FLAG.split("=")[0]
  kept = [f for f in xla_flags.split() if f.split("=")[0] != name]
  return " ".join(kept + [DETERMINISTIC_FLAG])


def start_jax(deterministic: str = "auto") -> None:
  """XLA's deterministic GPU ops for `train.deterministic`, the compilation cache (equal shapes compile once
  across runs), then jax.distributed from the flags or the launcher's environment (a no-op for one process),
  then the check that the process has the devices the job asked for. Call before anything touches a device."""
  xla_flags = xla_flags_for(deterministic, os.environ.get("XLA_FLAGS", ""))
  if xla_flags != os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = xla_flags  # read when the backend starts
  import jax
  f = flags.FLAGS
  if f.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compilation_cache))
  from bertjax import launcher
  layout = launcher.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, f.heartbeat_timeout)
  launcher.check_device_counts(layout, jax.local_device_count(), jax.device_count(), jax.default_backend(),
                               f.expected_devices)
