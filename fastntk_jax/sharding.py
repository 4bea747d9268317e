"""Data-parallel NTK, Gram and training computations with JAX's own SPMD machinery.

One mesh axis, "data", spans every device of every process. Inputs are split over it by
rows (samples); parameters are replicated. Each computation is a `jax.jit` over
`NamedSharding`-annotated arrays: every device works on its own rows and XLA inserts the one
all-reduce that sums the per-device contributions (no hand-written collectives, no
`shard_map`, no process orchestration of our own). The p×p (primal) solve then runs
replicated on every device: p is small by construction in Fast-NTK, and a replicated
Cholesky costs no communication.

Row layout (why the padding): n is rarely a multiple of the device count, and each device
streams its rows in fixed-size blocks so the whole data set compiles once. `shard_rows`
pads the rows to `n_pad = devices · blocks · block_size` by repeating row 0 (a valid input:
no NaN/inf in padded rows) and returns a 0/1 mask; every reduction multiplies the padded
rows' contribution by that mask, and every row-shaped output is cut back to n rows.
Inside a jitted function the padded rows are viewed as [devices, rows_per_device, ...]
with the leading axis sharded; `jax.vmap` over that axis of a per-device scan gives each
device a purely local loop (verified in the compiled HLO: the loop carry is one device's
p×p block, and the only collective is the final all-reduce).

Multi-host: call `maybe_initialize_distributed()` before any other JAX call; arrays are
then built with `jax.make_array_from_callback`, so every process must hold the same
(global) host data, which our deterministic, seeded data loading guarantees. Replicated
outputs (Grams, parameters) are readable on every process; row-sharded outputs (kernel
rows, jvp rows) span processes and are read with `to_host`.

The public functions mirror `fastntk_jax.ntk` and `fastntk_jax.unlearn` (same arguments
plus `mesh`) and give the same numbers up to floating-point summation order.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastntk_jax import ntk

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
    "to_host",
    "sharded_apply_rows",
    "sharded_gram",
    "sharded_kernel",
    "sharded_jvp_rows",
    "sharded_vjp_rows",
    "sharded_train_step",
    "sharded_gram_stats_fn",
    "sharded_primal_update",
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


def _padded_rows(n: int, devices: int, block_size: Optional[int]) -> tuple[int, int]:
  """(rows per device per block, blocks per device) covering n rows on `devices`."""
  per_device = max(1, -(-n // devices))
  bs = per_device if not block_size or block_size >= per_device else int(block_size)
  return bs, -(-per_device // bs)


def _pad_rows_host(x, devices: int, block_size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  """Host-side padding of `shard_rows`: (x padded with row 0 [n_pad, ...], mask [n_pad])."""
  xp = np.asarray(x)
  n = xp.shape[0]
  if n == 0:
    raise ValueError("shard_rows: the array has no rows")
  bs, nb = _padded_rows(n, devices, block_size)
  n_pad = devices * nb * bs
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


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on this process (gathers row shards held by other processes)."""
  if jax.process_count() == 1 or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --------------------------------------------------------------------------------------
# Per-device building blocks (called inside jit, vmapped over the device axis).
# --------------------------------------------------------------------------------------


def _by_device(x: jnp.ndarray, mesh: Mesh) -> jnp.ndarray:
  """[n_pad, ...] -> [devices, n_pad / devices, ...], the leading axis on "data".

  Splitting the sharded axis with the device count as the major factor is a local
  reshape (no data moves); the constraint pins that layout for the vmapped loops.
  """
  d = _num_devices(mesh)
  x = x.reshape((d, x.shape[0] // d) + x.shape[1:])
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA_AXIS)))


