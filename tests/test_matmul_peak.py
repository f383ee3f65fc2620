"""The matmul peak MFU divides by: the vendor table for faked device kinds, the per-machine cache, and the
measured loop against a plain jitted product timed longer."""

import json
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from bertjax import matmul_peak


@pytest.mark.parametrize("kind,dtype,flops,source", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12, "H100 SXM"),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12, "H100 SXM"),  # TF32, jax's default precision
    ("NVIDIA H100 PCIe", "bfloat16", 756.5e12, "H100 PCIe"),
    ("NVIDIA H100 NVL", "float32", 417.5e12, "H100 NVL"),
    ("NVIDIA GH200 480GB", "bfloat16", 989.5e12, "H100 SXM"),
    ("NVIDIA H200", "bfloat16", 989.5e12, "H200 SXM"),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12, "A100"),
    ("NVIDIA A100 80GB PCIe", "float32", 156e12, "A100"),
    ("NVIDIA L4", "bfloat16", 121e12, "L4 Tensor"),
    ("NVIDIA L40S", "bfloat16", 362.05e12, "L40S"),
    ("NVIDIA A10", "float32", 62.5e12, "A10 Tensor"),
    ("Tesla V100-SXM2-16GB", "float32", 15.7e12, "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "float32", 14e12, "V100 PCIe"),
    ("TPU v4", "bfloat16", 275e12, "v4"),
    ("TPU v5 lite", "bfloat16", 197e12, "v5e"),
    ("TPU v5", "float32", 459e12, "v5p"),  # float32 products run as one bfloat16 pass on a TPU
    ("TPU v5p", "bfloat16", 459e12, "v5p"),
])
def test_vendor_table(kind, dtype, flops, source):
  got = matmul_peak.vendor_peak(kind, dtype)
  assert got is not None and got[0] == flops and source in got[1], got


@pytest.mark.parametrize("kind,dtype", [
    ("NVIDIA A10G", "bfloat16"),  # no NVIDIA datasheet: measured
    ("NVIDIA RTX A1000", "bfloat16"), ("NVIDIA L40", "bfloat16"), ("Tesla V100-SXM2-16GB", "bfloat16"),
    ("cpu", "float32"), ("TPU v5p", "float16"),
])
def test_kinds_the_table_does_not_know(kind, dtype):
  assert matmul_peak.vendor_peak(kind, dtype) is None


def test_a_known_accelerator_uses_the_vendor_figure_times_its_devices(monkeypatch, tmp_path):
  monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(device_kind="NVIDIA H100 PCIe")] * 16)
  monkeypatch.setattr(jax, "device_count", lambda: 16)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(matmul_peak, "measure_matmul_peak", lambda *a, **k: pytest.fail("measured"))
  peak = matmul_peak.run_peak("bfloat16", tmp_path / "peak.json")
  assert peak.flops == 16 * 756.5e12
  assert peak.source.startswith("vendor datasheet: NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe")
  assert not (tmp_path / "peak.json").exists()


@pytest.fixture
def measured(monkeypatch):
  """Calls of measure_matmul_peak, which returns 1e11 FLOP/s per call number."""
  calls = []

  def fake(dtype, *args, **kwargs):
    calls.append(dtype)
    return 1e11 * len(calls)

  monkeypatch.setattr(matmul_peak, "measure_matmul_peak", fake)
  return calls


def test_the_measurement_is_cached_per_machine_and_dtype(measured, tmp_path, monkeypatch):
  path = tmp_path / "bertjax" / "peak.json"
  monkeypatch.setenv("BERTJAX_PEAK_CACHE", str(path))
  first = matmul_peak.run_peak("float32")
  assert first.flops == 1e11 and first.source.startswith("measured on this machine (cpu)") and measured == ["float32"]
  assert str(path) in first.source and "load average" in first.source
  assert matmul_peak.run_peak("float32", path) == first and measured == ["float32"]  # reused, not measured
  assert matmul_peak.run_peak("bfloat16", path).flops == 2e11 and measured == ["float32", "bfloat16"]
  entries = json.loads(path.read_text())
  assert len(entries) == 2
  key = next(k for k in entries if "float32" in k)
  assert f"jax {jax.__version__}" in key and key.startswith("cpu | cpu | ") and entries[key]["flops_per_device"] == 1e11


def test_cpus_of_one_model_name_with_other_matrix_units_measure_apart(measured, tmp_path, monkeypatch):
  """Cloud VMs name an Intel Xeon with AMX and one without alike: the cached figure of one is not the other's."""
  path = tmp_path / "peak.json"
  for flags in ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "fpu avx2 avx512f avx512_bf16"):
    cpuinfo = {"model name": "Intel(R) Xeon(R) Processor", "flags": flags}
    monkeypatch.setattr(matmul_peak, "cpuinfo_value", lambda name, info=cpuinfo: info[name])
    matmul_peak.run_peak("bfloat16", path)
    matmul_peak.run_peak("bfloat16", path)  # cached
  keys = sorted(json.loads(path.read_text()))
  assert measured == ["bfloat16", "bfloat16"] and len(keys) == 2
  assert "amx_tile,amx_bf16,avx512_bf16,avx512f,avx2" in keys[0] + keys[1] and "| avx512_bf16,avx512f,avx2 |" in keys[1]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"cpu | x": {"flops_per_device": "fast"}}'])
def test_a_corrupt_cache_is_rebuilt(measured, tmp_path, content):
  path = tmp_path / "peak.json"
  path.write_text(content)
  assert matmul_peak.run_peak("float32", path).flops == 1e11 and measured == ["float32"]
  entries = json.loads(path.read_text())
  assert [e["flops_per_device"] for e in entries.values()] == [1e11]
  assert matmul_peak.run_peak("float32", path).flops == 1e11 and measured == ["float32"]


def test_measured_loop_is_near_a_plain_product_timed_longer():
  """The loop's figure is within 2x of a plain jitted product timed back to back for 1 s (were a product
  hoisted out of the loop or skipped, the loop would claim several times more). A ratio, not a threshold."""
  n = 1024
  loop = matmul_peak.measure_matmul_peak("float32", n=n)
  a = jax.random.normal(jax.random.key(0), (n, n))
  mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  mm(a, a).block_until_ready()
  count, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < 1.0:
    mm(a, a).block_until_ready()
    count += 1
  plain = 2.0 * n ** 3 * count / (time.perf_counter() - t0)
  assert 0.5 < loop / plain < 2.0, (loop, plain)


def test_an_unwritable_cache_still_gives_the_peak(measured, tmp_path):
  (tmp_path / "file").write_text("")
  path = tmp_path / "file" / "peak.json"  # its folder is a file: nothing can be written there
  assert matmul_peak.run_peak("float32", path).flops == 1e11 and measured == ["float32"]
