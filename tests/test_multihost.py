"""Real multi-process runs on one machine: 2 processes x 2 CPU devices against 1 process x 4."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bertjax.checkpoint import Checkpoints
from bertjax.workdir import load_run
from conftest import demo_setup
from test_train import REPO

pytestmark = pytest.mark.slow  # every test here starts several processes

# float32 products: with bfloat16 operands (matmul_dtype=auto on a CPU with bf16 dot instructions) a sharded
# gradient's different summation order can flip an operand's bf16 rounding (4e-6 in a few weights after 12 steps).
OVERRIDES = ("--config.train.max_steps=12", "--config.train.eval_every_steps=6", "--config.train.log_every_steps=1",
             "--config.model.dtype=float32", "--config.model.matmul_dtype=float32")


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
  return [r["loss"] for r in lines if r["kind"] == "train"], [r["eval_loss"] for r in lines if r["kind"] == "eval"]


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


def test_slurm_environment_alone_starts_a_two_process_run(setup, one_process):
  """2 processes x 2 devices train as 1 process x 4 does, started as `srun` in scripts/slurm.sbatch starts its
  tasks: no flags, only SLURM_* variables, from which jax.distributed finds the coordinator (first node of the
  step, port from the job id) and the ranks. (The flags --coordinator_address, --num_processes and
  --process_id start the two-process runs of the other tests here.)"""
  root, data, model = setup
  job_id = next(j for j in range(1000, 5096) if _port_free(j % 4096 + 61440))
  procs = [start(root / "slurm", data, model, 2, env={
      "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
      "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "on mesh {'data': 4, 'fsdp': 1}" in outs[0], outs[0][-3000:]  # 2 processes x 2 devices joined
  assert "2 shards, 128 train examples read by this host" in outs[0], outs[0][-3000:]
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


def test_sigterm_to_one_process_stops_both_at_the_same_step(setup, tmp_path):
  """Saving is collective, so a signal to one process (process 1 here) stops every process after the same
  step: both save that step's checkpoint and exit 0 instead of waiting for each other."""
  _, data, model = setup
  port = free_port()
  extra = ("--config.train.max_steps=100000", "--config.train.log_every_steps=2")
  procs = [start(tmp_path, data, model, 1, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *extra) for i in range(2)]
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  try:
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
      assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-2000:]
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["stopped_by"] == "signal to another process" and not summary["finished"], summary
  steps = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
  assert steps[-1] == summary["steps"] and summary["steps"] % 2 == 0  # a log step, where they agree


@pytest.mark.parametrize("module,split", [("bertjax.train", "train"), ("bertjax.train", "dev"),
                                          ("bertjax.sweep", "train")])