def _from_device(x: jnp.ndarray) -> jnp.ndarray:
  """[devices, rows, ...] -> [devices * rows, ...] (inverse of `_by_device`)."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _local_gram(apply_fn, params, x, r, mask, *, block_size, dtype):
  """One device's Σ_rows J_iᵀJ_i [p, p] and Σ_rows J_iᵀ r_i [p], padded rows masked."""
  p = ntk.num_params(params)
  nb = x.shape[0] // block_size
  blocks = x.reshape((nb, block_size) + x.shape[1:])
  r_blocks = r.reshape(nb, block_size, -1)
  m_blocks = mask.reshape(nb, block_size)

  def step(carry, inputs):
    g, b = carry
    xb, rb, mb = inputs
    jb = ntk.jacobian(apply_fn, params, xb).astype(dtype).reshape(block_size, -1, p)
    jb = jb * mb[:, None, None].astype(dtype)  # padded rows contribute nothing
    jb2 = jb.reshape(-1, p)
    g = g + jb2.T @ jb2
    b = b + jnp.einsum("icp,ic->p", jb, rb.astype(dtype))
    return (g, b), None

  init = (jnp.zeros((p, p), dtype), jnp.zeros((p,), dtype))
  (g, b), _ = jax.lax.scan(step, init, (blocks, r_blocks, m_blocks))
  return g, b


def _gram_in_jit(apply_fn, params, x, r, mask, mesh, *, block_size, dtype):
  """G [p, p], b [p] from row-sharded padded x/r/mask; replicated (one all-reduce)."""
  g, b = jax.vmap(functools.partial(_local_gram, apply_fn, block_size=block_size, dtype=dtype),
                  in_axes=(None, 0, 0, 0))(
                      params, _by_device(x, mesh), _by_device(r, mesh), _by_device(mask, mesh))
  return g.sum(axis=0), b.sum(axis=0)


def _apply_in_jit(apply_fn, params, x, mesh, *, block_size):
  """Logits [n_pad, C] of row-sharded padded x, rows stay sharded."""
  out = jax.vmap(lambda xl: ntk.apply_rows(apply_fn, params, xl, batch_size=block_size))(
      _by_device(x, mesh))
  return _from_device(out)


def _jvp_in_jit(apply_fn, params, x, tangent, mesh, *, block_size):
  out = jax.vmap(lambda xl: ntk.jvp_rows(apply_fn, params, xl, tangent,
                                         batch_size=block_size))(_by_device(x, mesh))
  return _from_device(out)


def _vjp_in_jit(apply_fn, params, x, cotangent, mask, mesh, *, block_size):
  # Zeroing the padded rows' cotangents removes their contribution exactly.
  u = cotangent * mask[:, None].astype(cotangent.dtype)
  parts = jax.vmap(lambda xl, ul: ntk.vjp_rows(apply_fn, params, xl, ul,
                                               batch_size=block_size))(
                                                   _by_device(x, mesh), _by_device(u, mesh))
  return jax.tree_util.tree_map(lambda t: t.sum(axis=0), parts)


def _pad_like(values, x_padded) -> np.ndarray:
  """Pads per-row `values` [n, ...] with zeros to the padded row count of `x_padded`."""
  values = np.asarray(values)
  pad = x_padded.shape[0] - values.shape[0]
  if pad < 0:
    raise ValueError(f"{values.shape[0]} rows of values for {x_padded.shape[0]} padded inputs")
  return np.concatenate([values, np.zeros((pad,) + values.shape[1:], values.dtype)], axis=0)


def _check_rows(name: str, a, n: int) -> None:
  if a.shape[0] != n:
    raise ValueError(f"{name} has {a.shape[0]} rows but x has {n}")


# --------------------------------------------------------------------------------------
# Public sharded counterparts of fastntk_jax.ntk.
# --------------------------------------------------------------------------------------


def sharded_apply_rows(apply_fn: ApplyFn, params: PyTree, x, *, mesh: Mesh,
                       batch_size: Optional[int] = 256) -> jax.Array:
  """`ntk.apply_rows` with the rows split over "data".

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    params: pytree (replicated onto the mesh).
    x: inputs [n, ...].
    mesh: a "data" mesh.
    batch_size: rows per device per block.

  Returns:
    logits [n, C].
  """
  n = x.shape[0]
  xs, _ = shard_rows(x, mesh, block_size=batch_size)
  bs, _ = _padded_rows(n, _num_devices(mesh), batch_size)
  fn = jax.jit(lambda w, xx: _apply_in_jit(apply_fn, w, xx, mesh, block_size=bs)[:n])
  return fn(replicate(params, mesh), xs)


