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

Each returns `(Δ as a flat [p] vector in the solve dtype, SolveInfo)`. Every factorisation,
solve and the dual's Schur step are `fastntk_jax.linalg`'s (at full matmul precision); the
network's Jacobians, kernels and Gram statistics are `fastntk_jax.ntk`'s.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import linalg
from fastntk_jax import ntk
from fastntk_jax.enums import KernelImplementation, Solver

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]


def default_cg_tol(dtype) -> float:
  """cg's relative tolerance in a solve dtype: 1e-12 in float64, 1e-5 otherwise."""
  return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def in_dtype(apply_fn: ApplyFn, w_lin: PyTree, dtype) -> tuple[ApplyFn, PyTree]:
  """The network seen by a solve in `dtype`: params widened to it and logits cast to it, so
  tangents, cotangents and kernels carry the solve dtype (the network's own arithmetic is
  what it is; `plan` warns when its logits are narrower)."""
  dtype = jnp.dtype(dtype)
  widen = lambda l: l.astype(dtype) if (jnp.issubdtype(l.dtype, jnp.floating)
                                        and l.dtype.itemsize < dtype.itemsize) else l
  return (lambda w, x: apply_fn(w, x).astype(dtype)), jax.tree_util.tree_map(widen, w_lin)


def primal_delta(g_r, b_r, g_f, b_f, damping, *, with_condition: bool = False):
  """Δ from the Gram statistics of D_r and D_f (`ntk.gram_stats`), two ridge solves.

  Returns:
    (Δ = (G_r+λI)⁻¹b_r - (G_r+G_f+λI)⁻¹(b_r+b_f) as a flat [p] vector, SolveInfo of both
     solves; κ is that of G_r+G_f+λI).
  """
  x_r, info_r = linalg.ridge_solve(g_r, b_r, damping)  # w_r - w0
  x_d, info_d = linalg.ridge_solve(g_r + g_f, b_r + b_f, damping,
                                   with_condition=with_condition)  # w_D - w0
  delta = x_r - x_d
  return delta, info_d._replace(
      condition_estimate=jnp.fmax(info_r.condition_estimate, info_d.condition_estimate),
      finite=jnp.all(jnp.isfinite(delta)))


def _delta_primal(apply_s, w_s, retain, forget, lam, *, num_classes, batch_size, dtype,
                  with_condition, **_):
  stats = lambda xy: ntk.gram_stats(apply_s, w_s, *xy, num_classes=num_classes,
                                    batch_size=batch_size, dtype=dtype)
  return primal_delta(*stats(retain), *stats(forget), lam, with_condition=with_condition)


class KernelStats(NamedTuple):
  """The dual's statistics of a set S at w_lin, outputs sample-major (m = n·C rows): what
  the Jacobian rows of S determine, so that every ridge solve and Eq. (1) over S and its
  leading samples (D_r before D_f) are taken from one set of numbers.

  Attributes:
    rows: J_S [m, p] in the network's own dtype (`ntk.rows_params`).
    residuals: E_S = one_hot(Y_S) - f(w_lin, X_S) flattened, [m] in the solve dtype.
    kernel: Θ_SS = J_S J_Sᵀ [m, m] in the solve dtype, undamped.
  """
  rows: jnp.ndarray
  residuals: jnp.ndarray
  kernel: jnp.ndarray


@linalg.full_precision
def kernel_stats(apply_fn: ApplyFn, w_lin: PyTree, x, y, *, num_classes: int,
                 batch_size: Optional[int], dtype) -> KernelStats:
  """The `KernelStats` of the samples (x [n, ...], y [n]) at `w_lin` (no validation).

  The network runs in its own dtypes, as for the chunked Grams (`ntk.gram_stats`): widened
  params would run the whole network in `dtype` (several times slower on CPUs, and twice the
  rows' memory); each row is exact to the rounding of the params' and logits' dtypes (the
  plan's `logits_dtype`), and every product of rows is taken in `dtype`. The rows are taken
  in one call (one compiled block step) and never sliced (a slice is a copy)."""
  dtype = jnp.dtype(dtype)
  apply_n = lambda w, xx: apply_fn(w, xx).astype(dtype)
  j = ntk.jacobian_rows(apply_n, ntk.rows_params(w_lin), x, batch_size=batch_size,
                        flatten=True)
  e = ntk.residuals(apply_n, w_lin, x, y, num_classes=num_classes, batch_size=batch_size,
                    dtype=dtype).reshape(-1)
  return KernelStats(j, e, linalg.rows_product(j, j, dtype))


