"""The error types the command-line tools report in one line (bad input: exit 2; a workdir that cannot be
written: exit 1), and how they report them."""

import functools
import os
import sys
import threading


class UserError(Exception):
  """A bad input (file, row, label, config key, model folder): one line, exit code 2."""


class WriteFailed(Exception):
  """The workdir could not be written (disk full, permissions): one line, exit code 1."""


def first_line(e: BaseException, empty: str | None = None) -> str:
  """The first line of an exception's message (at most 300 characters); for no message, `empty`, or the
  exception type's name when `empty` is None."""
  text = str(e).strip()
  if not text:
    return type(e).__name__ if empty is None else empty
  return text.splitlines()[0][:300]


def exit_on_user_error(main):
  """Wraps an absl `main` so a UserError prints one line and exits with code 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      bound_distributed_exit(2)
      sys.exit(2)

  return wrapped


def bound_distributed_exit(code: int, grace_seconds: float = 60.0) -> None:
  """Bounds the exit of one process of a multi-process run. A normal exit waits in jax.distributed's
  shutdown for the other processes. They stop too when the error is one they agreed on (bad data), but
  after an error of this process alone they may be waiting in a collective for it, and both would hang.
  After `grace_seconds` this process ends at once; its connections close, and the others stop."""
  jax = sys.modules.get("jax")
  if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(grace_seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()