def sharded_gram(apply_fn: ApplyFn, params: PyTree, x, residuals, *, mesh: Mesh,
                 batch_size: Optional[int] = 256,
                 dtype: Optional[jnp.dtype] = None) -> tuple[jax.Array, jax.Array]:
  """`ntk.gram` (G = JᵀJ, b = Jᵀr) with the rows split over "data".

  Each device streams its own rows in blocks of `batch_size` (memory per device:
  p² + batch_size·C·p); the per-device sums are added by one all-reduce.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    params: trainable pytree (the linearisation point), p scalars.
    x: inputs [n, ...].
    residuals: [n, C].
    mesh: a "data" mesh.
    batch_size: rows per device per block.
    dtype: accumulation dtype; default: the params' dtype.

  Returns:
    (G [p, p], b [p]), replicated on every device.
  """
  n = x.shape[0]
  _check_rows("residuals", residuals, n)
  acc = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      *jax.tree_util.tree_leaves(params))
  xs, mask = shard_rows(x, mesh, block_size=batch_size)
  rs = _put(_pad_like(residuals, xs), NamedSharding(mesh, P(DATA_AXIS)))
  bs, _ = _padded_rows(n, _num_devices(mesh), batch_size)
  rep = NamedSharding(mesh, P())
  fn = jax.jit(lambda w, xx, rr, mm: _gram_in_jit(apply_fn, w, xx, rr, mm, mesh,
                                                  block_size=bs, dtype=acc),
               out_shardings=(rep, rep))
  return fn(replicate(params, mesh), xs, rs, mask)


def sharded_kernel(apply_fn: ApplyFn, params: PyTree, x1, x2=None, *, mesh: Mesh,
                   batch_size: Optional[int] = 256,
                   implementation: ntk.KernelImplementation | str = "auto") -> jax.Array:
  """`ntk.empirical_kernel` with the rows (x1) split over "data".

  Every device computes its rows against all of x2 (x2 is replicated): no communication
  until the result is read. Memory per device: (n1 / devices)·n2·C² plus two blocks'
  Jacobians.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    params: trainable pytree.
    x1: inputs [n1, ...] (split over devices).
    x2: inputs [n2, ...] (replicated); default x1.
    mesh: a "data" mesh.
    batch_size: rows per block (x1 rows per device per block, and x2 columns per block).
    implementation: as in `ntk.empirical_kernel`.

  Returns:
    Kernel [n1, n2, C, C], rows split over devices (use `to_host` across processes).
  """
  implementation = ntk.resolve_implementation(implementation)
  n1 = x1.shape[0]
  x2 = x1 if x2 is None else x2
  xs, _ = shard_rows(x1, mesh, block_size=batch_size)
  x2r = replicate(x2 if isinstance(x2, jax.Array) else np.asarray(x2), mesh)
  bs, _ = _padded_rows(n1, _num_devices(mesh), batch_size)

  def fn(w, a, b):
    k = jax.vmap(lambda al: ntk.empirical_kernel(apply_fn, w, al, b, batch_size=bs,
                                                 implementation=implementation))(
                                                     _by_device(a, mesh))
    return _from_device(k)[:n1]

  return jax.jit(fn)(replicate(params, mesh), xs, x2r)