def _padded(v, before: int, after: int):
  return jnp.concatenate([jnp.zeros((before,), v.dtype), v, jnp.zeros((after,), v.dtype)])


@linalg.full_precision
def kernel_ridge_step(stats: KernelStats, lam, *, outputs: Optional[int] = None,
                      with_condition: bool = False) -> tuple[jnp.ndarray, linalg.SolveInfo]:
  """J_Sᵀ(Θ_SS + λI)⁻¹E_S = (J_SᵀJ_S + λI)⁻¹J_SᵀE_S (push-through identity) over the first
  `outputs` rows of `stats` (S: its leading samples; None: all of them).

  Returns:
    (the step [p] in the solve dtype, SolveInfo of Θ_SS + λI: κ's estimate from the factor
     and from power iterations, `linalg.power_condition`).
  """
  m_all = stats.residuals.shape[0]
  m = m_all if outputs is None else int(outputs)
  dtype = stats.residuals.dtype
  alpha, info = linalg.ridge_solve(stats.kernel[:m, :m], stats.residuals[:m], lam,
                                   with_condition=with_condition)
  step = linalg.rows_rmatvec(stats.rows, _padded(alpha, 0, m_all - m), dtype)
  return step, info._replace(finite=jnp.all(jnp.isfinite(step)))


@linalg.full_precision
def kernel_delta(stats: KernelStats, retain_outputs: int, lam, *,
                 with_condition: bool = False) -> tuple[jnp.ndarray, linalg.SolveInfo]:
  """Eq. (1) in the dual (`linalg.schur_delta`) from the `KernelStats` of D, whose first
  `retain_outputs` rows are D_r's and the others D_f's: every kernel block and P J_fᵀ are
  products of the kept rows, so no sample's Jacobian is taken twice.

  Returns:
    (Δ = w_r - w_D [p] in the solve dtype, SolveInfo: κ of Θ_rr + λI).
  """
  j, e, dtype = stats.rows, stats.residuals, stats.residuals.dtype
  m_r = int(retain_outputs)
  m_f = e.shape[0] - m_r
  k_rr = linalg.plus_diagonal(stats.kernel[:m_r, :m_r], lam)
  blocks = (k_rr, stats.kernel[:m_r, m_r:], linalg.plus_diagonal(stats.kernel[m_r:, m_r:], lam))
  delta, estimates = linalg.schur_delta(
      *blocks, e[:m_r], e[m_r:],
      pull_forget=lambda z: linalg.rows_rmatvec(j, _padded(z, m_r, 0), dtype),
      push_retain=lambda u: linalg.rows_matvec(j, u, dtype)[:m_r],
      pull_retain=lambda v: linalg.rows_rmatvec(j, _padded(v, 0, m_f), dtype))
  del blocks
  return delta, linalg.direct_info(delta, k_rr, with_condition, estimates)


def _delta_dual_rows(apply_fn, w_lin, retain, forget, lam, *, num_classes, batch_size, dtype,
                     with_condition):
  """The dual with the Jacobian rows of D computed once and kept ([n·C, p] in the network's
  dtype, `kernel_stats`): the blocked kernel would take a column block's once per row
  block."""
  (x_r, y_r), (x_f, y_f) = retain, forget
  stats = kernel_stats(apply_fn, w_lin, jnp.concatenate([x_r, x_f], axis=0),
                       jnp.concatenate([y_r, y_f]), num_classes=num_classes,
                       batch_size=batch_size, dtype=dtype)
  m_r = x_r.shape[0] * num_classes
  delta, info = kernel_delta(stats, m_r, lam)
  if with_condition:
    # Called eagerly, the rows are freed before κ's eigensolve (its own copy of Θ_rr+λI and
    # workspace): at ViT-S/16 with 1,000 images they take 3.6 GB.
    kernel = stats.kernel
    del stats
    info = info._replace(condition_number=linalg.condition_number(
        linalg.plus_diagonal(kernel[:m_r, :m_r], lam)))
  return delta, info


