"""Device mesh from the config, the partition rule for params, global batches and what processes exchange
(the multi-process start is bertjax.launcher)."""

import numpy as np
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bertjax.errors import UserError

BATCH_AXES = ("data", "fsdp")  # batch rows are split over both axes; params only over fsdp


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 means all the devices the other axis leaves."""
  n = jax.device_count()
  if data == -1 and fsdp == -1:
    raise UserError("mesh.data and mesh.fsdp cannot both be -1")
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise UserError(f"mesh.data x mesh.fsdp must equal the {n} devices, got {data} x {fsdp}")
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  return Mesh(devices, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2 ** 14) -> P:
  """ZeRO-3 style: split the largest dimension divisible by the fsdp size; small leaves stay whole."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh):
  """Shardings for every leaf of a train state (params and optimizer moments alike)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state)


def global_batches(local_batches: list, sharding: NamedSharding) -> list:
  """The global batches (pytrees of jax.Arrays, e.g. `Batch`es) from each host's rows: their concatenation,
  in one transfer per leaf. One process holds all the rows: one device_put for the whole list, which costs
  about a third of separate calls per batch (a small batch's copy is most of the host pipeline's time)."""
  if jax.process_count() == 1:
    return jax.device_put(list(local_batches), sharding)
  return [jax.make_array_from_process_local_data(sharding, b) for b in local_batches]


def global_batch(local_batch, sharding: NamedSharding):
  """One global batch (`global_batches` of one)."""
  return global_batches([local_batch], sharding)[0]


def _collective(exchange, what: str) -> np.ndarray:
  """`exchange()` (a multihost_utils collective) as a numpy array; another process leaving it midway (it died,
  or stopped on an error of its own and said so in its output) is a one-line UserError here."""
  try:
    return np.asarray(exchange())
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    if not (isinstance(e, jax.errors.JaxRuntimeError) or "Gloo" in str(e)):  # XLA's error, or gloo's ValueError
      raise
    raise UserError(f"process {jax.process_index()}: another process stopped while the processes "
                    f"exchanged {what} (see its output)") from None


def host_array(x: jax.Array, what: str = "their outputs") -> np.ndarray:
  """The whole of a global array (e.g. logits sharded over the batch) on this host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return _collective(lambda: multihost_utils.process_allgather(x, tiled=True), what)


def gather_from_processes(local: np.ndarray, what: str = "their data shards' lengths and labels") -> np.ndarray:
  """Every process's array (32-bit, any leading length) concatenated in process order, on every
  process: how hosts that each read one data shard learn the lengths and labels of all shards."""
  if jax.process_count() == 1:
    return local
  counts = _collective(lambda: multihost_utils.process_allgather(np.array([len(local)], np.int32)), what).reshape(-1)
  padded = np.zeros((max(int(counts.max()), 1),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  everyone = _collective(lambda: multihost_utils.process_allgather(padded), what)
  return np.concatenate([everyone[p, :n] for p, n in enumerate(counts)]).astype(local.dtype)


def from_process_zero(values: np.ndarray) -> np.ndarray:
  """Process 0's int32 array (the same shape on every process), on every process: how a multi-process
  sweep makes every process take the decisions process 0 takes from the files it reads and writes."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values
  return _collective(lambda: multihost_utils.broadcast_one_to_all(values), "process 0's decisions").astype(np.int32)


def local_rows_multiple(mesh: Mesh) -> int:
  """Rows per host must split evenly over this host's devices."""
  return max(1, len(mesh.local_devices))
