"""keep_freed_memory: a step's large temporaries come back from the heap instead of being page-faulted in."""

import os
import subprocess
import sys

import pytest

from bertjax import host_memory

STEPS = r"""
import resource
from bertjax.host_memory import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp
# An embedding table's gradient is a dense 47 MB temporary, made afresh by every step.
step = jax.jit(lambda e, ids: e - 0.1 * jax.grad(lambda e: (e[ids] ** 2).sum())(e), donate_argnums=0)
e, ids = jnp.ones((30522, 384)), jnp.arange(0, 30522, 7)
for _ in range(30):  # the heap grows to its steady state
  e = step(e, ids)
faults = []
for _ in range(11):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  e = step(e, ids)
  e.block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[5])  # the median step: a rare late growth of the heap does not count
"""


def median_faults_per_step(keep: str) -> tuple[str, float]:
  env = {**os.environ, "BERTJAX_KEEP_FREED_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()
  return applied, float(faults)


def _huge_pages_always() -> bool:
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  return os.path.exists(thp) and "[always]" in open(thp).read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
@pytest.mark.skipif(_huge_pages_always(), reason="2 MB pages fault 512x less often: the counts below are for 4 KB")
def test_steps_stop_page_faulting():
  applied, faults = median_faults_per_step("1")
  assert applied == "True" and faults < 500, faults
  applied, faults = median_faults_per_step("0")  # glibc's default: the 47 MB are mapped anew every step
  assert applied == "False" and faults > 5000, faults


@pytest.mark.parametrize("platforms,plugins,cpu", [
    ("cpu", ["jax_plugins.xla_cuda12"], True),  # pinned to cpu: a plugin is not loaded
    ("cuda", [], False), ("cpu,cuda", [], False), ("tpu", [], False),
    ("", [], True), ("", ["jax_plugins.xla_cuda12"], False),
])
def test_backend_decision_from_jax_platforms_and_plugins(monkeypatch, platforms, plugins, cpu):
  monkeypatch.setattr(host_memory, "accelerator_plugins", lambda env: plugins)
  assert host_memory.backend_is_cpu({"JAX_PLATFORMS": platforms}) is cpu


def test_accelerator_plugins_found_as_jax_finds_them(tmp_path, monkeypatch):
  """A module under the jax_plugins namespace package, an entry point in the jax_plugins group, libtpu's
  TPU_LIBRARY_PATH: each counts, none of them imported."""
  assert host_memory.accelerator_plugins({}) == []  # this venv: jax's CPU backend only
  (tmp_path / "ns" / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
  (tmp_path / "ns" / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("raise RuntimeError('imported')\n")
  dist = tmp_path / "ep" / "fake_rocm_plugin-1.0.dist-info"
  dist.mkdir(parents=True)
  (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-rocm-plugin\nVersion: 1.0\n")
  (dist / "entry_points.txt").write_text("[jax_plugins]\nxla_rocm7 = jax_plugins.xla_rocm7\n")
  monkeypatch.syspath_prepend(str(tmp_path / "ep"))
  assert host_memory.accelerator_plugins({}) == ["jax_plugins.xla_rocm7"]
  monkeypatch.syspath_prepend(str(tmp_path / "ns"))
  assert host_memory.accelerator_plugins({}) == ["jax_plugins.xla_cuda12", "jax_plugins.xla_rocm7"]
  assert host_memory.accelerator_plugins({"TPU_LIBRARY_PATH": "/opt/libtpu.so"})[-1] == "libtpu"
  assert not host_memory.backend_is_cpu({})


def test_keep_freed_memory_does_nothing_for_an_accelerator(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.delenv("BERTJAX_KEEP_FREED_MEMORY", raising=False)
  assert host_memory.keep_freed_memory() is False
