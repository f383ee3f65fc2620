"""Keep freed host memory inside the process, so each train step does not page-fault its buffers in again.

XLA's CPU runtime allocates a step's temporaries (the gradients alone are 91 MB for MiniLM) on every
call and frees them at its end. glibc's malloc serves blocks above 32 MB with fresh `mmap`s, gives
freed memory back to the OS, and gives every thread its own arena of mmap'd heaps, so every step
touches its temporaries for the first time: on this 2-core CPU a MiniLM batch-32 step took 40,700
minor page faults and 87 ms of kernel time. With mmap off, trimming off and a single arena, freed
blocks are reused: no faults, 2 ms of kernel time per step. All three settings are needed: with mmap
and trimming off but an arena per thread, the step still took 40,730 faults. The cost is that the
process keeps its peak memory until it exits, which a training process does anyway.

A thread keeps the arena it already has, so `keep_freed_memory()` must run before jax creates its
CPU client and thread pools (importing jax is fine; the first computation is not): the command-line
entry points call it first. It does nothing if malloc is replaced through LD_PRELOAD (jemalloc,
tcmalloc), off Linux, with BERTJAX_KEEP_FREED_MEMORY=0, or when jax's backend may be an accelerator
(`backend_is_cpu`): there the step's buffers live on the device, and a single arena would make XLA's
compile threads and the CUDA/NCCL runtime threads contend for one malloc lock.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Mapping

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes


def accelerator_plugins(env: Mapping[str, str]) -> list[str]:
  """The accelerator backends jax 0.10 would load, found without importing them: modules of the
  `jax_plugins` namespace package and `jax_plugins` entry points (how xla_bridge.discover_pjrt_plugins
  finds the CUDA and ROCm plugins, e.g. jax_plugins.xla_cuda12), and libtpu (or TPU_LIBRARY_PATH)."""
  found = set()
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found |= {f"jax_plugins.{m.name}" for m in pkgutil.iter_modules(list(spec.submodule_search_locations))}
  found |= {ep.value for ep in importlib.metadata.entry_points(group="jax_plugins")}
  if env.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None:
    found.add("libtpu")
  return sorted(found)


def backend_is_cpu(env: Mapping[str, str] | None = None) -> bool:
  """True if jax will run on its CPU backend only, decided before jax creates a backend: JAX_PLATFORMS
  names only cpu, or it is unset and no accelerator plugin is installed."""
  env = os.environ if env is None else env
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  return not accelerator_plugins(env)


def keep_freed_memory() -> bool:
  """Tell glibc's malloc to reuse freed memory instead of unmapping it, on the CPU backend only. True if it
  took effect."""
  if os.environ.get("BERTJAX_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  if not backend_is_cpu():
    return False
  if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc / tcmalloc: glibc's settings would not apply
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # glibc's mallopt returns 1 on success; other C libraries (musl) return 0 and ignore it.
  return all([mallopt(_M_ARENA_MAX, 1) == 1, mallopt(_M_MMAP_MAX, 0) == 1,
              mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1])
