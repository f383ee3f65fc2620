"""The matmul peak that MFU divides by: the vendor's dense figure for an accelerator of a known kind, else
measured on this machine once and cached (docs/gpu.md, "MFU and the peak").

A single timed product is mostly dispatch on a GPU (a 2048^3 one takes about 17 us at an H100's bf16 peak),
which would put MFU 2-3x too high; so the measurement chains products in one jitted loop, each the
previous result times a fixed matrix (XLA can neither hoist nor skip one), and times the loop for at least
`min_seconds`, best of a few. The figure is kept in ~/.cache/bertjax/peak.json (XDG_CACHE_HOME, or the file
BERTJAX_PEAK_CACHE names) per backend, device kind, CPU (model, matrix instructions, cores), operand dtype and
jax version, so runs after the first do not measure; a corrupt cache is rebuilt. Delete the file to measure again
(other work on the machine during the measurement lowers the figure: its load average is recorded with it).
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bertjax.files import atomic_write
from bertjax.models.config import cpuinfo_value


# CPU flags that change the matmul peak between CPUs of one model name.
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")
MIN_SECONDS, REPEATS = 0.2, 3  # each timing of the measured loop lasts at least MIN_SECONDS; best of REPEATS


@dataclasses.dataclass(frozen=True)
class Peak:
  flops: float  # FLOP/s of the run's devices together
  source: str  # "vendor datasheet: ..." or "measured ..."


# Dense peak FLOP/s per jax device (no 2:4 sparsity: half the datasheets' starred figures), by operand dtype,
# for device.device_kind matched lowercase, first match first. float32 is what jax's DEFAULT precision makes
# of float32 products: TF32 tensor cores on Ampere and later GPUs, one bfloat16 pass on TPUs, FP32 on a V100
# (which has no bfloat16 figure). The A10G (AWS) has no NVIDIA datasheet: it, and any other kind, is measured.
_VENDOR = (
    # NVIDIA H100 Tensor Core GPU datasheet: TF32 756*, BF16 1,513* (PCIe); TF32 835*, BF16 1,671* (NVL).
    (r"\bh100\b.*\bpcie\b", "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe", 756.5e12, 378e12),
    (r"\bh100\b.*\bnvl\b", "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL", 835.5e12, 417.5e12),
    # Same datasheet, H100 SXM: TF32 989*, BF16 1,979*; the NVIDIA GH200 datasheet gives its H100 the same.
    (r"\b(h100|gh200)\b", "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM", 989.5e12, 494.5e12),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 NVL TF32 835*, BF16 1,671*; H200 SXM TF32 989*, BF16 1,979*.
    (r"\bh200\b.*\bnvl\b", "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL", 835.5e12, 417.5e12),
    (r"\bh200\b", "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM", 989.5e12, 494.5e12),
    # NVIDIA A100 Tensor Core GPU datasheet (40GB and 80GB, PCIe and SXM alike): TF32 156, BF16 312.
    (r"\ba100\b", "NVIDIA A100 Tensor Core GPU datasheet", 312e12, 156e12),
    # NVIDIA L40S GPU datasheet: TF32 183, BF16 362.05.
    (r"\bl40s\b", "NVIDIA L40S datasheet", 362.05e12, 183e12),
    # NVIDIA L4 Tensor Core GPU datasheet: TF32 120*, BF16 242*.
    (r"\bl4\b", "NVIDIA L4 Tensor Core GPU datasheet", 121e12, 60e12),
    # NVIDIA A10 Tensor Core GPU datasheet: TF32 62.5, BF16 125.
    (r"\ba10\b", "NVIDIA A10 Tensor Core GPU datasheet", 125e12, 62.5e12),
    # NVIDIA V100 Tensor Core GPU datasheet: FP32 16.4 (V100S PCIe), 14 (V100 PCIe), 15.7 (V100 SXM2).
    (r"\bv100s\b", "NVIDIA V100 Tensor Core GPU datasheet, V100S PCIe", None, 16.4e12),
    (r"\bv100\b.*\bpcie\b", "NVIDIA V100 Tensor Core GPU datasheet, V100 PCIe", None, 14e12),
    (r"\bv100\b", "NVIDIA V100 Tensor Core GPU datasheet, V100 SXM2", None, 15.7e12),
    # Google Cloud TPU system architecture pages, bf16 peak per chip: v3 123 (2 TensorCores, each a jax
    # device), v4 275, v5e 197, v5p 459, v6e (Trillium) 918 (one jax device per chip).
    (r"^tpu v3$", "Cloud TPU v3 system architecture (per TensorCore: half a chip)", 61.5e12, 61.5e12),
    (r"^tpu v4$", "Cloud TPU v4 system architecture", 275e12, 275e12),
    (r"^tpu v5(e| lite)$", "Cloud TPU v5e system architecture", 197e12, 197e12),
    (r"^tpu v5p?$", "Cloud TPU v5p system architecture", 459e12, 459e12),
    (r"^tpu v6(e| lite)$", "Cloud TPU v6e system architecture", 918e12, 918e12),
)


def vendor_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
  """(dense FLOP/s of one device, source) for products with `dtype` operands, or None for a kind (or dtype)
  the table does not know."""
  kind = device_kind.strip().lower()
  for pattern, source, bf16, f32 in _VENDOR:
    if re.search(pattern, kind):
      flops = {"bfloat16": bf16, "float32": f32}.get(dtype)
      return None if flops is None else (flops, source)
  return None


def devices_sharing_peak() -> int:
  """How many devices' peaks add up: all on accelerators; one on a CPU, whose fake devices share its cores."""
  return 1 if jax.default_backend() == "cpu" else jax.device_count()