def _delta_dual(apply_s, w_s, retain, forget, lam, *, num_classes, batch_size, dtype,
                kernel_impl, with_condition, keep_rows=False, network=None, **_):
  if keep_rows:
    return _delta_dual_rows(*network, retain, forget, lam, num_classes=num_classes,
                            batch_size=batch_size, dtype=dtype, with_condition=with_condition)
  (x_r, y_r), (x_f, y_f) = retain, forget
  c = num_classes
  res = lambda x, y: ntk.residuals(apply_s, w_s, x, y, num_classes=c, batch_size=batch_size,
                                   dtype=dtype).reshape(-1)
  kern = lambda a, b: ntk.kernel_to_matrix(ntk.empirical_kernel(
      apply_s, w_s, a, b, batch_size=batch_size, implementation=kernel_impl)).astype(dtype)
  flat = lambda t: ravel_pytree(t)[0]
  k_rr = kern(x_r, x_r) + lam * jnp.eye(x_r.shape[0] * c, dtype=dtype)
  k_ff = kern(x_f, x_f) + lam * jnp.eye(x_f.shape[0] * c, dtype=dtype)
  unravel = ravel_pytree(w_s)[1]
  delta, estimates = linalg.schur_delta(
      k_rr, kern(x_r, x_f), k_ff, res(x_r, y_r), res(x_f, y_f),
      pull_forget=lambda z: flat(ntk.vjp_rows(apply_s, w_s, x_f, z.reshape(-1, c),
                                              batch_size=batch_size)),
      push_retain=lambda u: ntk.jvp_rows(apply_s, w_s, x_r, unravel(u),
                                         batch_size=batch_size).reshape(-1),
      pull_retain=lambda v: flat(ntk.vjp_rows(apply_s, w_s, x_r, v.reshape(-1, c),
                                              batch_size=batch_size)))
  return delta, linalg.direct_info(delta, k_rr, with_condition, estimates)


def _cg_ridge(apply_s, w_s, parts, lam, *, num_classes, batch_size, dtype, cg_tol,
              cg_maxiter):
  """(G + λI)⁻¹ JᵀE over the samples of `parts` [(x, y), ...], by conjugate gradients in
  parameter space (matvec v -> Jᵀ(J v) + λv, one jvp and one vjp per block).

  Returns:
    (the solution [p], its true relative residual, converged: tolerance reached within the
     iteration cap and the true residual at most sqrt(tol), κ's estimate
     (`linalg.cg_condition_estimate`)).
  """
  flat0, unravel = ravel_pytree(w_s)
  jv = lambda x, v: ntk.jvp_rows(apply_s, w_s, x, unravel(v.astype(flat0.dtype)),
                                 batch_size=batch_size)
  jtu = lambda x, u: ravel_pytree(ntk.vjp_rows(apply_s, w_s, x, u,
                                               batch_size=batch_size))[0].astype(dtype)
  rhs = sum(jtu(x, ntk.residuals(apply_s, w_s, x, y, num_classes=num_classes,
                                 batch_size=batch_size, dtype=dtype)) for x, y in parts)
  matvec = lambda v: sum(jtu(x, jv(x, v)) for x, _ in parts) + lam * v
  solution, ok, _, top = linalg.conjugate_gradients(matvec, rhs, tol=cg_tol,
                                                    maxiter=cg_maxiter(rhs.size))
  residual = (jnp.linalg.norm(matvec(solution) - rhs)
              / jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(dtype).tiny))
  return (solution, residual, ok & (residual <= cg_tol ** 0.5),
          linalg.cg_condition_estimate(top, lam))


