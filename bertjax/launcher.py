"""What this process's launcher gave it (process count and index, GPUs), the multi-process start
(jax.distributed) and the check that jax sees the devices the job asked for.

Left to itself, jax.distributed.initialize under SLURM or Open MPI restricts every process to the one GPU
numbered like its local rank ("one process per device"), so with scripts/slurm.sbatch's one task per node a
2-node x 8-GPU job trains on 2 GPUs without a word; and when SLURM binds GPUs per task, CUDA_VISIBLE_DEVICES
holds only the task's own GPU and local rank 3 names no GPU at all. bertjax therefore derives the GPU ids
from the task's environment and passes them explicitly. The rule (docs/gpu.md, "SLURM and launchers"):

- No GPU in the environment (JAX_PLATFORMS without cuda/gpu/rocm, or no GPU variable below): nothing about
  GPUs is set or checked. JAX_LOCAL_DEVICE_IDS, when set, are the ids as given.
- V: the GPUs the process sees, the entries of CUDA_VISIBLE_DEVICES (ROCR_VISIBLE_DEVICES on AMD), else
  SLURM's GPUs on this node (SLURM_STEP_GPUS, SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS). Ids are positions
  0..V-1 among them, as CUDA numbers the visible GPUs.
- T tasks on this node (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE, "8(x2)"
  syntax; OMPI_COMM_WORLD_LOCAL_SIZE; 1 otherwise), r this task's local rank (SLURM_LOCALID,
  OMPI_COMM_WORLD_LOCAL_RANK), G GPUs per task (SLURM_GPUS_PER_TASK when set).
- The task's own GPUs (ids 0..V-1) when V == G, T == 1, V is less than SLURM's GPUs on the node (the launcher
  bound each task to its GPUs), or V < T; else the node's V GPUs are shared: task r takes ids r*G..r*G+G-1
  with G = V / T. Anything else (V not G * T, or not divisible by T) is refused in one line.

The job then asked for V (or G) devices in this process and, when every task has as many (SLURM_GPUS_PER_TASK,
or the same task count on every node), that times the process count in all.
"""

import dataclasses
import os
import re
from collections.abc import Mapping

from bertjax.errors import UserError

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")  # jax's
_VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
_NO_GPU_VALUES = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU (NoDevFiles: SLURM)


@dataclasses.dataclass(frozen=True)
class TaskLayout:
  """This process's place in the job. `local_device_ids`: the GPU ids for jax.distributed (None: none set);
  `expected_local` / `expected_global`: the devices the job asked for here and in all (None: not known);
  `source`: the variables they come from, for messages."""
  launcher: str  # "slurm", "ompi" or "none" (explicit flags or one process)
  num_processes: int | None  # None: jax finds it (JAX_COORDINATOR_ADDRESS with another cluster's variables)
  process_id: int | None
  local_device_ids: tuple[int, ...] | None = None
  expected_local: int | None = None
  expected_global: int | None = None
  source: str = ""


def parse_tasks_per_node(value: str) -> list[int]:
  """SLURM's per-node task counts, "8(x2),4" -> [8, 8, 4]."""
  counts = []
  for part in value.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if m is None:
      raise UserError(f"cannot read the tasks per node {value!r} (SLURM's form is like 8(x2),4)")
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts


def _int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  m = re.fullmatch(r"(?:.*:)?(\d+)", value)  # SLURM_GPUS_PER_TASK may carry a type: "a100:2"
  return int(m.group(1)) if m else None


def _gpu_platforms_allowed(env: Mapping[str, str]) -> bool:
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  return not platforms or any(p in ("cuda", "gpu", "rocm") for p in platforms)


def _node_gpus(env: Mapping[str, str]) -> tuple[int, str] | None:
  """SLURM's GPU count for this step on this node, and the variable it comes from."""
  for name in ("SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS"):
    value = env.get(name, "").strip()
    if value:
      count = int(value) if name == "SLURM_GPUS_ON_NODE" and value.isdigit() else len(value.split(","))
      return count, f"{name}={value}"
  return None


def _visible_gpus(env: Mapping[str, str]) -> tuple[int, str] | None:
  """The GPUs this process sees and the variable that says so; None for no GPU in the environment."""
  for name in _VISIBLE_VARS:
    if name in env:
      value = env[name].strip()
      return None if value in _NO_GPU_VALUES else (len(value.split(",")), f"{name}={value}")
  return _node_gpus(env)


def _tasks_here(env: Mapping[str, str], launcher: str, num_processes: int | None) -> tuple[int, int, bool, str]:
  """(tasks on this node, this task's local rank, every node has as many tasks, source)."""
  if launcher == "ompi":
    size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1
    return size, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, False, f"OMPI_COMM_WORLD_LOCAL_SIZE={size}"
  if launcher != "slurm":
    return 1, 0, num_processes == 1, "one task on this node"
  rank = _int(env, "SLURM_LOCALID") or 0
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
    if env.get(name, "").strip():
      counts = parse_tasks_per_node(env[name])
      node = _int(env, "SLURM_NODEID") or 0
      here = counts[node] if node < len(counts) else counts[0]
      return here, rank, len(set(counts)) == 1, f"{name}={env[name]}"
  nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES") or 1
  tasks = num_processes or 1
  if tasks % nodes:
    raise UserError(f"SLURM gives {tasks} tasks on {nodes} nodes and no SLURM_STEP_TASKS_PER_NODE: "
                    "cannot tell how many run on this node")
  return tasks // nodes, rank, True, f"SLURM_NTASKS={tasks} on {nodes} nodes"