def measure_matmul_peak(dtype: str = "float32", n: int | None = None, min_seconds: float = MIN_SECONDS,
                        repeats: int = REPEATS) -> float:
  """Best FLOP/s of one device over `repeats` timings of a loop of n^3 products (2048 on a CPU, else 4096)
  with `dtype` operands summed in float32, as the model's are, each timing at least `min_seconds` long."""
  n = n or (2048 if jax.default_backend() == "cpu" else 4096)
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  w = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)  # keeps |x|

  @jax.jit
  def chain(x, w, count):
    step = lambda _, y: jnp.matmul(y, w, preferred_element_type=jnp.float32).astype(y.dtype)
    return jax.lax.fori_loop(0, count, step, x)

  def seconds(count: int) -> float:
    t = time.perf_counter()
    chain(x, w, count).block_until_ready()
    return time.perf_counter() - t

  seconds(1)  # compiles
  count = max(1, math.ceil(min_seconds / seconds(1)))
  while (t := seconds(count)) < min_seconds:
    count *= 2
  best = min([t] + [seconds(count) for _ in range(repeats - 1)])
  return 2.0 * n ** 3 * count / best


def cache_file() -> Path:
  """BERTJAX_PEAK_CACHE, else ~/.cache/bertjax/peak.json (XDG_CACHE_HOME)."""
  if os.environ.get("BERTJAX_PEAK_CACHE"):
    return Path(os.environ["BERTJAX_PEAK_CACHE"]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "bertjax" / "peak.json"


def cpu_description() -> str:
  """The CPU model, its matrix instructions and the cores this process may use, e.g. "AMD EPYC |
  avx512_bf16,avx512f,avx2 | 2 cores". The instructions tell apart CPUs of one model name (cloud VMs report
  "Intel(R) Xeon(R) Processor" with AMX or without, "AMD EPYC" for Zen 3 and Zen 4)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  flags = set((cpuinfo_value("flags") or "").split())
  units = ",".join(f for f in MATRIX_FLAGS if f in flags) or "no bf16/amx"
  return " | ".join([cpuinfo_value("model name") or "?", units, f"{cores} cores"])


def _cache_key(dtype: str) -> str:
  """What a measured peak depends on: backend, device kind, the CPU (`cpu_description`), operand dtype, jax
  version."""
  return " | ".join([jax.default_backend(), jax.devices()[0].device_kind, cpu_description(), dtype,
                     f"jax {jax.__version__}"])


def _read(path: Path) -> dict:
  """The cache's entries, or none if it is missing or corrupt (it is then rewritten whole)."""
  try:
    entries = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  if not isinstance(entries, dict):
    return {}
  return {k: v for k, v in entries.items()
          if isinstance(v, dict) and isinstance(v.get("flops_per_device"), (int, float)) and v["flops_per_device"] > 0
          and isinstance(v.get("measured"), str)}


def cached_measurement(dtype: str, path: Path | None = None) -> tuple[float, str]:
  """(FLOP/s of one device, when it was measured and under what load) from the cache, measured and stored
  first if absent. A lock makes processes on one machine measure one at a time (two at once would each see
  half the cores); other work on the machine lowers the figure, hence the load average kept with it."""
  path = path or cache_file()
  key = _cache_key(dtype)
  with _locked(path):
    entries = _read(path)
    if key not in entries:
      load = os.getloadavg()[0]
      entries[key] = {"flops_per_device": measure_matmul_peak(dtype),
                      "measured": f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f}"}
      try:
        with atomic_write(path) as f:
          f.write(json.dumps(entries, indent=1))
      except OSError:  # a read-only cache folder costs a measurement per process, not the run's summary
        pass
  return entries[key]["flops_per_device"], entries[key]["measured"]


@contextlib.contextmanager
def _locked(path: Path):
  """An exclusive lock on the cache's lock file while the block runs; none where it cannot be had (a read-only
  folder, a filesystem without locks)."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_suffix(".lock"), "w")
  except OSError:
    yield
    return
  with lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:
      pass
    yield


def run_peak(dtype: str, path: Path | None = None) -> Peak:
  """The peak of the run's devices for products with `dtype` operands: the vendor's figure when the device
  kind is known, else the cached measurement of this machine."""
  devices = devices_sharing_peak()
  kind = jax.devices()[0].device_kind
  known = vendor_peak(kind, dtype)
  if known is not None:
    flops, source = known
    return Peak(flops * devices, f"vendor datasheet: {source}, {dtype} dense {flops / 1e12:g} TFLOP/s per device "
                                 f"({kind}) x {devices}")
  flops, when = cached_measurement(dtype, path)
  return Peak(flops * devices, f"measured on this machine ({kind}) on {when}: {dtype} products chained in one "
                               f"jitted loop, best of {REPEATS} timings of >= {MIN_SECONDS} s"
                               + (f", x {devices} devices" if devices > 1 else "") + f" (cache {path or cache_file()})")
