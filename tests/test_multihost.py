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

from bertjax import demo_data
from bertjax.workdir import load_run
from conftest import tiny_bert_with_tokenizer
from test_train import REPO

OVERRIDES = ("--config.train.max_steps=12", "--config.train.eval_every_steps=6", "--config.train.log_every_steps=1",
             "--config.model.dtype=float32")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, data, model, devices, *extra):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(REPO)}
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny,data_dir={data}",
         f"--workdir={workdir}", f"--config.model.name_or_path={model}", *OVERRIDES, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  demo_data.write(root / "data", 256, 50, seed=2)
  return root, root / "data", tiny_bert_with_tokenizer(root / "model")


def train_losses(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in lines if r["kind"] == "train"], [r["loss"] for r in lines if r["kind"] == "eval"]


def test_two_processes_match_one_process(setup):
  root, data, model = setup
  single = start(root / "one", data, model, 4)
  out, _ = single.communicate(timeout=300)
  assert single.returncode == 0, out[-3000:]
  port = free_port()
  procs = [start(root / "two", data, model, 2, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}") for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  one_train, one_eval = train_losses(root / "one")
  two_train, two_eval = train_losses(root / "two")
  assert len(one_train) == len(two_train) == 12 and len(one_eval) == len(two_eval) == 2
  np.testing.assert_allclose(one_train, two_train, rtol=1e-6)
  np.testing.assert_allclose(one_eval, two_eval, rtol=1e-6)
  a, b = load_run(root / "one", "latest"), load_run(root / "two", "latest")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)
  assert json.loads((root / "two" / "summary.json").read_text())["num_eval_examples"] == 50


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
