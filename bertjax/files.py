"""Files that readers see whole or not at all."""

import contextlib
import os
import threading
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
  """A file opened for writing under a temporary name next to `path`, renamed to `path` when the block ends
  without an error (and removed when it raises): a reader, or a run killed mid-write, never sees half a file.
  `fsync` also puts the bytes on disk before the rename (a summary that must survive a power cut)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  try:
    with open(tmp, mode) as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
