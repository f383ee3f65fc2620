"""Keep freed host memory inside the process, so each train step does not page-fault its buffers in again.

XLA's CPU runtime allocates a step's temporaries (the gradients alone are 91 MB for MiniLM) on every
call and frees them at its end. glibc's malloc serves blocks above 32 MB with fresh `mmap`s, gives
freed memory back to the OS, and gives every thread its own arena of mmap'd heaps, so every step
touches its temporaries for the first time: on this 2-core CPU a MiniLM batch-32 step took 40,700
minor page faults and 87 ms of kernel time. With mmap off, trimming off and a single arena, freed
blocks are reused: no faults, 2 ms of kernel time per step. The cost is that the process keeps its
peak memory until it exits, which a training process does anyway.

`keep_freed_memory()` must run before the process starts a second thread (glibc fixes the arena
limit when the first extra arena is made), so the command-line entry points call it first thing.
Set BERTJAX_KEEP_FREED_MEMORY=0 to leave malloc as it is.
"""

import ctypes
import os
import sys

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes


def keep_freed_memory() -> bool:
  """Tell glibc's malloc to reuse freed memory instead of unmapping it. True if it took effect."""
  if os.environ.get("BERTJAX_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # glibc's mallopt returns 1 on success; other C libraries (musl) return 0 and ignore it.
  return all([mallopt(_M_ARENA_MAX, 1) == 1, mallopt(_M_MMAP_MAX, 0) == 1,
              mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1])
