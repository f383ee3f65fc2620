"""The one error type for bad user input, and how command-line tools report it."""

import functools
import sys


class UserError(Exception):
  """A bad input (file, row, label, config key, model folder): one line, exit code 2."""


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (at most 300 characters), or its type's name if it has none."""
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0][:300]


def exit_on_user_error(main):
  """Wraps an absl `main` so a UserError prints one line and exits with code 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