def sharded_jvp_rows(apply_fn: ApplyFn, params: PyTree, x, tangent: PyTree, *, mesh: Mesh,
                     batch_size: Optional[int] = 256) -> jax.Array:
  """`ntk.jvp_rows` (J v, [n, C]) with the rows split over "data"; `tangent` replicated."""
  n = x.shape[0]
  xs, _ = shard_rows(x, mesh, block_size=batch_size)
  bs, _ = _padded_rows(n, _num_devices(mesh), batch_size)
  fn = jax.jit(lambda w, xx, t: _jvp_in_jit(apply_fn, w, xx, t, mesh, block_size=bs)[:n])
  return fn(replicate(params, mesh), xs, replicate(tangent, mesh))


def sharded_vjp_rows(apply_fn: ApplyFn, params: PyTree, x, cotangent, *, mesh: Mesh,
                     batch_size: Optional[int] = 256) -> PyTree:
  """`ntk.vjp_rows` (Jᵀu, a pytree like params) with the rows split over "data".

  Args:
    cotangent: [n, C].

  Returns:
    Pytree like `params`, replicated (the per-device sums are all-reduced).
  """
  n = x.shape[0]
  _check_rows("cotangent", cotangent, n)
  xs, mask = shard_rows(x, mesh, block_size=batch_size)
  us = _put(_pad_like(cotangent, xs), NamedSharding(mesh, P(DATA_AXIS)))
  bs, _ = _padded_rows(n, _num_devices(mesh), batch_size)
  fn = jax.jit(lambda w, xx, u, m: _vjp_in_jit(apply_fn, w, xx, u, m, mesh, block_size=bs),
               out_shardings=NamedSharding(mesh, P()))
  return fn(replicate(params, mesh), xs, us, mask)


# --------------------------------------------------------------------------------------
# Training and the unlearning update.
# --------------------------------------------------------------------------------------


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


def sharded_gram_stats_fn(apply_fn: ApplyFn, w_lin: PyTree, *, num_classes: int,
                          mesh: Mesh, batch_size: Optional[int] = 256,
                          dtype: Optional[jnp.dtype] = None) -> Callable:
  """The primal solver's sufficient statistics of a set of labelled rows, rows split.

  For rows (x, y) and residuals E = one_hot(y) − f(w_lin, x), the returned function gives
  G = JᵀJ and b = JᵀE at w_lin, with optional per-row 0/1 weights (the padding of a
  fixed-size chunk). Summing its outputs over chunks gives the statistics of a whole set,
  which is how a resumable, chunked accumulation (pipeline) uses it; `unlearn.primal_solve`
  turns the statistics of D_r and D_f into Δ. Compiled once per chunk shape.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    w_lin: the linearisation point (trainable pytree), replicated onto the mesh once.
    num_classes: C.
    mesh: a "data" mesh.
    batch_size: rows per device per streamed Jacobian block.
    dtype: accumulation dtype; default: the params' dtype.

  Returns:
    `stats(x [m, ...], y [m] int, row_weights [m] or None) -> (G [p, p], b [p])`, both
    replicated on every device.
  """
  acc = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      *jax.tree_util.tree_leaves(w_lin))
  w_rep = replicate(w_lin, mesh)
  rep = NamedSharding(mesh, P())
  row_sh = NamedSharding(mesh, P(DATA_AXIS))

  @functools.partial(jax.jit, static_argnames="block_size", out_shardings=(rep, rep))
  def stats_padded(w, x, y, mask, *, block_size):
    logits = _apply_in_jit(apply_fn, w, x, mesh, block_size=block_size)
    residuals = jax.nn.one_hot(y, num_classes, dtype=logits.dtype) - logits
    return _gram_in_jit(apply_fn, w, x, residuals, mask, mesh, block_size=block_size,
                        dtype=acc)

  def stats(x, y, row_weights=None):
    n = x.shape[0]
    _check_rows("y", y, n)
    # Built on the host, then placed: across processes a placed array cannot be read back.
    xp, mask = _pad_rows_host(x, _num_devices(mesh), batch_size)
    if row_weights is not None:
      _check_rows("row_weights", row_weights, n)
      mask = mask * _pad_like(np.asarray(row_weights, np.float32), xp)
    # Padded labels are class 0; their rows carry mask 0, so they never count.
    ys = _pad_like(np.asarray(y), xp)
    bs, _ = _padded_rows(n, _num_devices(mesh), batch_size)
    return stats_padded(w_rep, _put(xp, row_sh), _put(ys, row_sh), _put(mask, row_sh),
                        block_size=bs)

  return stats


