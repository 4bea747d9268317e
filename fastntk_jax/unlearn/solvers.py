"""The Fast-NTK update (the paper's Eq. (1), sign as derived in docs/derivation.md), its three
solvers, and how it is applied. Every caller (eager, jitted, chunked and resumable, sharded,
the request stream) goes through these functions; nothing here validates (see `validate`).

With the model linearised at `w_lin` (w0 by default), `J_a = d f(w_lin, X_a)/d w` (rows
sample-major), `Θ_ab = J_a J_bᵀ`, residuals `E_a = one_hot(Y_a) - f(w_lin, X_a)`, damping λ:

    Δ = w_r - w_D = P J_fᵀ M V,
    P = I - J_rᵀ(Θ_rr+λI)⁻¹J_r,   M = (Θ_ff+λI - Θ_fr(Θ_rr+λI)⁻¹Θ_rf)⁻¹,
    V = (f(w_lin, X_f) - Y_f) + Θ_fr(Θ_rr+λI)⁻¹E_r.

  * dual:   Eq. (1) literally (kernel blocks, Cholesky, Schur complement). Memory ~ (n·C)²,
            plus n·C·p when it keeps the Jacobian rows of D (each sample's Jacobian once).
  * primal: Δ = (G_r+λI)⁻¹b_r - (G_r+G_f+λI)⁻¹(b_r+b_f), G_a = J_aᵀJ_a, b_a = J_aᵀE_a
            (push-through identity), the Grams streamed. Memory ~ p².
  * cg:     the same two ridge solves by conjugate gradients with jvp/vjp matvecs, in the
            smaller of parameter and output space. Memory ~ p + n·C.

Each returns `(Δ as a flat [p] vector in the solve dtype, SolveInfo)`. Kernels, Grams and
solves run at full matmul precision (`full_precision`): TF32 on GPUs made dual and primal
differ by 67-85% on an H200 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import ntk
from fastntk_jax.enums import KernelImplementation, Solver

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]


class SolveInfo(NamedTuple):
  """Scalars describing one solve (jnp arrays; a pytree, so it passes through `jax.jit`).

  condition_number: 2-norm κ of the matrix inverted (dual: Θ_rr+λI, primal: G+λI); inf when
    round-off made it indefinite; NaN when not computed (cg, or `with_condition=False`).
  condition_estimate: a lower bound on κ of every matrix factorised, (max L_ii / min L_ii)²
    of its Cholesky factor L (O(p), always computed; NaN for cg).
  relative_residual: cg: max over its two solves of the true ‖A x - b‖/‖b‖ recomputed at the
    end (it also carries the round-off of evaluating A); 0 for the direct solvers.
  converged: cg stopped on its tolerance, not on its iteration cap, and its true residual is
    at most sqrt(tol) (at least half the digits asked for: the rest may be the round-off of
    evaluating the network twice); True for the direct solvers.
  finite: every entry of Δ is finite (False: a singular system, or overflow).
  """
  condition_number: jnp.ndarray
  condition_estimate: jnp.ndarray
  relative_residual: jnp.ndarray
  converged: jnp.ndarray
  finite: jnp.ndarray


def default_cg_tol(dtype) -> float:
  """cg's relative tolerance in a solve dtype: 1e-12 in float64, 1e-5 otherwise."""
  return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def full_precision(fn):
  """Runs `fn` with float32 matmuls at full precision (no TF32/bf16 passes on accelerators)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped


def in_dtype(apply_fn: ApplyFn, w_lin: PyTree, dtype) -> tuple[ApplyFn, PyTree]:
  """The network seen by a solve in `dtype`: params widened to it and logits cast to it, so
  tangents, cotangents and kernels carry the solve dtype (the network's own arithmetic is
  what it is; `plan` warns when its logits are narrower)."""
  dtype = jnp.dtype(dtype)
  widen = lambda l: l.astype(dtype) if (jnp.issubdtype(l.dtype, jnp.floating)
                                        and l.dtype.itemsize < dtype.itemsize) else l
  return (lambda w, x: apply_fn(w, x).astype(dtype)), jax.tree_util.tree_map(widen, w_lin)


def residuals(apply_fn: ApplyFn, w_lin: PyTree, x, y, *, num_classes: int,
              batch_size: Optional[int], dtype) -> jnp.ndarray:
  """E = one_hot(y) - f(w_lin, x), [n, C] in `dtype`."""
  logits = ntk.apply_rows(apply_fn, w_lin, x, batch_size=batch_size).astype(dtype)
  return jax.nn.one_hot(y, num_classes, dtype=dtype) - logits


@full_precision
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
  apply_s = lambda w, xx: apply_fn(w, xx).astype(dtype)
  e = residuals(apply_s, w_lin, x, y, num_classes=num_classes, batch_size=batch_size,
                dtype=dtype)
  return ntk.gram(apply_s, w_lin, x, e, batch_size=batch_size, dtype=dtype,
                  row_weights=row_weights, keep_jacobian=keep_jacobian)


# Order above which CPUs factorise by blocks of this order (`cholesky`): the multithreaded
# LAPACK potrf that jaxlib calls on CPUs (scipy's OpenBLAS 0.3.30) segfaults from about
# n = 19,000 on two threads (OpenBLAS issues #1413, #2562; benchmarks/RESULTS.md §16). Read
# when a caller is traced: a changed value reaches functions compiled before only after
# `jax.clear_caches()`.
CPU_CHOLESKY_BLOCK = 4096
# The block loops are unrolled ((n/block)²/2 updates): compile time and memory grow with the
# square of the count (200 blocks of 1 exhausted 3 GB compiling).
MAX_CHOLESKY_BLOCKS = 64


# Jitted: eagerly each block update is a new [n, n] array (three at once at the peak, and an
# order-20,000 test was OOM-killed). Compiled, the temporaries are one [n, n] (the working
# copy, written in place) and the panels, as LAPACK's whole factorisation: checked by
# tests/test_unlearn_api.py on the compiled memory analysis.
@functools.partial(jax.jit, static_argnums=1)
def _blocked_cholesky(a: jnp.ndarray, block: int) -> jnp.ndarray:
  """Right-looking block Cholesky (lower) of the Hermitian `a` [n, n]: LAPACK factorises only
  [block, block] diagonal blocks; panels are triangular solves, the trailing updates matmuls
  of the lower block columns. All NaN when `a` is not positive definite, as LAPACK's."""
  n = a.shape[0]
  hi = jax.lax.Precision.HIGHEST
  for k0 in range(0, n, block):
    k1 = min(k0 + block, n)
    diag = jax.lax.linalg.cholesky(a[k0:k1, k0:k1], symmetrize_input=False)
    a = a.at[k0:k1, k0:k1].set(diag)
    if k1 == n:
      break
    panel = jax.lax.linalg.triangular_solve(diag, a[k1:, k0:k1], left_side=False, lower=True,
                                            transpose_a=True, conjugate_a=True)  # A₂₁ L₁₁⁻ᴴ
    a = a.at[k1:, k0:k1].set(panel)
    for j0 in range(k1, n, block):                              # A₂₂ -= L₂₁ L₂₁ᴴ (lower part)
      j1 = min(j0 + block, n)
      a = a.at[j0:, j0:j1].add(-jnp.matmul(panel[j0 - k1:], panel[j0 - k1:j1 - k1].conj().T,
                                           precision=hi))
  # A failed block's NaN reach every later block; all NaN as LAPACK's. In one fusion with the
  # tril, XLA writes the output from the working copy (a separate tril was one more [n, n]).
  ok = jnp.all(jnp.isfinite(jnp.diagonal(a)))
  return jnp.tril(jnp.where(ok, a, jnp.nan))


