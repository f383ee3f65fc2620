"""GPU ids, process counts and expected device counts from faked SLURM / Open MPI environments, with
jax.distributed.initialize replaced by a recorder (nothing starts); the device-count check."""

import os
import subprocess
import sys

import jax
import pytest

from bertjax import launcher
from bertjax.errors import UserError
from test_train import REPO

EIGHT = "0,1,2,3,4,5,6,7"


@pytest.fixture
def recorded(monkeypatch):
  """The keyword arguments of each jax.distributed.initialize call, in an environment cleared of launchers."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "JAX_", "CUDA_", "ROCR_")):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def slurm(monkeypatch, ntasks: int, procid: int, localid: int, nodeid: int = 0, **more):
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": str(ntasks),
         "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), **more}
  for name, value in env.items():
    monkeypatch.setenv(name, value)


def start(coordinator=None, num=None, pid=None):
  return launcher.initialize_distributed(coordinator, num, pid, heartbeat_timeout=30)


def test_one_task_per_node_gets_all_eight_gpus(recorded, monkeypatch):
  """scripts/slurm.sbatch: 2 nodes, one task each, 8 GPUs per node; this is the second node's task."""
  slurm(monkeypatch, 2, 1, 0, nodeid=1, SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_GPUS=EIGHT,
        SLURM_GPUS_ON_NODE="8", CUDA_VISIBLE_DEVICES=EIGHT)
  layout = start()
  assert recorded == [{"num_processes": 2, "process_id": 1, "heartbeat_timeout_seconds": 30,
                       "local_device_ids": list(range(8))}]
  assert (layout.expected_local, layout.expected_global) == (8, 16)


def test_eight_tasks_sharing_the_node_gpus_take_one_each(recorded, monkeypatch):
  """8 tasks on one node, every task sees the node's 8 GPUs (no binding): task 3 takes GPU 3."""
  slurm(monkeypatch, 8, 3, 3, SLURM_STEP_TASKS_PER_NODE="8", SLURM_STEP_GPUS=EIGHT, CUDA_VISIBLE_DEVICES=EIGHT)
  layout = start()
  assert recorded[0]["local_device_ids"] == [3] and recorded[0]["num_processes"] == 8
  assert (layout.expected_local, layout.expected_global) == (1, 8)


@pytest.mark.parametrize("per_task", [{"SLURM_GPUS_PER_TASK": "1"}, {}])
def test_eight_tasks_bound_to_their_gpu_take_their_only_one(recorded, monkeypatch, per_task):
  """--gpus-per-task=1 or --gpu-bind: CUDA_VISIBLE_DEVICES holds the task's own GPU, so its local id 3 names no
  GPU; the task's id is 0 (with or without SLURM_GPUS_PER_TASK, from the node's 8 in SLURM_STEP_GPUS)."""
  slurm(monkeypatch, 8, 3, 3, SLURM_STEP_TASKS_PER_NODE="8", SLURM_STEP_GPUS=EIGHT, CUDA_VISIBLE_DEVICES="3",
        **per_task)
  layout = start()
  assert recorded[0]["local_device_ids"] == [0]
  assert (layout.expected_local, layout.expected_global) == (1, 8)


def test_two_nodes_of_eight_single_gpu_tasks(recorded, monkeypatch):
  slurm(monkeypatch, 16, 13, 5, nodeid=1, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_GPUS_ON_NODE="8",
        CUDA_VISIBLE_DEVICES=EIGHT)
  layout = start()
  assert recorded[0]["local_device_ids"] == [5]
  assert (recorded[0]["num_processes"], recorded[0]["process_id"]) == (16, 13)
  assert (layout.expected_local, layout.expected_global) == (1, 16)


def test_tasks_per_node_from_the_task_and_node_counts(recorded, monkeypatch):
  """No tasks-per-node variable: SLURM_NTASKS over SLURM_STEP_NUM_NODES."""
  slurm(monkeypatch, 16, 13, 5, nodeid=1, SLURM_STEP_NUM_NODES="2", CUDA_VISIBLE_DEVICES=EIGHT)
  layout = start()
  assert recorded[0]["local_device_ids"] == [5] and (layout.expected_local, layout.expected_global) == (1, 16)


def test_two_tasks_per_node_split_the_gpus_in_halves(recorded, monkeypatch):
  slurm(monkeypatch, 4, 3, 1, nodeid=1, SLURM_NTASKS_PER_NODE="2", CUDA_VISIBLE_DEVICES=EIGHT)
  layout = start()
  assert recorded[0]["local_device_ids"] == [4, 5, 6, 7]
  assert (layout.expected_local, layout.expected_global) == (4, 16)