def sharded_primal_update(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *,
                          retain, forget, num_classes: int, mesh: Mesh,
                          damping: float = 1e-2, batch_size: Optional[int] = 256,
                          solve_dtype=None, linearize_at: str = "init",
                          step_scale: float = 1.0) -> PyTree:
  """`unlearn.ntk_forget(..., solver="primal")` with the Jacobian work split over "data".

  Δ = (G_r+λI)⁻¹ J_rᵀE_r − (G_r+G_f+λI)⁻¹ (J_rᵀE_r + J_fᵀE_f) (DESIGN.md §2): the logits,
  G_r, G_f and the Jᵀ E products are computed with the rows of D_r and D_f split over
  devices (`sharded_gram_stats_fn`); the p×p solves (`unlearn.primal_solve`, the very
  code the single-device solver uses) run replicated on every device. Inputs are validated
  exactly as in `ntk_forget` (same messages), before any heavy work.

  Args:
    apply_fn: `(params, x) -> logits [n, C]` over the trainable pytree only (BatchNorm in
      inference mode, frozen weights closed over).
    params_init: w0, the linearisation point (trainable params before fine-tuning).
    params: w_D, the fine-tuned trainable params.
    retain: (x_r [n_r, ...], y_r [n_r] int).
    forget: (x_f [n_f, ...], y_f [n_f] int).
    num_classes: C.
    mesh: a "data" mesh (`make_data_mesh`).
    damping: λ >= 0.
    batch_size: rows per device per streamed Jacobian block.
    solve_dtype: dtype of the Grams and solves (e.g. jnp.float64 with x64); default: the
      params' dtype.
    linearize_at: "init" (w0, default) | "trained" (w_D), as in `ntk_forget`.
    step_scale: multiplies Δ (1.0 = the exact update).

  Returns:
    Pytree with the structure, shapes and dtypes of `params`: w_D + step_scale·Δ,
    replicated on every device.
  """
  from fastntk_jax import unlearn  # pylint: disable=g-import-not-at-top
  # The same validation as ntk_forget (a private helper of the sibling module, reused so
  # that both entry points reject bad input with identical messages).
  _, x_r, y_r, x_f, y_f, solve_dtype = unlearn._validate(  # pylint: disable=protected-access
      apply_fn, params_init, params, retain, forget, num_classes, damping, "primal",
      solve_dtype)
  try:
    linearize_at = unlearn.LinearizationPoint(linearize_at)
  except ValueError:
    raise ValueError(f"unknown linearize_at {linearize_at!r}; choose 'init' or 'trained'"
                     ) from None
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
  w_lin = params_init if linearize_at == unlearn.LinearizationPoint.INIT else params
  flat, unravel = ravel_pytree(w_lin)
  sdtype = jnp.dtype(solve_dtype) if solve_dtype is not None else flat.dtype
  stats = sharded_gram_stats_fn(apply_fn, w_lin, num_classes=num_classes, mesh=mesh,
                                batch_size=batch_size, dtype=sdtype)
  g_r, b_r = stats(x_r, y_r)
  g_f, b_f = stats(x_f, y_f)
  rep = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=rep)
  def solve_and_apply(params, g_r, b_r, g_f, b_f, lam):
    delta, _ = unlearn.primal_solve(g_r, b_r, g_f, b_f, lam)
    delta = unravel(delta.astype(flat.dtype))
    return jax.tree_util.tree_map(
        lambda w, d: (w + step_scale * d.astype(w.dtype)).astype(w.dtype), params, delta)

  lam = replicate(jnp.asarray(damping, sdtype), mesh)
  return solve_and_apply(replicate(params, mesh), g_r, b_r, g_f, b_f, lam)