def _delta_cg(apply_s, w_s, retain, forget, lam, *, num_classes, batch_size, dtype, cg_tol,
              cg_maxiter, **_):
  (x_r, y_r), (x_f, y_f) = retain, forget
  flat0, unravel = ravel_pytree(w_s)
  n_r, n_f, p = x_r.shape[0], x_f.shape[0], flat0.shape[0]
  e_r, e_f = (ntk.residuals(apply_s, w_s, x, y, num_classes=num_classes,
                            batch_size=batch_size, dtype=dtype) for x, y in (retain, forget))
  jv = lambda x, v: ntk.jvp_rows(apply_s, w_s, x, unravel(v.astype(flat0.dtype)),
                                 batch_size=batch_size)
  jtu = lambda x, u: ravel_pytree(ntk.vjp_rows(apply_s, w_s, x, u,
                                               batch_size=batch_size))[0].astype(dtype)
  residual_norms, converged, kappas = [], [], []

  def solve(matvec, rhs):
    x, ok, _, top = linalg.conjugate_gradients(matvec, rhs, tol=cg_tol,
                                               maxiter=cg_maxiter(rhs.size))
    residual = (jnp.linalg.norm(matvec(x) - rhs)
                / jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(dtype).tiny))
    residual_norms.append(residual)
    converged.append(ok & (residual <= cg_tol ** 0.5))
    kappas.append(linalg.cg_condition_estimate(top, lam))
    return x

  if p <= (n_r + n_f) * num_classes:  # parameter space: (JᵀJ + λI) x = JᵀE
    ridge = lambda parts: _cg_ridge(apply_s, w_s, parts, lam, num_classes=num_classes,
                                    batch_size=batch_size, dtype=dtype, cg_tol=cg_tol,
                                    cg_maxiter=cg_maxiter)
    (x_only_r, res_r, ok_r, k_r), (x_all, res_all, ok_all, k_all) = (ridge([retain]),
                                                                     ridge([retain, forget]))
    residual_norms += [res_r, res_all]
    converged += [ok_r, ok_all]
    kappas += [k_r, k_all]
    delta = x_only_r - x_all
  else:  # output space: (Θ + λI) α = E, Δ = J_rᵀα_r - Jᵀα
    theta = lambda u: jnp.concatenate(
        [jv(x, jtu(x_r, u[:n_r]) + jtu(x_f, u[n_r:])) for x in (x_r, x_f)], axis=0)
    alpha_r = solve(lambda u: jv(x_r, jtu(x_r, u)) + lam * u, e_r)
    alpha = solve(lambda u: theta(u) + lam * u, jnp.concatenate([e_r, e_f], axis=0))
    delta = jtu(x_r, alpha_r) - jtu(x_r, alpha[:n_r]) - jtu(x_f, alpha[n_r:])
  nan = jnp.asarray(jnp.nan, dtype)
  return delta, linalg.SolveInfo(nan, jnp.max(jnp.stack(kappas)),
                                 jnp.max(jnp.stack(residual_norms)),
                                 jnp.all(jnp.stack(converged)), jnp.all(jnp.isfinite(delta)))


_SOLVERS = {Solver.DUAL: _delta_dual, Solver.PRIMAL: _delta_primal, Solver.CG: _delta_cg}


@linalg.full_precision
def ridge_update(apply_fn: ApplyFn, w_lin: PyTree, retain, forget, damping, *,
                 num_classes: int, solver: Solver, dtype, batch_size: Optional[int] = 256,
                 kernel_impl: KernelImplementation = KernelImplementation.JAX,
                 cg_tol: Optional[float] = None,
                 cg_maxiter: Callable[[int], int] = lambda dim: 2 * dim,
                 with_condition: bool = False,
                 keep_rows: bool = False) -> tuple[jnp.ndarray, linalg.SolveInfo]:
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


def dual_keeps_rows(num_samples: int, batch_size: Optional[int]) -> bool:
  """Whether `ridge_solution`'s dual keeps the set's Jacobian rows ([n·C, p] in the network's
  own dtype): when the set spans several blocks, as the update's plan does
  (`Plan.keep_jacobian_rows`), since the blocked kernel would take every column block's
  Jacobians once per row block."""
  return batch_size is not None and num_samples > batch_size


