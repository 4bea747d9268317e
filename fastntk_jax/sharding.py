"""Data parallelism: the library's own computations, annotated with shardings (no copies).

One mesh axis, "data", spans every device of every process. Rows (samples) are split over it,
parameters are replicated. `data_parallel_sum` runs any function whose outputs are sums over
rows (`unlearn.solvers.gram_stats`, the primal solver's statistics) on every device's rows:
the same function, vmapped over a leading device axis that is sharded over "data", inside one
`jax.jit` whose outputs are replicated, so XLA gives each device a local loop over its rows
and adds one all-reduce per output (verified in the compiled HLO by tests/test_sharding.py).
Training steps are partitioned the same way (`sharded_train_step`). The p×p solve then runs
replicated: p is small by construction in Fast-NTK.

Row layout: n is rarely a multiple of the device count, and each device streams its rows in
fixed-size blocks so a data set compiles once. `shard_rows` pads the rows to
`devices · blocks · block_size` by repeating row 0 (a valid input: no NaN/inf) and returns a
0/1 mask, which `data_parallel_sum` passes to the function as row weights.

Multi-host: call `maybe_initialize_distributed()` before any other JAX call; arrays are then
built with `jax.make_array_from_callback`, so every process must hold the same (global) host
data, which our deterministic, seeded data loading guarantees.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]
log = logging.getLogger(__name__)

DATA_AXIS = "data"
# Environment variables read by `maybe_initialize_distributed`.
ENV_DISTRIBUTED = "FASTNTK_DISTRIBUTED"
# Only for launchers JAX does not detect by itself (not SLURM, Cloud TPU or Open MPI):
# the process count and this process's id, with JAX_COORDINATOR_ADDRESS.
ENV_NUM_PROCESSES = "FASTNTK_NUM_PROCESSES"
ENV_PROCESS_ID = "FASTNTK_PROCESS_ID"

__all__ = [
    "DATA_AXIS",
    "ENV_DISTRIBUTED",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "make_data_mesh",
    "should_initialize_distributed",
    "maybe_initialize_distributed",
    "replicate",
    "shard_rows",
    "shard_batch",
    "data_parallel_sum",
    "sharded_train_step",
]


# --------------------------------------------------------------------------------------
# Mesh and multi-host start-up.
# --------------------------------------------------------------------------------------


def make_data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with the single axis "data" over `devices`.

  Args:
    devices: the devices to use, in order; default: `jax.devices()` (all devices of all
      processes, after `maybe_initialize_distributed`).

  Returns:
    `Mesh` of shape (len(devices),) with axis name "data".
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_data_mesh needs at least one device")
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def _truthy(value: str) -> Optional[bool]:
  v = value.strip().lower()
  if v in ("1", "true", "yes", "on"):
    return True
  if v in ("0", "false", "no", "off"):
    return False
  return None


def should_initialize_distributed(environ: Optional[Mapping[str, str]] = None
                                  ) -> tuple[bool, str]:
  """Decides from the environment whether this process is one of several (pure).

  Rules, first match wins:
    1. FASTNTK_DISTRIBUTED=1/true: yes; FASTNTK_DISTRIBUTED=0/false: no (explicit).
    2. Inside a SLURM job step with more than one task (SLURM_STEP_NUM_TASKS > 1, set by
       `srun`, not in the batch script itself, which is a single process): yes.
    3. On a multi-worker Cloud TPU VM slice (TPU_WORKER_HOSTNAMES lists > 1 host): yes.
    4. Otherwise: no (a single process sees all its local devices without any set-up).

  Args:
    environ: the environment (default `os.environ`).

  Returns:
    (decision, human-readable reason).

  Raises:
    ValueError: FASTNTK_DISTRIBUTED holds something other than a boolean or "auto".
  """
  env = os.environ if environ is None else environ
  flag = env.get(ENV_DISTRIBUTED, "").strip()
  if flag and flag.lower() != "auto":
    decision = _truthy(flag)
    if decision is None:
      raise ValueError(f"{ENV_DISTRIBUTED}={flag!r} is not valid; use 1, 0 or auto")
    return decision, f"{ENV_DISTRIBUTED}={flag}"
  try:
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
  except ValueError:
    step_tasks = 1
  if step_tasks > 1 and "SLURM_PROCID" in env:
    return True, f"SLURM job step with {step_tasks} tasks"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return True, f"Cloud TPU slice with {len(hosts)} workers"
  return False, "single process (no FASTNTK_DISTRIBUTED, SLURM multi-task step or TPU slice)"


def maybe_initialize_distributed(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Calls `jax.distributed.initialize()` when `should_initialize_distributed` says so.

  Must run before anything touches the JAX backend (any computation, `jax.devices()`).
  Coordinator address, process count and id come from JAX's own cluster detection
  (SLURM, Cloud TPU, Open MPI) or from JAX_COORDINATOR_ADDRESS / JAX_LOCAL_DEVICE_IDS
  (launch/slurm_gpu.sh sets both: with one task per node, JAX's SLURM default of one GPU
  per process would hide all but one GPU of each node). Elsewhere, FASTNTK_NUM_PROCESSES
  and FASTNTK_PROCESS_ID give the process count and id. Idempotent.

  Args:
    environ: the environment (default `os.environ`).

  Returns:
    True when this process is (now) part of a multi-process JAX run.
  """
  decision, reason = should_initialize_distributed(environ)
  if not decision:
    log.info("distributed: not initialising (%s)", reason)
    return False
  if jax.distributed.is_initialized():
    return True
  env = os.environ if environ is None else environ
  kwargs = {}
  for name, key in ((ENV_NUM_PROCESSES, "num_processes"), (ENV_PROCESS_ID, "process_id")):
    if env.get(name, "").strip():
      try:
        kwargs[key] = int(env[name])
      except ValueError:
        raise ValueError(f"{name}={env[name]!r} must be an integer") from None
  log.info("distributed: jax.distributed.initialize(%s) (%s)", kwargs or "", reason)
  jax.distributed.initialize(**kwargs)
  log.info("distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True


# --------------------------------------------------------------------------------------
# Placing arrays on the mesh.
# --------------------------------------------------------------------------------------


def _num_devices(mesh: Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def _put(x, sharding: NamedSharding) -> jax.Array:
  """Places a host-identical array with `sharding` (works across processes too)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Several processes: each supplies the shards its own devices hold, from its (identical)
  # copy of the global array.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Puts every leaf of `tree` on every device of `mesh` (PartitionSpec())."""
  rep = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: _put(x, rep), tree)


def _pad_rows_host(x, devices: int, block_size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  """Host-side padding of `shard_rows`: (x padded with row 0 [n_pad, ...], mask [n_pad])."""
  xp = np.asarray(x)
  n = xp.shape[0]
  if n == 0:
    raise ValueError("shard_rows: the array has no rows")
  per_device = max(1, -(-n // devices))
  bs = per_device if not block_size or block_size >= per_device else int(block_size)
  n_pad = devices * -(-per_device // bs) * bs  # devices x blocks x rows per block
  if n_pad > n:
    xp = np.concatenate([xp, np.repeat(xp[:1], n_pad - n, axis=0)], axis=0)
  return xp, (np.arange(n_pad) < n).astype(np.float32)


def shard_rows(x, mesh: Mesh, *, block_size: Optional[int] = None
               ) -> tuple[jax.Array, jax.Array]:
  """Pads the leading (row) axis and splits it over "data".

  Args:
    x: [n, ...] host array (numpy, or a fully addressable jax array), identical on every
      process.
    mesh: a mesh from `make_data_mesh`.
    block_size: rows each device processes at a time (None: all its rows at once). The
      padded length is `devices · ceil(ceil(n / devices) / block) · block`.

  Returns:
    (x_padded [n_pad, ...] sharded over "data", mask [n_pad] float32 (1 = real row)).
    Padded rows repeat row 0.
  """
  xp, mask = _pad_rows_host(x, _num_devices(mesh), block_size)
  sh = NamedSharding(mesh, P(DATA_AXIS))
  return _put(xp, sh), _put(mask, sh)


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Splits the leading axis of every leaf over "data" without padding (training batches).

  No padding on purpose: padded rows would enter BatchNorm's batch statistics in
  bn_mode="train" and change the step; the batch size must divide evenly instead.

  Raises:
    ValueError: a leading dimension is not a multiple of the device count.
  """
  d = _num_devices(mesh)
  sh = NamedSharding(mesh, P(DATA_AXIS))

  def put(x):
    if x.shape[0] % d:
      raise ValueError(f"a batch of {x.shape[0]} rows cannot be split evenly over {d} "
                       f"devices; use a batch size that is a multiple of {d}")
    return _put(x, sh)

  return jax.tree_util.tree_map(put, tree)


# --------------------------------------------------------------------------------------
# Running the library's computations over the mesh.
# --------------------------------------------------------------------------------------


def data_parallel_sum(fn: Callable, mesh: Mesh, *, block_size: Optional[int] = None
                      ) -> Callable:
  """Runs a row-summing function with the rows split over "data", one all-reduce per output.

  Args:
    fn: `(params, x [m, ...], y [m], row_weights [m]) -> pytree of arrays`, each a sum over
      the rows weighted by `row_weights` (e.g. `unlearn.solvers.gram_stats` with its other
      options bound). It is called once per device on that device's rows, in blocks of
      `block_size` if it streams.
    mesh: a "data" mesh (`make_data_mesh`).
    block_size: rows per device per block, used to pad the rows (None: all of a device's
      rows in one block).

  Returns:
    `run(params, x [n, ...], y [n], row_weights [n] or None)` -> the sums over all n rows,
    replicated on every device; compiled once per padded shape. `run.lower(...)` lowers
    the jitted program for the same arguments.
  """
  d = _num_devices(mesh)
  rep = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P(DATA_AXIS))

  def by_device(a):  # [n_pad, ...] -> [devices, n_pad / devices, ...], a local reshape
    a = a.reshape((d, a.shape[0] // d) + a.shape[1:])
    return jax.lax.with_sharding_constraint(a, rows)

  @functools.partial(jax.jit, out_shardings=rep)
  def summed(params, x, y, weights):
    parts = jax.vmap(fn, in_axes=(None, 0, 0, 0))(params, by_device(x), by_device(y),
                                                  by_device(weights))
    return jax.tree_util.tree_map(lambda a: a.sum(axis=0), parts)

  def place(params, x, y, row_weights=None):
    n = x.shape[0]
    _check_rows("y", y, n)
    # Built on the host, then placed: across processes a placed array cannot be read back.
    xp, mask = _pad_rows_host(x, d, block_size)
    if row_weights is not None:
      _check_rows("row_weights", row_weights, n)
      mask = mask * _pad_like(np.asarray(row_weights, np.float32), xp)
    yp = _pad_like(np.asarray(y), xp)  # padded labels carry weight 0
    return replicate(params, mesh), _put(xp, rows), _put(yp, rows), _put(mask, rows)

  run = lambda *args: summed(*place(*args))
  run.lower = lambda *args: summed.lower(*place(*args))  # for inspecting the program
  return run


def _pad_like(values, x_padded) -> np.ndarray:
  """Pads per-row `values` [n, ...] with zeros to the padded row count of `x_padded`."""
  values = np.asarray(values)
  pad = x_padded.shape[0] - values.shape[0]
  return np.concatenate([values, np.zeros((pad,) + values.shape[1:], values.dtype)], axis=0)


def _check_rows(name: str, a, n: int) -> None:
  if a.shape[0] != n:
    raise ValueError(f"{name} has {a.shape[0]} rows but x has {n}")


def sharded_train_step(step: Callable, mesh: Mesh) -> Callable:
  """Makes a `train.make_train_step` step data-parallel over "data".

  The returned function has the step's signature
  `(trained, opt_state, batch_stats, frozen, x, y, mask) -> (trained, opt_state,
  batch_stats, loss)`. It splits x/y/mask over "data" and replicates everything else;
  the already-jitted step then runs partitioned by XLA (computation follows the
  shardings of its inputs). Means over the batch (the loss, BatchNorm's batch statistics
  in bn_mode="train") become cross-device reductions, so one step gives the same result
  as on one device: synchronised BatchNorm, by construction.

  Args:
    step: the jitted step from `train.make_train_step`.
    mesh: a "data" mesh; the batch size must be a multiple of its size.

  Returns:
    The wrapped step; its outputs are replicated.
  """

  def sharded(trained, opt_state, batch_stats, frozen, x, y, mask):
    x, y, mask = shard_batch((x, y, mask), mesh)
    trained, opt_state, batch_stats, frozen = replicate(
        (trained, opt_state, batch_stats, frozen), mesh)
    return step(trained, opt_state, batch_stats, frozen, x, y, mask)

  return sharded
