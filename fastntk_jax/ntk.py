"""Empirical NTK, Jacobians and Gram matrices over the trainable (PEFT) collection only.

Everything here takes `apply_fn(params, x) -> logits [n, C]` where `params` is the
*trainable* pytree only (frozen weights and BatchNorm statistics are closed over by the
caller, BatchNorm in inference mode), so every sample's logits depend on that sample alone.
That per-sample independence is what makes `vmap_axes=0` in neural-tangents and the
per-sample `vmap(jacrev)` below valid.

Conventions (shared with `fastntk_jax.unlearn`):
  * p      = total number of scalars in `params` (ravelled with `ravel_pytree`).
  * Rows of a Jacobian are sample-major: row `i * C + c` is d logit[i, c] / d params.
  * Kernel blocks are (n1, n2, C, C) from neural-tangents; `kernel_to_matrix` reshapes them
    to the (n1*C, n2*C) sample-major matrix that the solvers invert.

All functions are pure and jit-able; row batching uses fixed-size, padded blocks so a
whole data set compiles once, whatever its size.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax.enums import JacobianMethod, KernelImplementation

ApplyFn = Callable[[Any, jnp.ndarray], jnp.ndarray]
PyTree = Any
log = logging.getLogger(__name__)

__all__ = [
    "JacobianMethod",
    "KernelImplementation",
    "empirical_kernel",
    "reference_kernel",
    "kernel_to_matrix",
    "jacobian",
    "gram",
    "apply_rows",
    "jvp_rows",
    "vjp_rows",
    "num_params",
    "jacobian_rows",
    "compile_timer",
    "residuals",
    "gram_stats",
    "rows_params",
    "apply_delta",
]

# Open `compile_timer` records; the eager block loops add their compile seconds to each.
_COMPILE_RECORDS: list[dict] = []
# Set while an eager block loop compiles its step (it times that itself, tracing included).
_TIMING_OWN_COMPILE = [False]
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _count_other_compiles(event: str, seconds: float, **_) -> None:
  """Adds XLA compilations outside the block loops (the eager ops around them: products,
  factorisations, eigensolves, each compiled on first use) to the open records."""
  if event == _BACKEND_COMPILE_EVENT and _COMPILE_RECORDS and not _TIMING_OWN_COMPILE[0]:
    for record in _COMPILE_RECORDS:
      record["seconds"] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_other_compiles)


@contextlib.contextmanager
def compile_timer():
  """Measures XLA compilation of eager work: block loops (`gram`, `apply_rows`, ...) and ops.

  Called eagerly, those loops compile one block step ahead of time and run it per block;
  within this context the seconds spent tracing and compiling it, and the backend compile
  seconds of every other computation compiled meanwhile (eager ops on first use), are added
  to the yielded dict's "seconds", so callers can report the run and its compilation apart.

  Yields:
    {"seconds": float}, updated in place.
  """
  record = {"seconds": 0.0}
  _COMPILE_RECORDS.append(record)
  try:
    yield record
  finally:
    _COMPILE_RECORDS.remove(record)


@functools.lru_cache(maxsize=None)
def neural_tangents_available() -> bool:
  """Whether neural-tangents imports on this JAX (it needs jax 0.5.x)."""
  try:
    import neural_tangents  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except Exception as e:  # ImportError, or AttributeError from removed JAX internals
    log.warning("neural-tangents is unavailable (%r); kernels use the built-in JAX "
                "implementation", e)
    return False


def resolve_implementation(implementation) -> "KernelImplementation":
  """Maps AUTO to a concrete implementation; validates strings."""
  try:
    implementation = KernelImplementation(implementation)
  except ValueError:
    raise ValueError(f"unknown kernel implementation {implementation!r}; choose one of "
                     f"{[k.value for k in KernelImplementation]}") from None
  if implementation == KernelImplementation.AUTO:
    return (KernelImplementation.NEURAL_TANGENTS if neural_tangents_available()
            else KernelImplementation.JAX)
  return implementation


def num_params(params: PyTree) -> int:
  """Number of scalars in a pytree (the `p` of the design notes)."""
  return int(sum(math.prod(jnp.shape(l)) for l in jax.tree_util.tree_leaves(params)))


def _pad_to_blocks(x: jnp.ndarray, block_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Pads axis 0 of `x` to a multiple of `block_size` and splits it into blocks.

  Padding repeats the first row (a valid input, so no NaNs/inf appear in padded rows) and
  a 0/1 mask marks real rows; callers zero the padded rows' contributions with it.

  Returns:
    blocks: [num_blocks, block_size, *x.shape[1:]].
    mask:   [num_blocks, block_size] float mask of real rows.
  """
  n = x.shape[0]
  num_blocks = max(1, -(-n // block_size))
  pad = num_blocks * block_size - n
  if pad:
    x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
  mask = (jnp.arange(num_blocks * block_size) < n).astype(jnp.float32)
  return (x.reshape((num_blocks, block_size) + x.shape[1:]),
          mask.reshape(num_blocks, block_size))


# XLA:CPU runs a while-loop body (lax.scan/lax.map) several times slower than the same
# computation outside a loop (measured: a ResNet-8 Jacobian block 1.07 s in a 1-step scan vs
# 0.17 s plain, benchmarks/results/probe_scan_jacobian.md). Loops over up to this many
# blocks are therefore unrolled (compile time grows with it); longer ones stay loops.
MAX_UNROLLED_BLOCKS = 16


def _traced(*trees) -> bool:
  return any(isinstance(l, jax.core.Tracer) for t in trees for l in jax.tree_util.tree_leaves(t))


def _compile_timed(fn, *args):
  """`jax.jit(fn)` compiled for `args` ahead of time, its tracing and compile seconds added to
  the open `compile_timer` records."""
  start = time.perf_counter()
  _TIMING_OWN_COMPILE[0] = True
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  finally:
    _TIMING_OWN_COMPILE[0] = False
  for record in _COMPILE_RECORDS:
    record["seconds"] += time.perf_counter() - start
  return compiled


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer: jnp.ndarray, rows: jnp.ndarray, start) -> jnp.ndarray:
  """`buffer` with `rows` written from row `start`; the buffer is donated (filled in place)."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def _eager_blocks(step, init, xs, on_output) -> Any:
  """Runs `step` block by block on the host, compiled once for a block; calls
  `on_output(i, y)` with each block's output and returns the final carry."""
  jstep = _compile_timed(step, init, jax.tree_util.tree_map(lambda a: a[0], xs))
  carry = init
  for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
    block = jax.tree_util.tree_map(lambda a: a[i], xs)
    try:
      carry, y = jstep(carry, block)
    except TypeError:  # the carry's types changed after a step (e.g. weak types): retrace
      jstep = jax.jit(step)
      carry, y = jstep(carry, block)
    on_output(i, y)
  return carry


def _scan(step, init, xs):
  """`lax.scan` over the leading (block) axis, fully unrolled for few blocks."""
  leaves = jax.tree_util.tree_leaves(xs)
  num_blocks = leaves[0].shape[0]
  if num_blocks > 1 and not any(
      isinstance(l, jax.core.Tracer) for l in leaves + jax.tree_util.tree_leaves(init)):
    # Called eagerly: a host loop over one compiled block step has neither the loop-body
    # slowdown nor an unrolled program's compile time (which for a ResNet-110 Jacobian
    # block is minutes per copy).
    ys = []
    carry = _eager_blocks(step, init, xs, lambda i, y: ys.append(y))
    return carry, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)
  if num_blocks == 1:  # no loop at all (a length-1 scan measured 5x slower on XLA:CPU)
    carry, y = step(init, jax.tree_util.tree_map(lambda a: a[0], xs))
    return carry, jax.tree_util.tree_map(lambda a: a[None], y)
  unroll = True if num_blocks <= MAX_UNROLLED_BLOCKS else 1
  return jax.lax.scan(step, init, xs, unroll=unroll)