def _dual_ridge(apply_s, w_s, parts, lam, *, num_classes, batch_size, dtype, kernel_impl,
                with_condition, network):
  """(G + λI)⁻¹ JᵀE = Jᵀ(Θ + λI)⁻¹E over the samples of `parts` (push-through identity), from
  the kernel over them and one vjp: memory (n·C)², plus n·C·p when `dual_keeps_rows` (the
  rows then taken once, with the network in its own dtypes: `kernel_stats`).

  Returns:
    (the solution [p], SolveInfo of Θ + λI).
  """
  x = jnp.concatenate([jnp.asarray(x) for x, _ in parts], axis=0)
  y = jnp.concatenate([jnp.asarray(y) for _, y in parts], axis=0)
  if dual_keeps_rows(x.shape[0], batch_size):
    stats = kernel_stats(*network, x, y, num_classes=num_classes, batch_size=batch_size,
                         dtype=dtype)
    return kernel_ridge_step(stats, lam, with_condition=with_condition)
  e = ntk.residuals(apply_s, w_s, x, y, num_classes=num_classes, batch_size=batch_size,
                    dtype=dtype).reshape(-1)
  theta = ntk.kernel_to_matrix(ntk.empirical_kernel(
      apply_s, w_s, x, x, batch_size=batch_size, implementation=kernel_impl)).astype(dtype)
  alpha, info = linalg.ridge_solve(theta, e, lam, with_condition=with_condition)
  step = ravel_pytree(ntk.vjp_rows(apply_s, w_s, x, alpha.reshape(-1, num_classes),
                                   batch_size=batch_size))[0].astype(dtype)
  return step, info._replace(finite=jnp.all(jnp.isfinite(step)))


@linalg.full_precision
def ridge_solution(apply_fn: ApplyFn, w_lin: PyTree, parts, damping, *, num_classes: int,
                   solver: Solver, dtype, batch_size: Optional[int] = 256,
                   kernel_impl: KernelImplementation = KernelImplementation.JAX,
                   cg_tol: Optional[float] = None,
                   cg_maxiter: Callable[[int], int] = lambda dim: 2 * dim + 200,
                   with_condition: bool = False):
  """The minimiser of the linearised ridge objective over the samples of `parts` (what
  linearised fine-tuning reaches): the step w − w_lin = (JᵀJ + λI)⁻¹JᵀE (no validation).

  Args:
    apply_fn, w_lin: as `ridge_update`. parts: [(x [n_k, ...], y [n_k] int), ...].
    damping: λ. num_classes: C. dtype: the solve dtype (the network runs in it).
    solver: DUAL (Jᵀ(Θ + λI)⁻¹E from the kernel over the parts' n·C outputs: memory (n·C)²,
      one kernel and one vjp pass; n·C·p more where `dual_keeps_rows`) or CG (conjugate gradients in parameter space, matrix-free:
      memory ~ p + n·C, a jvp and a vjp over the samples per iteration).
    batch_size, kernel_impl (DUAL), cg_tol and cg_maxiter (CG): as `ridge_update`.
    with_condition: DUAL: compute κ(Θ + λI) exactly (an O((n·C)³) eigensolve).

  Returns:
    (the step flat [p] in `dtype`, in the ravel order of `w_lin`; SolveInfo: DUAL: κ or its
     bound from the Cholesky factor; CG: its true relative residual and whether it converged).
  """
  apply_s, w_s = in_dtype(apply_fn, w_lin, dtype)
  lam, dtype = jnp.asarray(damping, dtype), jnp.dtype(dtype)
  solver = Solver(solver)
  if solver == Solver.DUAL:
    return _dual_ridge(apply_s, w_s, parts, lam, num_classes=num_classes,
                       batch_size=batch_size, dtype=dtype, kernel_impl=kernel_impl,
                       with_condition=with_condition, network=(apply_fn, w_lin))
  if solver != Solver.CG:
    raise ValueError(f"ridge_solution: solver {solver.value!r}: use 'dual' or 'cg' (the primal "
                     "closed form is `linear.ridge_solution` on Gram statistics)")
  tol = default_cg_tol(dtype) if cg_tol is None else cg_tol
  step, residual, ok, kappa = _cg_ridge(apply_s, w_s, parts, lam, num_classes=num_classes,
                                        batch_size=batch_size, dtype=dtype, cg_tol=tol,
                                        cg_maxiter=cg_maxiter)
  nan = jnp.asarray(jnp.nan, dtype)
  return step, linalg.SolveInfo(nan, kappa, residual, ok, jnp.all(jnp.isfinite(step)))


def accumulate_chunks(stats_fn: Callable, x, y, *, chunk_rows: int, state: dict,
                      on_chunk: Callable[[dict], None] = lambda state: None) -> dict:
  """Sums `stats_fn` over fixed-shape chunks of (x, y), resumable from `state`.

  Args:
    stats_fn: `(x [m, ...], y [m], row_weights [m]) -> (G, b)`, e.g. `ntk.gram_stats` jitted
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
