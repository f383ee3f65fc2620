"""Real multi-process runs on one machine: 2 processes x 2 CPU devices against 1 process x 4."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bertjax.workdir import load_run
from conftest import demo_setup
from test_train import REPO

OVERRIDES = ("--config.train.max_steps=12", "--config.train.eval_every_steps=6", "--config.train.log_every_steps=1",
             "--config.model.dtype=float32")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, data, model, devices, *extra, env=None, module="bertjax.train"):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(REPO),
         **(env or {})}
  cmd = [sys.executable, "-m", module, f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--workdir={workdir}", f"--config.model.name_or_path={model}", *OVERRIDES, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("multihost"), 256, 50, seed=2)


def train_losses(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in lines if r["kind"] == "train"], [r["loss"] for r in lines if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def one_process(setup):
  """1 process x 4 devices reading the 2 data shards that 2 processes read one each by default:
  what every multi-process layout must reproduce."""
  root, data, model = setup
  single = start(root / "one", data, model, 4, "--config.data.num_shards=2")
  out, _ = single.communicate(timeout=300)
  assert single.returncode == 0, out[-3000:]
  return root / "one"


def assert_same_run(a_dir, b_dir):
  a_train, a_eval = train_losses(a_dir)
  b_train, b_eval = train_losses(b_dir)
  assert len(a_train) == len(b_train) == 12 and len(a_eval) == len(b_eval) == 2
  np.testing.assert_allclose(a_train, b_train, rtol=1e-6)
  np.testing.assert_allclose(a_eval, b_eval, rtol=1e-6)
  a, b = load_run(a_dir, "latest"), load_run(b_dir, "latest")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)
  summary = json.loads((b_dir / "summary.json").read_text())
  assert (summary["num_train_examples"], summary["num_eval_examples"]) == (256, 50)
  # Each process tokenized only its shard of each split: 4 half-size token caches, not 2 whole ones.
  sizes = sorted(len(np.load(f)["lengths"]) for f in (b_dir / "cache").glob("tokens-*.npz"))
  assert sizes == [25, 25, 128, 128], sizes


def test_two_processes_match_one_process(setup, one_process):
  root, data, model = setup
  port = free_port()
  procs = [start(root / "two", data, model, 2, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}") for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "2 shards, 128 train examples read by this host" in outs[0], outs[0][-3000:]
  assert_same_run(one_process, root / "two")


def test_slurm_environment_alone_starts_a_two_process_run(setup, one_process):
  """What `srun` in scripts/slurm.sbatch gives each task: no flags, only SLURM_* variables, from which
  jax.distributed finds the coordinator (first node of the step, port from the job id) and the ranks."""
  root, data, model = setup
  job_id = next(j for j in range(1000, 5096) if _port_free(j % 4096 + 61440))
  procs = [start(root / "slurm", data, model, 2, env={
      "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
      "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "on mesh {'data': 4, 'fsdp': 1}" in outs[0], outs[0][-3000:]  # 2 processes x 2 devices joined
  assert_same_run(one_process, root / "slurm")


def _port_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def test_killing_one_process_fails_the_other(setup):
  root, data, model = setup
  port = free_port()
  extra = ("--config.train.max_steps=100000", "--heartbeat_timeout=10")
  procs = [start(root / "dies", data, model, 1, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *extra) for i in range(2)]
  metrics = root / "dies" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-2000:]
    time.sleep(0.1)
  procs[1].kill()
  t0 = time.time()
  try:
    procs[0].wait(timeout=60)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode != 0 and time.time() - t0 < 60


def test_a_bad_row_in_one_shard_stops_both_processes_with_one_line(setup, tmp_path):
  """Process 1 alone reads the malformed last row; process 0, waiting to learn the other shard's
  lengths, stops too instead of hanging."""
  root, data, model = setup
  bad = tmp_path / "data"
  bad.mkdir()
  (bad / "dev.tsv").write_text((data / "dev.tsv").read_text())
  (bad / "train.tsv").write_text((data / "train.tsv").read_text() + "a row without its label\n")
  port = free_port()
  procs = [start(tmp_path / "run", bad, model, 1, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}") for i in range(2)]
  outs = [p.communicate(timeout=180)[0].strip().splitlines() for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outs
  assert outs[1][-1] == f"error: {bad / 'train.tsv'}:258: expected 2 fields, found 1 (malformed row)"
  assert outs[0][-1].startswith("error: process 0: another process stopped"), outs[0][-5:]


def test_two_process_sweep_matches_one_process(setup, tmp_path):
  """A sweep on 2 processes x 2 devices (two trials trained together as a group, then one alone) gives
  every trial the losses of the same sweep on 1 process x 4 devices; process 0 alone writes the results."""
  _, data, model = setup
  sweep_file = tmp_path / "lr.py"
  sweep_file.write_text('def get_sweep():\n  return {"grid": {"optimizer.learning_rate": [1e-3, 2e-3, 3e-3]}}\n')
  extra = (f"--sweep={sweep_file}", "--parallel=2")
  one = start(tmp_path / "one", data, model, 4, *extra, "--config.data.num_shards=2", module="bertjax.sweep")
  out, _ = one.communicate(timeout=300)
  assert one.returncode == 0, out[-3000:]
  port = free_port()
  procs = [start(tmp_path / "two", data, model, 2, *extra, f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}", module="bertjax.sweep") for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  table = [[l for l in out.splitlines() if l.startswith("rank ")] for out in outs]  # the ranked table's head
  assert "trained together" in outs[0] and len(table[0]) == 1, outs[0][-3000:]
  assert "[sweep]" not in outs[1] and not table[1], outs[1][-3000:]
  results = [json.loads((tmp_path / d / "results.json").read_text())["trials"] for d in ("one", "two")]
  assert [r["name"] for r in results[0]] == [r["name"] for r in results[1]] and len(results[1]) == 3
  for a, b in zip(*results):
    assert a["status"] == b["status"] == "finished"
    np.testing.assert_allclose(a["metric"], b["metric"], rtol=1e-6)
  for name in (r["name"] for r in results[0]):
    a_train, a_eval = train_losses(tmp_path / "one" / "trials" / name)
    b_train, b_eval = train_losses(tmp_path / "two" / "trials" / name)
    assert len(a_train) == len(b_train) == 12 and len(a_eval) == len(b_eval) == 2
    np.testing.assert_allclose(a_train, b_train, rtol=1e-6)
    np.testing.assert_allclose(a_eval, b_eval, rtol=1e-6)