def _map(fn, xs):
  """`lax.map` with the same unrolling rule as `_scan`."""
  return _scan(lambda carry, x: (carry, fn(x)), None, xs)[1]


def _scan_rows(step, init, xs, n: int):
  """`_scan` over blocks of samples whose outputs are rows: (carry, outputs concatenated over
  the blocks and cut to the first n samples' rows).

  Each output leaf's leading axis holds k rows per sample of its block (k = its length over
  the block size; e.g. C when a block's Jacobian is flattened). Called eagerly over several
  blocks, each block's real rows are written into one preallocated output, donated and so
  filled in place: the rows are held once (a list of blocks, stacked, reshaped and sliced,
  held them up to three times at the peak).
  """
  leaves = jax.tree_util.tree_leaves(xs)
  num_blocks, block = leaves[0].shape[:2]
  per_sample = lambda a: a.shape[0] // block
  if num_blocks > 1 and not _traced(xs, init):
    out = [None]

    def write(i, y):
      real = min(block, n - i * block)  # the last block is padded
      if out[0] is None:
        out[0] = jax.tree_util.tree_map(
            lambda a: jnp.zeros((n * per_sample(a),) + a.shape[1:], a.dtype), y)
      out[0] = jax.tree_util.tree_map(
          lambda o, a: _write_rows(o, a if real == block else a[:real * per_sample(a)],
                                   i * block * per_sample(a)), out[0], y)

    carry = _eager_blocks(step, init, xs, write)
    return carry, out[0]
  carry, ys = _scan(step, init, xs)
  return carry, jax.tree_util.tree_map(
      lambda a: a.reshape((-1,) + a.shape[2:])[:n * (a.shape[1] // block)], ys)


def _map_rows(fn, xs, n: int):
  """`_map` over blocks of samples, as `_scan_rows` (rows concatenated, cut to n samples)."""
  return _scan_rows(lambda carry, x: (carry, fn(x)), None, xs, n)[1]


def _block_size(n: int, batch_size: Optional[int]) -> int:
  return n if not batch_size or batch_size >= n else int(batch_size)


def import_neural_tangents():
  """The neural_tangents module, or an ImportError (one line) naming the fix.

  Raised for an explicit neural-tangents `kernel_impl` on a stack without it (the lean
  stack), or where it fails to import on the installed JAX (it needs JAX 0.5.x).
  """
  try:
    import neural_tangents as nt  # pylint: disable=g-import-not-at-top
  except Exception as e:  # ImportError, or AttributeError on an unsupported JAX
    raise ImportError(
        f"neural-tangents could not be imported ({type(e).__name__}: {e}); it needs the nt "
        "stack (jax/jaxlib 0.5.3, tf2jax 0.3.6): pip install -e '.[nt,tfds]' -c "
        "constraints/nt.txt in its own venv (BUILD.md), or use the built-in kernel: "
        "kernel_impl='auto' or 'jax' (--config.unlearn.kernel_impl=auto)") from e
  return nt


def _nt_kernel_fn(apply_fn: ApplyFn, implementation: KernelImplementation):
  """The neural-tangents kernel function `(x1, x2, params) -> [n1, n2, C, C]`."""
  nt = import_neural_tangents()
  nt_impl = {
      KernelImplementation.NEURAL_TANGENTS: nt.NtkImplementation.JACOBIAN_CONTRACTION,
      KernelImplementation.NEURAL_TANGENTS_NTK_VECTOR_PRODUCTS:
          nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
  }[implementation]
  # trace_axes=() keeps the full C x C block per sample pair (the update needs the
  # cross-class entries); vmap_axes=0 is valid because BN runs in inference mode.
  return nt.empirical_ntk_fn(
      apply_fn, trace_axes=(), vmap_axes=0, implementation=nt_impl)


def reference_kernel(apply_fn: ApplyFn, params: PyTree, x1: jnp.ndarray,
                     x2: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Independent reference NTK: per-sample `jacrev` and an explicit einsum.

  Deliberately the simplest correct computation (no batching, whole Jacobians in memory);
  the tests compare neural-tangents and every solver against it.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    params: trainable pytree (the linearisation point).
    x1: inputs [n1, ...].
    x2: inputs [n2, ...]; defaults to `x1`.

  Returns:
    Kernel [n1, n2, C, C] with entry [i, j, a, b] = <d f_a(x1_i), d f_b(x2_j)>.
  """
  method = JacobianMethod.BATCHED_COTANGENTS  # the plain vmap(jacrev), whatever AUTO picks
  j1 = _per_sample_jacobian(apply_fn, params, x1, method)
  j2 = j1 if x2 is None else _per_sample_jacobian(apply_fn, params, x2, method)
  return jnp.einsum("iap,jbp->ijab", j1, j2)


# PULLBACKS compiles one backward pass per group of logits; beyond this many logits, the
# logits are split into this many groups, each group's cotangents batched together.
MAX_UNROLLED_PULLBACKS = 16


def _platform() -> str:
  """The platform computations land on: `jax_default_device` if set, else the default backend."""
  device = jax.config.jax_default_device
  if isinstance(device, str):
    return device
  return getattr(device, "platform", None) or jax.default_backend()


# AUTO takes PULLBACKS on CPU up to this many logits per sample: its C unrolled backward
# passes compile far longer as C grows (benchmarks/RESULTS.md §15).
PULLBACKS_MAX_OUTPUTS = 10


def _as_jacobian_method(method: JacobianMethod | str) -> JacobianMethod:
  try:
    return JacobianMethod(method)
  except ValueError:
    raise ValueError(f"jacobian method {method!r}: expected one of "
                     f"{[m.value for m in JacobianMethod]}") from None


def resolve_jacobian_method(method: JacobianMethod | str,
                            num_outputs: Optional[int] = None) -> JacobianMethod:
  """AUTO -> PULLBACKS on CPU for at most `PULLBACKS_MAX_OUTPUTS` logits per sample (None:
  not known), else BATCHED_COTANGENTS.

  On XLA:CPU, ResNet-110's batched-cotangent Jacobian ran 2.5x slower than C backward passes
  of the block (its floor), PULLBACKS at 0.96x of it; a prompted ViT-S ran both at the floor
  (benchmarks/RESULTS.md, the cold path against its floor), and with many logits PULLBACKS
  compiles several times longer. Other platforms keep the batched form (not measured there).
  """
  method = _as_jacobian_method(method)
  if method != JacobianMethod.AUTO:
    return method
  few = num_outputs is None or num_outputs <= PULLBACKS_MAX_OUTPUTS
  return (JacobianMethod.PULLBACKS if _platform() == "cpu" and few
          else JacobianMethod.BATCHED_COTANGENTS)


def _per_sample_jacobian(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray,
                         method: JacobianMethod | str = JacobianMethod.AUTO) -> jnp.ndarray:
  """[n, C, p] Jacobian of each sample's logits w.r.t. the ravelled params."""
  method = _as_jacobian_method(method)
  if method == JacobianMethod.AUTO:
    out = jax.eval_shape(lambda w: apply_fn(w, x[:1]), params)
    method = resolve_jacobian_method(method, math.prod(out.shape[1:]))
  flat, unravel = ravel_pytree(params)

  if method == JacobianMethod.BATCHED_COTANGENTS:
    logits_one = lambda w, xi: apply_fn(unravel(w), xi[None])[0]
    return jax.vmap(jax.jacrev(logits_one), in_axes=(None, 0))(flat, x)
  # One copy of the params per sample: the pullback of a [n, C] cotangent is then each
  # sample's own gradient, at the cost of one batched backward pass. The copies stay a
  # pytree (ravelling inside the vmap cost a concatenation of every leaf per pullback: 1.6x).
  n = x.shape[0]
  per_sample = jax.tree_util.tree_map(lambda l: jnp.broadcast_to(l, (n,) + jnp.shape(l)),
                                      params)
  out_shape = []  # one sample's logits shape, e.g. (C,); flattened for the cotangents

  def flat_logits(ws):
    out = jax.vmap(lambda w, xi: apply_fn(w, xi[None])[0])(ws, x)
    out_shape[:] = out.shape[1:]
    return out.reshape(n, -1)

  logits, pullback = jax.vjp(flat_logits, per_sample)
  c = logits.shape[-1]
  eye = jnp.eye(c, dtype=logits.dtype)
  parts = []  # per group: the gradient pytree, leaves [len(group), n, ...]
  for group in np.array_split(np.arange(c), max(1, min(c, int(MAX_UNROLLED_PULLBACKS)))):
    if not len(group):
      continue
    cotangents = jnp.broadcast_to(eye[group][:, None, :], (len(group), n, c))
    if len(group) == 1:
      parts.append(jax.tree_util.tree_map(lambda g: g[None], pullback(cotangents[0])[0]))
    else:
      parts.append(jax.vmap(lambda ct: pullback(ct)[0])(cotangents))
  # Ravel in `ravel_pytree`'s leaf order (and dtype): [C, n, ...] leaves -> [n, C, p].
  leaves = [jnp.concatenate(group_leaves, axis=0) for group_leaves in
            zip(*(jax.tree_util.tree_leaves(part) for part in parts))]
  if leaves:
    jac = jnp.concatenate([l.reshape(c, n, math.prod(l.shape[2:])).astype(flat.dtype)
                           for l in leaves], axis=-1).transpose(1, 0, 2)
  else:
    jac = jnp.zeros((n, c, 0), flat.dtype)
  return jac.reshape((n,) + tuple(out_shape) + (flat.shape[0],))  # as vmap(jacrev) shapes it


def empirical_kernel(apply_fn: ApplyFn, params: PyTree, x1: jnp.ndarray,
                     x2: Optional[jnp.ndarray] = None, *, batch_size: Optional[int] = 256,
                     implementation: KernelImplementation | str =
                     KernelImplementation.AUTO,
                     jacobian_method: JacobianMethod | str = JacobianMethod.AUTO
                     ) -> jnp.ndarray:
  """Empirical NTK over `params` only, in row/column blocks of `batch_size`.

  Memory beyond the output is bounded by two blocks' Jacobians (2 * batch_size * C * p).

  Args:
    apply_fn: `(params, x) -> logits [n, C]`, params = the trainable pytree.
    params: trainable pytree at which the kernel is taken.
    x1: inputs [n1, ...].
    x2: inputs [n2, ...]; defaults to `x1`.
    batch_size: rows per block (None: one block).
    implementation: a `KernelImplementation` (or its string value); default AUTO
      (neural-tangents when it imports).
    jacobian_method: the built-in (JAX) kernel's `JacobianMethod`.

  Returns:
    Kernel [n1, n2, C, C], dtype of the logits.
  """
  implementation = resolve_implementation(implementation)
  x2_ = x1 if x2 is None else x2
  jacobian_method = _as_jacobian_method(jacobian_method)
  if implementation == KernelImplementation.JAX:
    def block_fn(a, b):
      ja = _per_sample_jacobian(apply_fn, params, a, jacobian_method)
      jb = ja if b is a else _per_sample_jacobian(apply_fn, params, b, jacobian_method)
      return jnp.einsum("iap,jbp->ijab", ja, jb)
  else:
    nt_fn = _nt_kernel_fn(apply_fn, implementation)
    block_fn = lambda a, b: nt_fn(a, b, params)

  n1, n2 = x1.shape[0], x2_.shape[0]
  b1, b2 = _block_size(n1, batch_size), _block_size(n2, batch_size)
  if b1 == n1 and b2 == n2:
    return block_fn(x1, x2_)
  blocks1, _ = _pad_to_blocks(x1, b1)
  blocks2, _ = _pad_to_blocks(x2_, b2)
  rows = _map(lambda a: _map(lambda b: block_fn(a, b), blocks2), blocks1)
  # rows: [nb1, nb2, b1, b2, C, C] -> [nb1*b1, nb2*b2, C, C], then drop the padding.
  nb1, nb2, _, _, c, _ = rows.shape
  k = rows.transpose(0, 2, 1, 3, 4, 5).reshape(nb1 * b1, nb2 * b2, c, c)
  return k[:n1, :n2]


def kernel_to_matrix(kernel: jnp.ndarray) -> jnp.ndarray:
  """[n1, n2, C, C] kernel -> [n1*C, n2*C] sample-major matrix."""
  n1, n2, c1, c2 = kernel.shape
  return kernel.transpose(0, 2, 1, 3).reshape(n1 * c1, n2 * c2)


def jacobian(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray, *,
             method: JacobianMethod | str = JacobianMethod.AUTO) -> jnp.ndarray:
  """Full Jacobian of the logits w.r.t. the ravelled params, sample-major.

  Holds n*C*p numbers: meant for small problems and tests; the solvers stream instead.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    params: trainable pytree.
    x: inputs [n, ...].
    method: a `JacobianMethod` (how the reverse passes are batched; same result).

  Returns:
    J [n*C, p].
  """
  j = _per_sample_jacobian(apply_fn, params, x, method)
  return j.reshape(math.prod(j.shape[:-1]), j.shape[-1])  # not -1: p may be 0


def jacobian_rows(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray,
                  *, batch_size: Optional[int] = 256,
                  method: JacobianMethod | str = JacobianMethod.AUTO,
                  flatten: bool = False) -> jnp.ndarray:
  """Per-sample Jacobians computed in fixed-size blocks (bounded activation memory).

  Called eagerly over several blocks, each block is written into one preallocated output
  (donated, so filled in place): the rows are held once, plus one block.

  Args:
    apply_fn, params, x: as for `jacobian`.
    batch_size: samples per block (None: one block).
    method: a `JacobianMethod`.
    flatten: return [n*C, p] (as `jacobian`) instead of [n, C, p]; eagerly, a reshape of
      the result would be a copy.

  Returns:
    J [n, C, p] (or [n*C, p] with `flatten`), sample-major like `jacobian`.
  """
  n = x.shape[0]
  method = _as_jacobian_method(method)

  def block_rows(xb):
    j = _per_sample_jacobian(apply_fn, params, xb, method)
    return j.reshape((j.shape[0] * j.shape[1], j.shape[2])) if flatten else j

  blocks, _ = _pad_to_blocks(x, _block_size(n, batch_size))
  return _map_rows(block_rows, blocks, n)


def gram_from_rows(jacobian: jnp.ndarray, residuals: jnp.ndarray):
  """(G = JᵀJ [p, p], b = Jᵀr [p]) of Jacobian rows J [n, C, p] and residuals r [n, C]."""
  j2 = jacobian.reshape(-1, jacobian.shape[-1])
  return j2.T @ j2, jnp.einsum("icp,ic->p", jacobian, residuals)


def gram(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray, residuals: jnp.ndarray,
         *, batch_size: Optional[int] = 256, dtype: Optional[jnp.dtype] = None,
         row_weights: Optional[jnp.ndarray] = None, keep_jacobian: bool = False,
         method: JacobianMethod | str = JacobianMethod.AUTO):
  """Streams G = JᵀJ [p, p] and b = Jᵀ r [p] over row blocks, never holding all of J.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`.
    params: trainable pytree (the linearisation point).
    x: inputs [n, ...].
    residuals: [n, C] (e.g. targets minus logits), contracted with J to give b.
    batch_size: samples per block; the last block is padded and masked.
    dtype: accumulation dtype (e.g. float64 for a float64 solve); default: logits dtype.
    row_weights: optional [n] 0/1 weights (e.g. to mask padding rows of a fixed-size chunk).
    keep_jacobian: also return the (weighted) Jacobian rows [n, C, p] in `dtype`.
    method: a `JacobianMethod` (how each block's Jacobian is taken).

  Returns:
    (G [p, p], b [p]), or (G, b, J [n, C, p]) with keep_jacobian.
  """
  n = x.shape[0]
  method = _as_jacobian_method(method)
  blocks, mask = _pad_to_blocks(x, _block_size(n, batch_size))
  if row_weights is not None:
    w_blocks, _ = _pad_to_blocks(row_weights.astype(mask.dtype), _block_size(n, batch_size))
    mask = mask * w_blocks
  r_blocks, _ = _pad_to_blocks(residuals, _block_size(n, batch_size))
  p = num_params(params)
  acc_dtype = dtype or jnp.result_type(*jax.tree_util.tree_leaves(params))

  def step(carry, inputs):
    g, b = carry
    xb, rb, mb = inputs
    jb = _per_sample_jacobian(apply_fn, params, xb, method).astype(acc_dtype)  # [bs, C, p]
    jb = jb * mb[:, None, None].astype(acc_dtype)
    gb, bb = gram_from_rows(jb, rb.astype(acc_dtype))
    return (g + gb, b + bb), (jb if keep_jacobian else None)

  init = (jnp.zeros((p, p), acc_dtype), jnp.zeros((p,), acc_dtype))
  (g, b), jac = _scan_rows(step, init, (blocks, r_blocks, mask), n)
  return (g, b, jac) if keep_jacobian else (g, b)


def apply_rows(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray,
               *, batch_size: Optional[int] = 256) -> jnp.ndarray:
  """`apply_fn(params, x)` evaluated in fixed-size blocks (bounded memory, one compile).

  Returns:
    logits [n, C].
  """
  n = x.shape[0]
  blocks, _ = _pad_to_blocks(x, _block_size(n, batch_size))
  return _map_rows(lambda xb: apply_fn(params, xb), blocks, n)


def jvp_rows(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray, tangent: PyTree,
             *, batch_size: Optional[int] = 256) -> jnp.ndarray:
  """J v: the change of the logits along a parameter-space direction.

  Args:
    tangent: pytree like `params`.

  Returns:
    [n, C] = (J tangent) reshaped sample-major.
  """
  n = x.shape[0]
  blocks, _ = _pad_to_blocks(x, _block_size(n, batch_size))

  # jvp needs the tangent in the primal's dtypes (a float64 solve may hand float64 here).
  tangent = jax.tree_util.tree_map(lambda t, w: t.astype(w.dtype), tangent, params)

  def one(xb):
    return jax.jvp(lambda w: apply_fn(w, xb), (params,), (tangent,))[1]

  return _map_rows(one, blocks, n)


def vjp_rows(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray, cotangent: jnp.ndarray,
             *, batch_size: Optional[int] = 256) -> PyTree:
  """Jᵀ u: pulls an output-space vector back to parameter space.

  Args:
    cotangent: [n, C].

  Returns:
    Pytree like `params` = Jᵀ cotangent.
  """
  n = x.shape[0]
  bs = _block_size(n, batch_size)
  blocks, mask = _pad_to_blocks(x, bs)
  u_blocks, _ = _pad_to_blocks(cotangent, bs)

  def step(acc, inputs):
    xb, ub, mb = inputs
    out, pull = jax.vjp(lambda w: apply_fn(w, xb), params)
    (g,) = pull((ub * mb[:, None]).astype(out.dtype))
    return jax.tree_util.tree_map(jnp.add, acc, g), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  out, _ = _scan(step, zeros, (blocks, u_blocks, mask))
  return out


# --------------------------------------------------------------------------------------
# The primal solver's statistics and flat parameter vectors.
# --------------------------------------------------------------------------------------


def residuals(apply_fn: ApplyFn, w_lin: PyTree, x, y, *, num_classes: int,
              batch_size: Optional[int], dtype) -> jnp.ndarray:
  """E = one_hot(y) - f(w_lin, x), [n, C] in `dtype`."""
  logits = apply_rows(apply_fn, w_lin, x, batch_size=batch_size).astype(dtype)
  return jax.nn.one_hot(y, num_classes, dtype=dtype) - logits


def gram_stats(apply_fn: ApplyFn, w_lin: PyTree, x, y, *, num_classes: int,
               batch_size: Optional[int], dtype, row_weights=None,
               keep_jacobian: bool = False):
  """The primal solver's sufficient statistics of labelled rows (x, y) at `w_lin`.

  Sums over rows, so the statistics of a set are the sums over any split of it into chunks
  (the resumable pipeline) or devices (`sharding.data_parallel`).

  Args:
    apply_fn, w_lin: the network and its linearisation point (trainable pytree).
    x: inputs [n, ...]; y: int labels [n].
    num_classes: C. batch_size: rows per Jacobian block. dtype: accumulation dtype.
    row_weights: optional [n] 0/1 weights (the padding of a fixed-shape chunk).
    keep_jacobian: also return the Jacobian rows [n, C, p] (the stream's cache).

  Returns:
    (G = JᵀJ [p, p], b = JᵀE [p]) or, with keep_jacobian, (G, b, J [n, C, p]).
  """
  # The network runs in its own dtype: each Jacobian row is exact to that dtype's rounding
  # and is accumulated in `dtype` (widening the params would make a float32 network run in
  # float64, several times slower on CPUs, for no digit the Grams need).
  # Full matmul precision (no TF32 passes on accelerators), as every solve (`linalg`).
  apply_s = lambda w, xx: apply_fn(w, xx).astype(dtype)
  with jax.default_matmul_precision("highest"):
    e = residuals(apply_s, w_lin, x, y, num_classes=num_classes, batch_size=batch_size,
                  dtype=dtype)
    return gram(apply_s, w_lin, x, e, batch_size=batch_size, dtype=dtype,
                row_weights=row_weights, keep_jacobian=keep_jacobian)


def rows_params(w: PyTree) -> PyTree:
  """The params the kept rows are taken at: floating leaves narrower than float32 (bfloat16,
  float16) widened to it, since rows in those dtypes lose digits that the blocked kernel
  (params widened to the solve dtype) keeps; other leaves as they are, to keep the rows'
  memory and the network's speed."""
  def widen(leaf):
    dt = jnp.dtype(getattr(leaf, "dtype", jnp.float32))
    if jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4:
      return jnp.asarray(leaf, jnp.float32)
    return leaf
  return jax.tree_util.tree_map(widen, w)


def apply_delta(params: PyTree, delta: jnp.ndarray, step_scale=1.0) -> PyTree:
  """params + step_scale·Δ, Δ flat in the ravel order of `params`; each leaf keeps its dtype
  and is rounded once."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  size = sum(int(np.prod(jnp.shape(l))) for l in leaves)
  if jnp.shape(delta) != (size,):
    raise ValueError(f"the update has shape {jnp.shape(delta)} but the params hold {size} "
                     "scalars: the statistics or the plan belong to other params")
  out, start = [], 0
  for leaf in leaves:
    size = int(np.prod(jnp.shape(leaf)))
    d = step_scale * delta[start:start + size].reshape(jnp.shape(leaf))
    start += size
    out.append((leaf.astype(jnp.result_type(leaf.dtype, d.dtype)) + d).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