def test_uneven_task_counts_check_only_the_local_devices(recorded, monkeypatch):
  """Tasks per node 2 and 1: the second node's task has all 8 GPUs, the first node's 4 each; no total."""
  slurm(monkeypatch, 3, 2, 0, nodeid=1, SLURM_STEP_TASKS_PER_NODE="2,1", CUDA_VISIBLE_DEVICES=EIGHT)
  layout = start()
  assert recorded[0]["local_device_ids"] == list(range(8))
  assert (layout.expected_local, layout.expected_global) == (8, None)


def test_cpu_jobs_set_nothing_about_gpus(recorded, monkeypatch):
  """What tests/test_multihost.py's SLURM run gives: no GPU variable. JAX_PLATFORMS=cpu hides GPUs too."""
  slurm(monkeypatch, 2, 1, 1, SLURM_STEP_TASKS_PER_NODE="2")
  layout = start()
  assert recorded == [{"num_processes": 2, "process_id": 1, "heartbeat_timeout_seconds": 30}]
  assert (layout.local_device_ids, layout.expected_local, layout.expected_global) == (None, None, None)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", EIGHT)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  layout = start()
  assert recorded[1] == recorded[0] and layout.expected_local is None


def test_open_mpi_two_ranks_per_node(recorded, monkeypatch):
  for name, value in {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911",
                      "CUDA_VISIBLE_DEVICES": "0,1,2,3"}.items():
    monkeypatch.setenv(name, value)
  layout = start()
  assert recorded[0]["local_device_ids"] == [2, 3]
  assert (recorded[0]["num_processes"], recorded[0]["process_id"]) == (4, 3)
  assert (layout.expected_local, layout.expected_global) == (2, None)


def test_explicit_flags_use_every_visible_gpu(recorded, monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
  layout = start("10.0.0.1:1234", 2, 1)
  assert recorded == [{"num_processes": 2, "process_id": 1, "heartbeat_timeout_seconds": 30,
                       "coordinator_address": "10.0.0.1:1234", "initialization_timeout": 120,
                       "local_device_ids": [0, 1]}]
  assert (layout.expected_local, layout.expected_global) == (2, None)


def test_one_process_starts_nothing_but_still_expects_its_gpus(recorded, monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  layout = start()
  assert recorded == [] and (layout.expected_local, layout.expected_global) == (4, 4)


def test_jax_local_device_ids_are_taken_as_given(recorded, monkeypatch):
  slurm(monkeypatch, 2, 0, 0, SLURM_STEP_TASKS_PER_NODE="2", CUDA_VISIBLE_DEVICES=EIGHT,
        JAX_LOCAL_DEVICE_IDS="6,7")
  start()
  assert recorded[0]["local_device_ids"] == [6, 7]


@pytest.mark.parametrize("env,match", [
    ({"SLURM_STEP_TASKS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}, "6 visible for 4 tasks"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2", "SLURM_GPUS_PER_TASK": "2"},
     "3 visible for 2 tasks"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(y2)", "CUDA_VISIBLE_DEVICES": "0,1"}, "cannot read the tasks per node"),
])
def test_layouts_that_cannot_be_read_are_refused(recorded, monkeypatch, env, match):
  slurm(monkeypatch, 2, 0, 0, **env)
  with pytest.raises(UserError, match=match) as e:
    start()
  assert "\n" not in str(e.value) and recorded == []


def test_tasks_per_node_syntax():
  assert launcher.parse_tasks_per_node("8(x2),4") == [8, 8, 4]
  assert launcher.parse_tasks_per_node("1") == [1]


def test_device_count_mismatch_is_one_line():
  layout = launcher.TaskLayout("slurm", 2, 1, tuple(range(8)), 8, 16, "CUDA_VISIBLE_DEVICES=0,...")
  launcher.check_device_counts(layout, 8, 16, "gpu")
  with pytest.raises(UserError, match=r"process 1 has 1 cpu devices but its task was given 8 GPUs .*CUDA plugin"):
    launcher.check_device_counts(layout, 1, 2, "cpu")
  with pytest.raises(UserError, match="the run has 8 gpu devices but 2 processes"):
    launcher.check_device_counts(layout, 8, 8, "gpu")
  cpu = launcher.TaskLayout("none", 1, 0)
  launcher.check_device_counts(cpu, 1, 1, "cpu")
  with pytest.raises(UserError, match="the run has 1 cpu devices but --expected_devices asked for 4"):
    launcher.check_device_counts(cpu, 1, 1, "cpu", expected_devices=4)


def test_train_refuses_the_wrong_device_count_before_writing(tmp_path):
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:tiny", f"--workdir={tmp_path / 'w'}",
         "--expected_devices=3"]
  env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == \
      "error: the run has 2 cpu devices but --expected_devices asked for 3"
  assert not (tmp_path / "w").exists()
