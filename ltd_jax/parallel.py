"""Data parallelism: one ``data`` mesh axis over every device of every host.

The global batch is split along ``data``; the TrainState, the teacher and in-memory datasets are
replicated. The train step is one ``jax.jit`` program over the mesh (GSPMD): per-device
gradients are all-reduced by XLA, and BatchNorm's batch mean and variance are reduced over the
*global* batch (synchronised BatchNorm), so a run on N devices computes the same function as on
one device and differs only by floating-point summation order.

Several hosts: every process runs the same program after ``jax.distributed.initialize``; each
one loads only its own slice of the global batch (``process_slice``) and the slices are
assembled into one global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ltd_jax.errors import ConfigError

DATA_AXIS = 'data'


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` when ``distributed.initialize`` is set: with no coordinator
  address it autodetects the cluster (SLURM, Open MPI, Cloud TPU); otherwise it uses the
  configured coordinator, process count and process id. Must run before any JAX computation."""
  d = config.distributed
  if not d.initialize:
    return
  kwargs = {}
  if d.coordinator_address:
    if d.num_processes <= 0 or d.process_id < 0:
      raise ConfigError('distributed.coordinator_address needs distributed.num_processes (>0) '
                        'and distributed.process_id (>=0) of this host')
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  jax.distributed.initialize(**kwargs)


_barriers = itertools.count()


def connect_hosts(mesh: Mesh, timeout_s: int = 1800) -> None:
  """Waits until every process gets here, then all-reduces once over every device of ``mesh``.

  The CPU backend makes a collective's gloo connections when it first runs, and waits only
  30 s for the other hosts' addresses: a host that compiles the train step more slowly than
  the others (a loaded machine) made the first step fail with 'Gloo context initialization
  failed'. The coordination service's barrier waits ``timeout_s``; the all-reduce right after it
  makes the connections while the hosts are in step, and later collectives wait for a slow
  peer for the backend's collective timeout (30 min) instead. One process: nothing to do.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(
      f'ltd_jax_connect_hosts_{next(_barriers)}', timeout_in_ms=timeout_s * 1000)
  ones = jax.make_array_from_process_local_data(
      batch_sharded(mesh), np.ones(mesh.local_mesh.devices.size, np.int32))
  total = jax.jit(jnp.sum, out_shardings=replicated(mesh))(ones)
  if int(total) != mesh.devices.size:
    raise RuntimeError(f'connect_hosts: {int(total)} of the mesh\'s {mesh.devices.size} devices '
                       f'answered')


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ('cpu', 'gpu', 'tpu'), compile-only devices included:
  backend-dependent defaults follow it rather than the local backend."""
  return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, key: str = 'batch_size') -> None:
  """The global batch must split evenly over the devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f'{key}={batch_size} does not divide over the {n} devices of the mesh: '
                      f'use a multiple of {n} (--config.{key}) or fewer devices '
                      f'(CUDA_VISIBLE_DEVICES)')


def round_up_to_devices(batch_size: int, mesh: Mesh) -> int:
  n = mesh.devices.size
  return -(-batch_size // n) * n


def replicate(tree, mesh: Mesh):
  """Places every array leaf of ``tree`` (identical on every host) on all devices of ``mesh``."""
  sharding = replicated(mesh)

  def put(x):
    if not hasattr(x, 'shape'):
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda a: a, out_shardings=sharding)(x)  # already global: reshard
    host = np.array(x, copy=True)  # no two leaves may share one (donated) device buffer
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(put, tree)


def abstract_replicated(tree, mesh: Mesh):
  """Shape-only leaves (``jax.ShapeDtypeStruct``) of ``tree`` replicated over ``mesh``: what a
  step is lowered for when there is no device (``--mode=compile``) or no data yet."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_batch(tree, mesh: Mesh):
  """Shape-only leaves of a global batch split along ``data``."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def shard_global_batch(tree, mesh: Mesh):
  """Splits host arrays holding the *global* batch (identical on every host) along ``data``;
  each device receives only its rows."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)


def shard_process_batch(tree, mesh: Mesh):
  """Assembles each host's *own* rows (``process_slice`` of the global batch) into global
  arrays sharded along ``data``."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def process_slice(global_batch_size: int) -> slice:
  """The rows of the global batch that this process loads."""
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def is_primary() -> bool:
  """Whether this process writes the work directory's records (process 0)."""
  return jax.process_index() == 0


def device_summary() -> dict:
  """Process and device layout, recorded with every run."""
  return {'process_count': jax.process_count(), 'process_index': jax.process_index(),
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count()}