def cholesky(a: jnp.ndarray, *, block: Optional[int] = None) -> jnp.ndarray:
  """Lower Cholesky factor of the Hermitian positive definite `a` (its lower triangle is
  read); NaN when the factorisation failed. The one factorisation of the package.

  Args:
    a: [..., n, n] matrices.
    block: on CPUs, factorise by blocks of this order when n exceeds it (default
      `CPU_CHOLESKY_BLOCK`, raised to n / `MAX_CHOLESKY_BLOCKS` for larger n; a given block
      must leave at most that many blocks); other platforms call their LAPACK whole.

  Returns:
    L [..., n, n] lower triangular with L Lᴴ = a.

  Raises:
    ValueError: `a` is not a stack of square matrices, or `block` is not a positive int or
      leaves more than `MAX_CHOLESKY_BLOCKS` blocks.
  """
  a = jnp.asarray(a)
  if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"cholesky needs square matrices [..., n, n], got shape {a.shape}")
  n = a.shape[-1]
  if block is None:
    block = max(CPU_CHOLESKY_BLOCK, -(-n // MAX_CHOLESKY_BLOCKS))
  elif isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block={block!r}: must be a positive int")
  elif -(-n // block) > MAX_CHOLESKY_BLOCKS:
    raise ValueError(f"block={block} splits order {n} into {-(-n // block)} blocks, more than "
                     f"MAX_CHOLESKY_BLOCKS={MAX_CHOLESKY_BLOCKS} (the loops are unrolled); "
                     f"use block >= {-(-n // MAX_CHOLESKY_BLOCKS)}")
  whole = lambda m: jax.lax.linalg.cholesky(m, symmetrize_input=False)
  if n <= block:
    return whole(a)
  blocked = lambda m: _blocked_cholesky(m, int(block))
  if a.ndim > 2:
    blocked = jax.vmap(blocked)
    flat = a.reshape((-1, n, n))
    return jax.lax.platform_dependent(flat, cpu=blocked, default=whole).reshape(a.shape)
  return jax.lax.platform_dependent(a, cpu=blocked, default=whole)


def cholesky_solver(a: jnp.ndarray) -> tuple[Callable[[jnp.ndarray], jnp.ndarray], jnp.ndarray]:
  """Factorises the symmetric positive definite `a` once (`cholesky`).

  Returns:
    (`b -> a⁻¹ b`, a lower bound on κ(a): (max L_ii / min L_ii)² of the factor; NaN when the
     factorisation failed).
  """
  factor = (cholesky(a), True)
  return (lambda b: jax.scipy.linalg.cho_solve(factor, b)), diagonal_condition(factor[0])


def diagonal_condition(chol: jnp.ndarray) -> jnp.ndarray:
  """(max L_ii / min L_ii)² of a Cholesky factor: a lower bound on κ(L Lᵀ), in O(p)."""
  d = jnp.abs(jnp.diagonal(chol))
  return jnp.square(jnp.max(d) / jnp.min(d))


def condition_number(a: jnp.ndarray) -> jnp.ndarray:
  """2-norm κ of a symmetric matrix meant to be positive definite; inf when round-off made its
  smallest eigenvalue non-positive (numerically singular)."""
  eig = jnp.linalg.eigvalsh(a)
  return jnp.where(eig[0] > 0, eig[-1] / eig[0], jnp.inf)


def _direct_info(delta, a, with_condition, estimates):
  cond = condition_number(a) if with_condition else jnp.asarray(jnp.nan, a.dtype)
  return SolveInfo(cond, jnp.max(jnp.stack(estimates)), jnp.zeros((), a.dtype),
                   jnp.asarray(True), jnp.all(jnp.isfinite(delta)))


@functools.partial(jax.jit, static_argnames="with_condition")
@full_precision
def primal_solve(g_r, b_r, g_f, b_f, damping, *, with_condition: bool = False):
  """Δ from the Gram statistics of D_r and D_f (`gram_stats`).

  Returns:
    (Δ = (G_r+λI)⁻¹b_r - (G_r+G_f+λI)⁻¹(b_r+b_f) as a flat [p] vector, SolveInfo; κ is that
     of G_r+G_f+λI).
  """
  eye = damping * jnp.eye(g_r.shape[0], dtype=g_r.dtype)
  g_all = g_r + g_f + eye
  solve_r, est_r = cholesky_solver(g_r + eye)
  solve_all, est_all = cholesky_solver(g_all)
  delta = solve_r(b_r) - solve_all(b_r + b_f)  # (w_r - w0) - (w_D - w0)
  return delta, _direct_info(delta, g_all, with_condition, [est_r, est_all])


def _delta_primal(apply_s, w_s, retain, forget, lam, *, num_classes, batch_size, dtype,
                  with_condition, **_):
  stats = lambda xy: gram_stats(apply_s, w_s, *xy, num_classes=num_classes,
                                batch_size=batch_size, dtype=dtype)
  return primal_solve(*stats(retain), *stats(forget), lam, with_condition=with_condition)


# Columns of the kept Jacobian rows widened to the solve dtype at a time: the products run in
# that dtype without a widened copy of all the rows (n·C·p numbers) in memory.
ROW_PRODUCT_COLUMNS = 4096


def _column_chunk_loop(p: int, body, init):
  """Runs `body(start, width, valid, carry)` over column chunks of width
  `ROW_PRODUCT_COLUMNS` (p if smaller) inside `lax.fori_loop`, so that one chunk is widened at a
  time: as a Python loop in one program, XLA widened every chunk at once (a [20,000, 44,564]
  float32 product compiled with 34 GB of temporaries). The last chunk starts at p - width and
  `valid` [width] masks its columns that the chunk before covered.
  """
  width = min(p, ROW_PRODUCT_COLUMNS)
  if width == 0:
    return init

  def step(i, carry):
    s = i * width
    start = jnp.minimum(s, p - width)
    valid = start + jnp.arange(width) >= s
    return body(start, width, valid, carry)

  return jax.lax.fori_loop(0, -(-p // width), step, init)


# Jitted so that the chunks accumulate in place (eagerly, each sum is a new [m1, m2] array).
@functools.partial(jax.jit, static_argnames="dtype")
def rows_product(a: jnp.ndarray, b: jnp.ndarray, dtype) -> jnp.ndarray:
  """a bᵀ in `dtype` for Jacobian rows a [m1, p], b [m2, p] of any (narrower) dtype, widening
  `ROW_PRODUCT_COLUMNS` columns at a time."""
  def body(start, width, valid, out):
    ac = jax.lax.dynamic_slice_in_dim(a, start, width, axis=1).astype(dtype)
    bc = jax.lax.dynamic_slice_in_dim(b, start, width, axis=1).astype(dtype)
    return out + (ac * valid.astype(dtype)) @ bc.T
  return _column_chunk_loop(a.shape[1], body, jnp.zeros((a.shape[0], b.shape[0]), dtype))


@functools.partial(jax.jit, static_argnames="dtype")
def rows_matvec(j: jnp.ndarray, v: jnp.ndarray, dtype) -> jnp.ndarray:
  """J v in `dtype` for rows j [m, p] and v [p] (widened a column chunk at a time)."""
  def body(start, width, valid, out):
    jc = jax.lax.dynamic_slice_in_dim(j, start, width, axis=1).astype(dtype)
    vc = jax.lax.dynamic_slice_in_dim(v, start, width).astype(dtype)
    return out + jc @ jnp.where(valid, vc, 0)
  return _column_chunk_loop(j.shape[1], body, jnp.zeros((j.shape[0],), dtype))


@functools.partial(jax.jit, static_argnames="dtype")
def rows_rmatvec(j: jnp.ndarray, u: jnp.ndarray, dtype) -> jnp.ndarray:
  """Jᵀ u in `dtype` for rows j [m, p] and u [m] (widened a column chunk at a time)."""
  def body(start, width, valid, out):  # the last chunk rewrites its overlap with equal values
    del valid
    jc = jax.lax.dynamic_slice_in_dim(j, start, width, axis=1).astype(dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, jc.T @ u.astype(dtype), start, axis=0)
  return _column_chunk_loop(j.shape[1], body, jnp.zeros((j.shape[1],), dtype))


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


@functools.partial(jax.jit, donate_argnums=0)
def _plus_diagonal(k, lam):  # k + λI in place (donated) and without materialising I
  i = jnp.arange(k.shape[0])
  return k.at[i, i].add(lam)


def _delta_dual_rows(apply_fn, w_lin, retain, forget, lam, *, num_classes, batch_size, dtype,
                     with_condition):
  """The dual with the Jacobian rows of D computed once and kept ([n·C, p] in the network's
  dtype): every kernel block and P J_fᵀ are products of those rows, so no sample's Jacobian
  is taken twice (the blocked kernel takes a column block's once per row block)."""
  (x_r, y_r), (x_f, y_f) = retain, forget
  c, m_r = num_classes, x_r.shape[0] * num_classes
  # The network runs in its own dtypes, as for the pipeline's chunked Grams (`gram_stats`):
  # widened params would run the whole network in `dtype` (several times slower on CPUs,
  # and twice the rows' memory); each row is exact to the rounding of the params' and
  # logits' dtypes (the plan's `logits_dtype`, which the precision check uses), and every
  # product of rows is taken in `dtype`. D's rows
  # are taken in one call (one compiled block step) and never sliced (a slice is a copy).
  apply_n = lambda w, x: apply_fn(w, x).astype(dtype)
  x = jnp.concatenate([x_r, x_f], axis=0)
  j = ntk.jacobian_rows(apply_n, rows_params(w_lin), x, batch_size=batch_size, flatten=True)
  e = residuals(apply_n, w_lin, x, jnp.concatenate([y_r, y_f]), num_classes=c,
                batch_size=batch_size, dtype=dtype).reshape(-1)
  e_r, e_f = e[:m_r], e[m_r:]
  k = _plus_diagonal(rows_product(j, j, dtype), lam)     # Θ + λI over D
  k_rr, k_rf, k_ff = k[:m_r, :m_r], k[:m_r, m_r:], k[m_r:, m_r:]
  del k
  solve_rr, est_rr = cholesky_solver(k_rr)
  a = solve_rr(k_rf)                                     # (Θ_rr+λI)⁻¹ Θ_rf
  schur = k_ff - k_rf.T @ a                              # M⁻¹
  v = -e_f + a.T @ e_r                                   # (f0_f - Y_f) + Θ_fr(Θ_rr+λI)⁻¹E_r
  solve_schur, est_schur = cholesky_solver(0.5 * (schur + schur.T))
  z = jnp.concatenate([jnp.zeros((m_r,), dtype), solve_schur(v)])
  u = rows_rmatvec(j, z, dtype)                          # J_fᵀ M V
  back = solve_rr(rows_matvec(j, u, dtype)[:m_r])        # (Θ_rr+λI)⁻¹ J_r u
  delta = u - rows_rmatvec(j, jnp.concatenate([back, jnp.zeros_like(z[m_r:])]), dtype)
  # Called eagerly, free the rows and the factors before κ's eigensolve (its own copy of
  # Θ_rr+λI and workspace): at ViT-S/16 with 1,000 images they are 3.6 and 2.9 GB.
  del j, solve_rr, solve_schur, a
  return delta, _direct_info(delta, k_rr, with_condition, [est_rr, est_schur])


def _delta_dual(apply_s, w_s, retain, forget, lam, *, num_classes, batch_size, dtype,
                kernel_impl, with_condition, keep_rows=False, network=None, **_):
  if keep_rows:
    return _delta_dual_rows(*network, retain, forget, lam, num_classes=num_classes,
                            batch_size=batch_size, dtype=dtype, with_condition=with_condition)
  (x_r, y_r), (x_f, y_f) = retain, forget
  c = num_classes
  res = lambda x, y: residuals(apply_s, w_s, x, y, num_classes=c, batch_size=batch_size,
                               dtype=dtype).reshape(-1)
  kern = lambda a, b: ntk.kernel_to_matrix(ntk.empirical_kernel(
      apply_s, w_s, a, b, batch_size=batch_size, implementation=kernel_impl)).astype(dtype)
  flat = lambda t: ravel_pytree(t)[0]
  k_rr = kern(x_r, x_r) + lam * jnp.eye(x_r.shape[0] * c, dtype=dtype)
  k_rf = kern(x_r, x_f)
  k_ff = kern(x_f, x_f) + lam * jnp.eye(x_f.shape[0] * c, dtype=dtype)
  solve_rr, est_rr = cholesky_solver(k_rr)
  a = solve_rr(k_rf)                                     # (Θ_rr+λI)⁻¹ Θ_rf
  schur = k_ff - k_rf.T @ a                              # M⁻¹
  v = -res(x_f, y_f) + a.T @ res(x_r, y_r)               # (f0_f - Y_f) + Θ_fr(Θ_rr+λI)⁻¹E_r
  solve_schur, est_schur = cholesky_solver(0.5 * (schur + schur.T))
  z = solve_schur(v)                                     # M V
  u = ntk.vjp_rows(apply_s, w_s, x_f, z.reshape(-1, c), batch_size=batch_size)  # J_fᵀ M V
  ju = ntk.jvp_rows(apply_s, w_s, x_r, u, batch_size=batch_size).reshape(-1)
  back = ntk.vjp_rows(apply_s, w_s, x_r, solve_rr(ju).reshape(-1, c), batch_size=batch_size)
  delta = flat(u) - flat(back)                           # P J_fᵀ M V
  return delta, _direct_info(delta, k_rr, with_condition, [est_rr, est_schur])


def _delta_cg(apply_s, w_s, retain, forget, lam, *, num_classes, batch_size, dtype, cg_tol,
              cg_maxiter, **_):
  (x_r, y_r), (x_f, y_f) = retain, forget
  flat0, unravel = ravel_pytree(w_s)
  n_r, n_f, p = x_r.shape[0], x_f.shape[0], flat0.shape[0]
  e_r, e_f = (residuals(apply_s, w_s, x, y, num_classes=num_classes, batch_size=batch_size,
                        dtype=dtype) for x, y in (retain, forget))
  jv = lambda x, v: ntk.jvp_rows(apply_s, w_s, x, unravel(v.astype(flat0.dtype)),
                                 batch_size=batch_size)
  jtu = lambda x, u: ravel_pytree(ntk.vjp_rows(apply_s, w_s, x, u,
                                               batch_size=batch_size))[0].astype(dtype)
  residual_norms, converged = [], []

  def solve(matvec, rhs):
    x, ok = conjugate_gradients(matvec, rhs, tol=cg_tol, maxiter=cg_maxiter(rhs.size))
    residual = (jnp.linalg.norm(matvec(x) - rhs)
                / jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(dtype).tiny))
    residual_norms.append(residual)
    converged.append(ok & (residual <= cg_tol ** 0.5))
    return x

  if p <= (n_r + n_f) * num_classes:  # parameter space: (JᵀJ + λI) x = JᵀE
    g_r = lambda v: jtu(x_r, jv(x_r, v))
    b_r = jtu(x_r, e_r)
    delta = (solve(lambda v: g_r(v) + lam * v, b_r)
             - solve(lambda v: g_r(v) + jtu(x_f, jv(x_f, v)) + lam * v, b_r + jtu(x_f, e_f)))
  else:  # output space: (Θ + λI) α = E, Δ = J_rᵀα_r - Jᵀα
    theta = lambda u: jnp.concatenate(
        [jv(x, jtu(x_r, u[:n_r]) + jtu(x_f, u[n_r:])) for x in (x_r, x_f)], axis=0)
    alpha_r = solve(lambda u: jv(x_r, jtu(x_r, u)) + lam * u, e_r)
    alpha = solve(lambda u: theta(u) + lam * u, jnp.concatenate([e_r, e_f], axis=0))
    delta = jtu(x_r, alpha_r) - jtu(x_r, alpha[:n_r]) - jtu(x_f, alpha[n_r:])
  nan = jnp.asarray(jnp.nan, dtype)
  return delta, SolveInfo(nan, nan, jnp.max(jnp.stack(residual_norms)),
                          jnp.all(jnp.stack(converged)), jnp.all(jnp.isfinite(delta)))


def conjugate_gradients(matvec: Callable, b: jnp.ndarray, *, tol: float, maxiter: int):
  """Solves A x = b for symmetric positive definite A given as `matvec`.

  Stops when the recursively updated residual satisfies ‖r‖ <= tol·‖b‖ or after `maxiter`
  iterations, and says which (`jax.scipy.sparse.linalg.cg` does not).

  Returns:
    (x, converged: bool scalar, True iff it stopped on the tolerance).
  """
  threshold = (tol ** 2) * jnp.vdot(b, b)

  def cond(state):
    _, _, _, gamma, k = state
    return (gamma > threshold) & (k < maxiter)

  def body(state):
    x, r, p, gamma, k = state
    ap = matvec(p)
    alpha = gamma / jnp.vdot(p, ap)
    x, r = x + alpha * p, r - alpha * ap
    gamma_next = jnp.vdot(r, r)
    return x, r, r + (gamma_next / gamma) * p, gamma_next, k + 1

  init = (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.zeros((), jnp.int32))
  x, _, _, gamma, _ = jax.lax.while_loop(cond, body, init)
  return x, gamma <= threshold


_SOLVERS = {Solver.DUAL: _delta_dual, Solver.PRIMAL: _delta_primal, Solver.CG: _delta_cg}


@full_precision
def ridge_update(apply_fn: ApplyFn, w_lin: PyTree, retain, forget, damping, *,
                 num_classes: int, solver: Solver, dtype, batch_size: Optional[int] = 256,
                 kernel_impl: KernelImplementation = KernelImplementation.JAX,
                 cg_tol: Optional[float] = None,
                 cg_maxiter: Callable[[int], int] = lambda dim: 2 * dim,
                 with_condition: bool = False,
                 keep_rows: bool = False) -> tuple[jnp.ndarray, SolveInfo]:
  """Δ = w_r - w_D of kernel ridge regression linearised at `w_lin` (no validation).

  Args:
    apply_fn: `(params, x) -> logits [n, C]` over the trainable pytree only.
    w_lin: the linearisation point.
    retain, forget: (x [n, ...], y [n] int).
    damping: λ (a scalar, may be traced).
    num_classes: C. solver: a concrete DUAL | PRIMAL | CG. dtype: the solve dtype.
    batch_size: rows per streamed block. kernel_impl: the dual's kernel (concrete).
    cg_tol: cg relative tolerance (default `default_cg_tol(dtype)`).
    cg_maxiter: cg iteration cap as a function of the system's dimension.
    with_condition: compute κ (an O(dim³) eigensolve) for the direct solvers.
    keep_rows: dual only: compute the Jacobian rows of D once and keep them (n·C·p numbers in
      the network's dtype) instead of the blocked kernel (`Plan.keep_jacobian_rows`).

  Returns:
    (Δ flat [p] in `dtype`, in the ravel order of `w_lin`; SolveInfo).
  """
  apply_s, w_s = in_dtype(apply_fn, w_lin, dtype)
  tol = default_cg_tol(dtype) if cg_tol is None else cg_tol
  return _SOLVERS[Solver(solver)](
      apply_s, w_s, retain, forget, jnp.asarray(damping, dtype), num_classes=num_classes,
      batch_size=batch_size, dtype=jnp.dtype(dtype), kernel_impl=kernel_impl, cg_tol=tol,
      cg_maxiter=cg_maxiter, with_condition=with_condition, keep_rows=keep_rows,
      network=(apply_fn, w_lin))


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


def accumulate_chunks(stats_fn: Callable, x, y, *, chunk_rows: int, state: dict,
                      on_chunk: Callable[[dict], None] = lambda state: None) -> dict:
  """Sums `stats_fn` over fixed-shape chunks of (x, y), resumable from `state`.

  Args:
    stats_fn: `(x [m, ...], y [m], row_weights [m]) -> (G, b)`, e.g. `gram_stats` jitted
      (every chunk has the same shape, so it compiles once; the last one is padded with a
      repeated row of weight 0).
    x, y: host arrays [n, ...], [n].
    chunk_rows: m.
    state: {"g", "b", "next"}: the sums so far and the first row not yet added (zeros, 0 to
      start; what `on_chunk` saved, to resume).
    on_chunk: called with the new state after every chunk (e.g. to save it atomically).

  Returns:
    The final state (`next` >= n).
  """
  n = x.shape[0]
  for begin in range(int(state["next"]), n, chunk_rows):
    idx = np.arange(begin, begin + chunk_rows)
    weights = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)
    g, b = stats_fn(x[idx], y[idx], weights)
    state = {"g": np.asarray(state["g"]) + np.asarray(g),
             "b": np.asarray(state["b"]) + np.asarray(b), "next": begin + chunk_rows}
    on_chunk(state)
  return state