def test_a_bad_row_in_one_shard_stops_both_processes_with_one_line(setup, tmp_path, module, split):
  """Process 1 alone reads the malformed last row. The processes agree on such errors before they exchange
  their shards' lengths, so process 0 stops at once with one line instead of waiting for process 1's
  shard: for the train split, for the eval split (read after an exchange), and in a sweep, where the trial
  fails on both processes alike and the sweep stops as on one process."""
  root, data, model = setup
  bad = tmp_path / "data"
  bad.mkdir()
  for name in ("dev.tsv", "train.tsv"):
    (bad / name).write_text((data / name).read_text() + ("a row without its label\n" if name == f"{split}.tsv" else ""))
  rows = len((bad / f"{split}.tsv").read_text().splitlines())
  sweep_file = tmp_path / "lr.py"
  sweep_file.write_text('def get_sweep():\n  return {"grid": {"optimizer.learning_rate": [1e-3, 2e-3]}}\n')
  extra = (f"--sweep={sweep_file}",) if module == "bertjax.sweep" else ()
  port = free_port()
  procs = [start(tmp_path / "run", bad, model, 1, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *extra, module=module) for i in range(2)]
  try:
    outs = [p.communicate(timeout=180)[0].strip().splitlines() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [2, 2], outs
  said = [f"stopped: process 1 failed on its shard of {bad / f'{split}.tsv'} (see its output)",
          f"{bad / f'{split}.tsv'}:{rows}: expected 2 fields, found 1 (malformed row)"]
  if module == "bertjax.sweep":  # the first trial failed the same way on both: the sweep stops
    said = [f"trial 000_lr=0.001: {m} (stopped the sweep: this does not depend on the swept values)" for m in said]
  assert [out[-1] for out in outs] == [f"error: {m}" for m in said], [out[-3:] for out in outs]


def run_script(tmp_path, source: str, timeout: float) -> list[subprocess.Popen]:
  """Runs `source` as 2 processes x 1 device (argv: coordinator address, process id); returns them ended."""
  script = tmp_path / "script.py"
  script.write_text(source)
  port = free_port()
  env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    for p in procs:
      p.out = p.communicate(timeout=timeout)[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return procs


def test_an_error_of_one_process_alone_does_not_hang_the_others(tmp_path):
  """Process 1 stops on an error of its own while process 0 waits for it in a collective: its exit waits
  in jax.distributed's shutdown only for the grace period, then it ends, and process 0's collective fails."""
  procs = run_script(tmp_path, (
      "import sys, time\n"
      "import jax, numpy as np\n"
      "from bertjax import errors, sharding\n"
      "i = int(sys.argv[2])\n"
      "jax.distributed.initialize(sys.argv[1], 2, i, heartbeat_timeout_seconds=120)\n"
      "sharding.gather_from_processes(np.array([i], np.int32))  # the processes' collectives are set up\n"
      "if i == 1:\n"
      "  print('error: my own', flush=True)\n"
      "  errors.bound_distributed_exit(2, grace_seconds=3)\n"
      "  sys.exit(2)\n"
      "t0 = time.time()\n"
      "try:\n"
      "  sharding.gather_from_processes(np.array([i], np.int32))\n"
      "except errors.UserError as e:\n"
      "  print(f'{e} after {time.time() - t0:.0f} s', flush=True)\n"), timeout=100)
  outs = [p.out for p in procs]
  assert procs[1].returncode == 2 and "error: my own" in outs[1], outs[1][-2000:]
  assert "process 0: another process stopped while the processes exchanged" in outs[0], outs[0][-2000:]


def test_two_managers_save_the_same_steps_at_once(tmp_path):
  """A trial group's members save the same step asynchronously at the same time: orbax names its barriers
  after the step, and without a distinct prefix per manager the second save hangs ("already ongoing")."""
  procs = run_script(tmp_path, (
      "import sys\n"
      "import jax, numpy as np\n"
      "jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))\n"
      "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
      "from bertjax.checkpoint import Checkpoints\n"
      "x = jax.device_put(np.arange(64, dtype=np.float32), NamedSharding(Mesh(np.array(jax.devices()), ('d',)), P()))\n"
      f"ms = [Checkpoints(f'{tmp_path}/m{{k}}', is_primary=jax.process_index() == 0, sync_name=f'member{{k}}')\n"
      "      for k in range(2)]\n"
      "for step in range(1, 5):\n"
      "  for k, m in enumerate(ms):\n"
      "    m.save(step, {'x': x * step + k}, {'step': step}, metrics={'eval_loss': 1.0 / step})\n"
      "for m in ms:\n"
      "  m.close()\n"
      "print('saved', [m.all_steps() for m in ms], flush=True)\n"), timeout=90)
  for p in procs:
    assert p.returncode == 0 and "saved [[4], [4]]" in p.out, p.out[-3000:]
  restored = Checkpoints(str(tmp_path / "m1"), is_primary=True).restore(4, {"x": np.zeros(64, np.float32)})
  np.testing.assert_array_equal(restored[0]["x"], np.arange(64) * 4 + 1)


def test_two_process_sweep_matches_one_process(setup, tmp_path):
  """A sweep on 2 processes x 2 devices (two trials trained together as a group) gives every trial the losses
  of the same sweep on 1 process x 4 devices; process 0 alone writes the results. (A trial trained alone is a
  single run, which test_slurm_environment_alone_starts_a_two_process_run checks on 2 processes.)"""
  _, data, model = setup
  sweep_file = tmp_path / "lr.py"
  sweep_file.write_text('def get_sweep():\n  return {"grid": {"optimizer.learning_rate": [1e-3, 2e-3]}}\n')
  extra = (f"--sweep={sweep_file}", "--parallel=2", "--config.model.matmul_dtype=float32")  # rtol 1e-6 below
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
  assert [r["name"] for r in results[0]] == [r["name"] for r in results[1]] and len(results[1]) == 2
  for a, b in zip(*results):
    assert a["status"] == b["status"] == "finished"
    np.testing.assert_allclose(a["metric"], b["metric"], rtol=1e-6)
  for name in (r["name"] for r in results[0]):
    a_train, a_eval = train_losses(tmp_path / "one" / "trials" / name)
    b_train, b_eval = train_losses(tmp_path / "two" / "trials" / name)
    assert len(a_train) == len(b_train) == 12 and len(a_eval) == len(b_eval) == 2
    np.testing.assert_allclose(a_train, b_train, rtol=1e-6)
    np.testing.assert_allclose(a_eval, b_eval, rtol=1e-6)