def _own_or_shared(visible: int, tasks: int, rank: int, per_task: int | None, node: int | None) -> range:
  """The ids of this task's GPUs among the `visible` ones (the rule in the module docstring)."""
  if per_task is None:
    if tasks == 1 or (node is not None and visible < node) or visible < tasks:
      return range(visible)
    if visible % tasks:
      raise ValueError
    per_task = visible // tasks
  if visible == per_task:
    return range(visible)
  if visible == per_task * tasks and rank < tasks:
    return range(rank * per_task, (rank + 1) * per_task)
  raise ValueError


def task_layout(env: Mapping[str, str], num_processes: int | None = None, process_id: int | None = None) -> TaskLayout:
  """This process's layout from its environment (`num_processes` / `process_id`: explicit flags, if any)."""
  if all(name in env for name in _SLURM_VARS):
    launcher = "slurm"
    num_processes = num_processes or _int(env, "SLURM_NTASKS")
    process_id = _int(env, "SLURM_PROCID") if process_id is None else process_id
  elif "OMPI_COMM_WORLD_SIZE" in env:
    launcher = "ompi"
    num_processes = num_processes or _int(env, "OMPI_COMM_WORLD_SIZE")
    process_id = _int(env, "OMPI_COMM_WORLD_RANK") if process_id is None else process_id
  else:
    launcher = "none"
    if num_processes is None and "JAX_COORDINATOR_ADDRESS" not in env:
      num_processes, process_id = 1, 0
  layout = TaskLayout(launcher, num_processes, process_id)
  if not _gpu_platforms_allowed(env):
    return layout  # a CPU job: nothing about GPUs
  if env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
    try:
      ids = tuple(int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(","))
    except ValueError:
      raise UserError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r} is not a list of GPU ids") from None
    return dataclasses.replace(layout, local_device_ids=ids, expected_local=len(ids),
                               source=f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']}")
  visible = _visible_gpus(env)
  if visible is None:
    return layout  # no GPU in the environment
  count, seen = visible
  tasks, rank, uniform, tasks_source = _tasks_here(env, launcher, num_processes)
  per_task = _int(env, "SLURM_GPUS_PER_TASK") if launcher == "slurm" else None
  node = _node_gpus(env) if launcher == "slurm" else None
  source = ", ".join([seen, tasks_source] + ([f"SLURM_GPUS_PER_TASK={env['SLURM_GPUS_PER_TASK']}"]
                                             if per_task is not None else []))
  try:
    ids = _own_or_shared(count, tasks, rank, per_task, node[0] if node else None)
  except ValueError:
    raise UserError(f"cannot tell this task's GPUs: {count} visible for {tasks} tasks on this node, task {rank} "
                    f"({source}); set JAX_LOCAL_DEVICE_IDS (see docs/gpu.md)") from None
  uniform = uniform or per_task is not None
  total = len(ids) * num_processes if uniform and num_processes else None
  return dataclasses.replace(layout, local_device_ids=tuple(ids), expected_local=len(ids), expected_global=total,
                             source=source)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                           heartbeat_timeout: int = 30, env: Mapping[str, str] | None = None) -> TaskLayout:
  """jax.distributed from explicit flags or the launcher's environment, with this task's GPU ids; a no-op
  for one process. A short heartbeat makes survivors of a dead process fail instead of hanging."""
  import jax
  env = os.environ if env is None else env
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit and None in (coordinator_address, num_processes, process_id):
    raise UserError("--coordinator_address, --num_processes and --process_id go together")
  layout = task_layout(env, num_processes, process_id)
  if not explicit and layout.num_processes == 1:
    return layout
  if (layout.launcher == "ompi" and "OMPI_MCA_orte_hnp_uri" not in env and "JAX_COORDINATOR_ADDRESS" not in env
      and not explicit):
    raise UserError("Open MPI without OMPI_MCA_orte_hnp_uri (Open MPI 5): set JAX_COORDINATOR_ADDRESS=HOST:PORT "
                    "of rank 0, or pass --coordinator_address")
  kwargs = {"num_processes": layout.num_processes, "process_id": layout.process_id,
            "heartbeat_timeout_seconds": heartbeat_timeout}
  if explicit:
    kwargs.update(coordinator_address=coordinator_address, initialization_timeout=120)
  if layout.local_device_ids is not None:
    kwargs["local_device_ids"] = list(layout.local_device_ids)
  jax.distributed.initialize(**kwargs)
  return layout


def check_device_counts(layout: TaskLayout, local: int, total: int, backend: str,
                        expected_devices: int | None = None) -> None:
  """Refuses, in one line, a process whose devices differ from what the job asked for (`expected_devices`:
  the run's total from --expected_devices, for launchers this module cannot read)."""
  hint = (" (jax found no GPU: is its CUDA plugin installed, e.g. pip install 'jax[cuda12]'? JAX_PLATFORMS=cpu "
          "trains on the CPU)" if backend == "cpu" and layout.expected_local else "")
  if layout.expected_local is not None and local != layout.expected_local:
    raise UserError(f"process {layout.process_id} has {local} {backend} devices but its task was given "
                    f"{layout.expected_local} GPUs ({layout.source}){hint}")
  want = expected_devices or layout.expected_global
  if want is not None and total != want:
    said = "--expected_devices" if expected_devices else f"{layout.num_processes} processes ({layout.source})"
    raise UserError(f"the run has {total} {backend} devices but {said} asked for {want}{hint}")
