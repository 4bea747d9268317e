"""The linear algebra of the update, in one place: every factorisation, solve, condition
number and precision verdict of the package goes through this module.

  * Cholesky: `cholesky` (LAPACK, or by blocks on CPUs above `CPU_CHOLESKY_BLOCK`), its solves
    (`cholesky_solver`, `cho_solve`) and its rank-m downdate (`cholesky_downdate`).
  * The ridge solve from Gram statistics: `ridge_factor`, `ridge_solve(G, b, λ) -> (x,
    SolveInfo)`; the dual's Schur-complement step, whatever the kernel's source
    (`schur_delta`); conjugate gradients (`conjugate_gradients`).
  * Condition numbers: exact (`condition_number`, an eigensolve), a lower bound from a
    Cholesky factor (`diagonal_condition`), and the spectral norms of small Gram blocks.
  * Products of Jacobian rows kept in a narrower dtype (`rows_product`, `rows_matvec`,
    `rows_rmatvec`), widened a column chunk at a time.
  * The one precision rule: a direct solve with condition number κ in a dtype with machine
    epsilon ε may be off by κ·ε relative; above `WARN_ABOVE` a `PrecisionWarning` says so, above
    `REFUSE_ABOVE` the result is refused with `SolveError` (`check_precision`,
    `precision_warning`). Checks on traced values run when the computation runs
    (`runtime_check`, `runtime_warn`).

Everything runs at full matmul precision (`full_precision`): TF32 on GPUs made dual and primal
differ by 67-85% on an H200 (benchmarks/RESULTS.md). Nothing here imports the rest of the
package.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("fastntk_jax.linalg")


# --------------------------------------------------------------------------------------
# Errors, warnings and checks that also run under jax.jit.
# --------------------------------------------------------------------------------------


class SolveError(ValueError):
  """The solve gave no trustworthy answer (singular system, non-finite, cg not converged)."""


class PrecisionWarning(UserWarning):
  """The update's round-off bound (condition number x epsilon) is large: it may be inexact."""


def is_concrete(x) -> bool:
  """True for a concrete value (value checks possible), False while traced under jit."""
  return not isinstance(x, jax.core.Tracer)


def runtime_check(ok, error: type, message: str, *values) -> None:
  """Raises `error(message.format(*values))` unless `ok`: now when `ok` is concrete, when the
  computation runs (via `jax.debug.callback`) when it is traced."""
  def check(ok, *values):
    if not np.all(np.asarray(ok)):
      raise error(message.format(*(np.asarray(v) for v in values)))
  if is_concrete(ok) and all(is_concrete(v) for v in values):
    check(ok, *values)
  else:
    jax.debug.callback(check, ok, *values)


def runtime_warn(bad, message: str, *values) -> None:
  """Issues one `PrecisionWarning` when `bad`: now when concrete, when the computation runs
  when traced. Python's warning filters decide whether and where it is shown (a logging
  handler can capture it with `logging.captureWarnings(True)`)."""
  def warn(bad, *values):
    if np.any(np.asarray(bad)):
      warnings.warn(message.format(*(np.asarray(v) for v in values)), PrecisionWarning,
                    stacklevel=2)
  if is_concrete(bad) and all(is_concrete(v) for v in values):
    warn(bad, *values)
  else:
    jax.debug.callback(warn, bad, *values)


@contextlib.contextmanager
def enable_x64(wanted: bool = True):
  """JAX's 64-bit mode inside the block when `wanted` (the supported JAX versions name their own
  context managers differently); the mode found is restored on exit, also on error."""
  before = bool(jax.config.read("jax_enable_x64"))
  if wanted and not before:
    jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    if bool(jax.config.read("jax_enable_x64")) != before:
      jax.config.update("jax_enable_x64", before)


def full_precision(fn):
  """Runs `fn` with float32 matmuls at full precision (no TF32/bf16 passes on accelerators)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped


# --------------------------------------------------------------------------------------
# The precision rule.
# --------------------------------------------------------------------------------------

# κ·ε above which a result comes with a `PrecisionWarning` naming the bound (it may be off by
# up to that relative amount), and above which it is refused (no digit can be trusted). The
# bound is pessimistic for a one-shot solve and tight for the request stream after many
# downdates (benchmarks/RESULTS.md §7).
WARN_ABOVE = 1e-3
REFUSE_ABOVE = 1.0


def round_off_source(dtype, source_dtype=None):
  """The dtype whose machine epsilon bounds a solve in `dtype` whose matrix was computed in
  `source_dtype` (e.g. Jacobians of narrower logits): the coarser of the two."""
  dtype = jnp.dtype(dtype)
  if source_dtype is not None and jnp.finfo(source_dtype).eps > jnp.finfo(dtype).eps:
    return jnp.dtype(source_dtype)
  return dtype


def precision_remedy(dtype, source_dtype=None) -> str:
  """What would make a solve in `dtype` (matrix computed in `source_dtype`) more accurate."""
  source = round_off_source(dtype, source_dtype)
  if source != jnp.dtype(dtype):
    return f"compute the logits in {jnp.dtype(dtype).name} too, or increase the damping"
  if jnp.dtype(dtype) != jnp.float64:
    return "increase the damping or solve in float64 (solve_dtype=jnp.float64, JAX x64 on)"
  return "increase the damping"


def _source_label(dtype, source_dtype=None) -> str:
  source = round_off_source(dtype, source_dtype)
  return f"{source.name} logits" if source != jnp.dtype(dtype) else source.name


def _verdict_text(what: str, kappa_text: str, dtype, source_dtype, bound_text: str) -> str:
  source = round_off_source(dtype, source_dtype)
  return (f"{what}: condition number {kappa_text} x {_source_label(dtype, source_dtype)} "
          f"epsilon {float(jnp.finfo(source).eps):.2g} = {bound_text}")


def precision_warning(kappa, dtype, source_dtype=None, *,
                      what: str = "the solve") -> Optional[str]:
  """The warning text for a finished solve whose matrix has condition number `kappa`, or None
  when κ·ε <= `WARN_ABOVE` (or κ is unknown: None or NaN). The host-side form of the rule,
  for diagnostics; `check_precision` applies it to (possibly traced) values."""
  if kappa is None or np.isnan(kappa):
    return None
  source = round_off_source(dtype, source_dtype)
  remedy = precision_remedy(dtype, source_dtype)
  if np.isinf(kappa):
    return (f"{what}: the matrix is numerically singular in {jnp.dtype(dtype).name} (an "
            f"eigenvalue <= 0 after round-off), so the result may be meaningless; {remedy}")
  bound = float(kappa) * float(jnp.finfo(source).eps)
  if bound <= WARN_ABOVE:
    return None
  return (_verdict_text(what, f"{float(kappa):.3g}", dtype, source_dtype, f"{bound:.2g}")
          + f": the result may be off by up to that relative amount; {remedy}")


def check_precision(kappa, dtype, source_dtype=None, *, what: str, damping=None,
                    warn: bool = True, remedy: Optional[str] = None) -> None:
  """The one precision rule, applied now (concrete κ) or when the computation runs (traced).

  Refuses with `SolveError` when κ·ε > `REFUSE_ABOVE` or κ is not a positive number (the
  factorisation failed: the matrix is not positive definite in `dtype`); with `warn`, issues
  one `PrecisionWarning` when `WARN_ABOVE` < κ·ε <= `REFUSE_ABOVE`.

  Args:
    kappa: a condition number or a lower bound on it (scalar, may be traced; NaN or <= 0 means
      the factorisation failed).
    dtype: the solve dtype. source_dtype: the dtype the matrix was computed in, when narrower.
    what: names the solve in the message (e.g. "the primal solve").
    damping: λ, named in the refusal when given.
    warn: False leaves the warning to the caller (e.g. a diagnostics record that reports it).
    remedy: what to do instead (default `precision_remedy`).
  """
  source = round_off_source(dtype, source_dtype)
  eps = float(jnp.finfo(source).eps)
  remedy = remedy or precision_remedy(dtype, source_dtype)
  kappa = jnp.asarray(kappa)
  valid = jnp.isfinite(kappa) & (kappa > 0)
  bound = jnp.where(valid, kappa * eps, jnp.inf)
  lam = "" if damping is None else f", damping {{}}"
  values = () if damping is None else (jnp.asarray(damping),)
  runtime_check(
      bound <= REFUSE_ABOVE, SolveError,
      f"{what} cannot be trusted: condition number {{:.3g}} x "
      f"{_source_label(dtype, source_dtype)} epsilon "
      f"{eps:.2g} > {REFUSE_ABOVE:g} (no digit of the result is reliable; a NaN or infinite "
      f"condition number means the matrix is not positive definite in "
      f"{jnp.dtype(dtype).name}){lam}; {remedy}", kappa, *values)
  if warn:
    runtime_warn((bound > WARN_ABOVE) & (bound <= REFUSE_ABOVE),
                 _verdict_text(what, "{:.3g}", dtype, source_dtype, "{:.2g}")
                 + f": the result may be off by up to that relative amount; {remedy}",
                 kappa, bound)


# --------------------------------------------------------------------------------------
# Cholesky and the ridge solve.
# --------------------------------------------------------------------------------------


class SolveInfo(NamedTuple):
  """Scalars describing one solve (jnp arrays; a pytree, so it passes through `jax.jit`).

  condition_number: 2-norm κ of the matrix inverted (dual: Θ_rr+λI, primal: G+λI); inf when
    round-off made it indefinite; NaN when not computed (cg, or `with_condition=False`).
  condition_estimate: a lower bound on κ of every matrix factorised, (max L_ii / min L_ii)²
    of its Cholesky factor L (O(p), always computed); for cg, `cg_condition_estimate`.
  relative_residual: cg: max over its solves of the true ‖A x - b‖/‖b‖ recomputed at the end
    (it also carries the round-off of evaluating A); 0 for the direct solvers.
  converged: cg stopped on its tolerance, not on its iteration cap, and its true residual is
    at most sqrt(tol) (at least half the digits asked for: the rest may be the round-off of
    evaluating the network twice); True for the direct solvers.
  finite: every entry of the result is finite (False: a singular system, or overflow).
  """
  condition_number: jnp.ndarray
  condition_estimate: jnp.ndarray
  relative_residual: jnp.ndarray
  converged: jnp.ndarray
  finite: jnp.ndarray

  @property
  def kappa(self) -> jnp.ndarray:
    """The larger of the exact κ (when computed) and the factor's lower bound."""
    return jnp.fmax(self.condition_estimate,
                    jnp.where(jnp.isnan(self.condition_number), 0.0, self.condition_number))


def direct_info(result, matrix, with_condition: bool, estimates) -> SolveInfo:
  """The `SolveInfo` of a direct solve of `matrix` (κ by eigensolve when `with_condition`)
  whose factors gave the lower bounds `estimates`."""
  cond = condition_number(matrix) if with_condition else jnp.asarray(jnp.nan, matrix.dtype)
  return SolveInfo(cond, jnp.max(jnp.stack(estimates)), jnp.zeros((), matrix.dtype),
                   jnp.asarray(True), jnp.all(jnp.isfinite(result)))


def merge_info(*infos: SolveInfo) -> SolveInfo:
  """One `SolveInfo` for several solves: the worst of each field."""
  stack = lambda name: jnp.stack([jnp.asarray(getattr(i, name)) for i in infos])
  return SolveInfo(jnp.max(stack("condition_number")), jnp.max(stack("condition_estimate")),
                   jnp.max(stack("relative_residual")), jnp.all(stack("converged")),
                   jnp.all(stack("finite")))


# Order above which CPUs factorise by blocks of this order (`cholesky`): the multithreaded
# LAPACK potrf that jaxlib calls on CPUs (scipy's OpenBLAS 0.3.30) segfaults from about
# n = 19,000 on two threads (OpenBLAS issues #1413, #2562; benchmarks/RESULTS.md §16). Read
# when a caller is traced: a changed value reaches functions compiled before only after
# `jax.clear_caches()`.
CPU_CHOLESKY_BLOCK = 4096
# The block loops are unrolled ((n/block)²/2 updates): compile time and memory grow with the
# square of the count.
MAX_CHOLESKY_BLOCKS = 64


# Jitted, so that the temporaries are one [n, n] (the working copy, written in place) and the
# panels, as LAPACK's whole factorisation (eagerly every block update would be a new [n, n]);
# tests/test_linalg.py checks the compiled memory analysis.
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
  chol = cholesky(a)
  return (lambda b: cho_solve(chol, b)), diagonal_condition(chol)


def diagonal_condition(chol: jnp.ndarray) -> jnp.ndarray:
  """(max L_ii / min L_ii)² of a Cholesky factor: a lower bound on κ(L Lᵀ), in O(p)."""
  d = jnp.abs(jnp.diagonal(chol))
  return jnp.square(jnp.max(d) / jnp.min(d))


# Power iterations behind `power_condition`: each a matvec and a solve, O(m²) against the
# factorisation's m³/3.
POWER_ITERATIONS = 30


def power_condition(matvec: Callable[[jnp.ndarray], jnp.ndarray], chol: jnp.ndarray, *,
                    iterations: int = POWER_ITERATIONS) -> jnp.ndarray:
  """An estimate of κ of a symmetric positive definite A, given as `matvec` (v -> A v), with
  lower Cholesky factor `chol`, from power iterations: λ_max by A, 1/λ_min by A⁻¹
  (`cho_solve`), from one fixed start. In exact arithmetic each Rayleigh quotient lies inside
  the spectrum, so the ratio is a lower bound on κ that approaches it as the iterations
  converge (far closer than `diagonal_condition`, which can miss κ several-fold); in
  floating point, where κ·ε nears 1, the solves' round-off can carry it above κ (the
  precision rule then refuses sooner). NaN when the factor is not finite."""
  m = chol.shape[0]
  start = 1.0 + 0.5 * jnp.cos(jnp.arange(m, dtype=chol.dtype))  # not orthogonal to much
  start = start / jnp.linalg.norm(start)

  def iterate(apply):
    def body(_, v):
      w = apply(v)
      return w / jnp.linalg.norm(w)
    v = jax.lax.fori_loop(0, iterations, body, start)
    return jnp.vdot(v, apply(v))

  top = iterate(matvec)
  inverse_top = iterate(lambda v: cho_solve(chol, v))
  return top * inverse_top


def condition_number(a: jnp.ndarray) -> jnp.ndarray:
  """2-norm κ of a symmetric matrix meant to be positive definite; inf when round-off made its
  smallest eigenvalue non-positive (numerically singular)."""
  eig = jnp.linalg.eigvalsh(a)
  return jnp.where(eig[0] > 0, eig[-1] / eig[0], jnp.inf)


def ridge_condition_number(gram, damping) -> float:
  """κ(G + λI) of a Gram matrix held on the host, in float64 whatever JAX's 64-bit mode."""
  with enable_x64():
    g = jnp.asarray(np.asarray(gram, np.float64))
    i = jnp.arange(g.shape[0])
    return float(condition_number(g.at[i, i].add(float(damping))))


def cho_solve(chol: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """(L Lᴴ)⁻¹ b for a lower Cholesky factor L (`cholesky`)."""
  return jax.scipy.linalg.cho_solve((chol, True), b)


def spectral_norms_squared(blocks: np.ndarray) -> np.ndarray:
  """Largest eigenvalue of each symmetric positive semi-definite block [..., k, k] (e.g. the
  C×C Gram J(x)J(x)ᵀ of one input: the squared spectral norm of J(x)), in float64, >= 0."""
  return np.maximum(np.linalg.eigvalsh(np.asarray(blocks, np.float64))[..., -1], 0.0)


@functools.partial(jax.jit, donate_argnums=0)
def plus_diagonal(k, lam):
  """k + λI in place (k is donated) and without materialising I."""
  i = jnp.arange(k.shape[0])
  return k.at[i, i].add(lam)


def ridge_factor(gram: jnp.ndarray, damping) -> jnp.ndarray:
  """The lower Cholesky factor of G + λI (`cholesky`; NaN when it is not positive definite)."""
  i = jnp.arange(gram.shape[0])
  return cholesky(gram.at[i, i].add(jnp.asarray(damping, gram.dtype)))


@functools.partial(jax.jit, static_argnames=("with_condition", "power_estimate"))
@full_precision
def ridge_solve(gram: jnp.ndarray, rhs: jnp.ndarray, damping, *,
                with_condition: bool = False,
                power_estimate: bool = True) -> tuple[jnp.ndarray, SolveInfo]:
  """x = (G + λI)⁻¹ b: the ridge solve from Gram statistics, the package's one.

  Args:
    gram: G [p, p], symmetric positive semi-definite (the factorisation reads its lower
      triangle; `power_estimate` all of it).
    rhs: b [p] (or [p, k]).
    damping: λ >= 0 (scalar, may be traced).
    with_condition: also compute κ(G + λI) exactly (an O(p³) eigensolve).
    power_estimate: κ's estimate also from power iterations (`power_condition`: 2 x 30
      products with G (both its triangles then read) and solves, O(p²) each, no copy of G),
      not only from the factor's diagonal.

  Returns:
    (x like `rhs`, SolveInfo of G + λI). Nothing is checked here: pass `info.kappa` to
    `check_precision` (a failed factorisation gives NaN x and a NaN estimate).
  """
  chol = ridge_factor(gram, damping)
  x = cho_solve(chol, rhs)
  estimates = [diagonal_condition(chol)]
  if power_estimate:
    estimates.append(power_condition(lambda v: gram @ v + damping * v, chol))
  matrix = (gram + damping * jnp.eye(gram.shape[0], dtype=gram.dtype) if with_condition
            else gram)
  return x, direct_info(x, matrix, with_condition, estimates)


def smallest_eigenvalue(a) -> float:
  """The smallest eigenvalue of a symmetric matrix held on the host (numpy's LAPACK `syevd`,
  float64; backward stable: off by at most a small multiple of p·u·‖a‖)."""
  a = np.asarray(a, np.float64)
  return float(np.linalg.eigvalsh(a)[0]) if a.size else 0.0


def reference_ridge_solve(gram, rhs, damping) -> np.ndarray:
  """(G + λI)⁻¹ b [p] on the host by an LU solve (numpy's LAPACK, not the package's Cholesky
  path) refined twice with residuals in extended precision: an independent float64
  reference for checking a ridge solve (e.g. the retrain of the linearised model)."""
  g = np.asarray(gram, np.float64)
  a = g + float(damping) * np.eye(g.shape[0])
  b = np.asarray(rhs, np.float64)
  x = np.linalg.solve(a, b)
  ld = np.longdouble
  for _ in range(2):
    r = b.astype(ld) - (g.astype(ld) @ x.astype(ld) + ld(float(damping)) * x.astype(ld))
    x = x + np.linalg.solve(a, np.asarray(r, np.float64))
  return x


def schur_delta(k_rr, k_rf, k_ff, e_r, e_f, *, pull_forget: Callable, push_retain: Callable,
                pull_retain: Callable) -> tuple[jnp.ndarray, list]:
  """Eq. (1) in the dual from the damped kernel blocks, whatever computed them.

  With K_rr = Θ_rr+λI, K_rf = Θ_rf, K_ff = Θ_ff+λI (sample-major, [m_r, m_r], [m_r, m_f],
  [m_f, m_f]) and residuals e = Y - f(w_lin, X) flattened:

      M⁻¹ = K_ff - K_rfᵀ K_rr⁻¹ K_rf,   V = -e_f + K_rfᵀ K_rr⁻¹ e_r,
      Δ = P J_fᵀ M V = u - J_rᵀ K_rr⁻¹ J_r u,   u = J_fᵀ M V.

  The Jacobians enter only through three linear maps, so the blocked kernel (jvp/vjp) and
  the kept Jacobian rows (row products) share this routine.

  Args:
    k_rr, k_rf, k_ff: the kernel blocks, λ already on the diagonals of k_rr and k_ff.
    e_r, e_f: residuals [m_r], [m_f].
    pull_forget: z [m_f] -> J_fᵀ z [p]. push_retain: u [p] -> J_r u [m_r].
    pull_retain: v [m_r] -> J_rᵀ v [p].

  Returns:
    (Δ [p], [lower bounds on κ of K_rr and of the Schur complement]).
  """
  solve_rr, est_rr = cholesky_solver(k_rr)
  a = solve_rr(k_rf)                                     # K_rr⁻¹ Θ_rf
  schur = k_ff - k_rf.T @ a                              # M⁻¹
  v = -e_f + a.T @ e_r                                   # (f0_f - Y_f) + Θ_fr K_rr⁻¹ E_r
  del a
  solve_schur, est_schur = cholesky_solver(0.5 * (schur + schur.T))
  u = pull_forget(solve_schur(v))                        # J_fᵀ M V
  delta = u - pull_retain(solve_rr(push_retain(u)))      # P J_fᵀ M V
  return delta, [est_rr, est_schur]


def conjugate_gradients(matvec: Callable, b: jnp.ndarray, *, tol: float, maxiter: int):
  """Solves A x = b for symmetric positive definite A given as `matvec` (jit-able).

  Stops when the recursively updated residual satisfies ‖r‖ <= tol·‖b‖, after `maxiter`
  iterations, or when the curvature pᵀAp is not positive (round-off at the end of a
  converged run, or A not positive definite), and says which (`jax.scipy.sparse.linalg.cg`
  does not).

  Returns:
    (x, converged: True iff it stopped on the tolerance, iterations: int32, spread [2]:
     Gershgorin's upper and lower bounds on the eigenvalues of the Lanczos tridiagonal T
     that cg's coefficients define (T_kk = 1/α_k + β_{k-1}/α_{k-1}, T_k,k+1 = √β_k/α_k),
     whose extreme eigenvalues approach λ_max(A) and λ_min(A) from inside; free, and
     `cg_condition_estimate` turns them into κ).
  """
  threshold = (tol ** 2) * jnp.vdot(b, b)

  def cond(state):
    _, _, _, gamma, k, broke, _, _ = state
    return (gamma > threshold) & (k < maxiter) & ~broke

  def body(state):
    x, r, p, gamma, k, _, spread, previous = state
    ap = matvec(p)
    curvature = jnp.vdot(p, ap)
    broke = ~(curvature > 0)
    alpha = jnp.where(broke, 0.0, gamma / jnp.where(broke, 1.0, curvature))
    x, r = x + alpha * p, r - alpha * ap
    gamma_next = jnp.where(broke, gamma, jnp.vdot(r, r))
    beta = gamma_next / gamma
    alpha_prev, beta_prev = previous[0], previous[1]
    safe = jnp.where(broke, 1.0, alpha)
    diagonal = 1.0 / safe + beta_prev / alpha_prev
    radius = jnp.sqrt(beta_prev) / alpha_prev + jnp.sqrt(beta) / safe
    spread = jnp.where(broke, spread, jnp.stack([jnp.fmax(spread[0], diagonal + radius),
                                                 jnp.fmin(spread[1], diagonal - radius)]))
    previous = jnp.where(broke, previous, jnp.stack([safe, beta]))
    return (x, r, r + beta * p, gamma_next, k + 1, broke, spread, previous)

  init = (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.zeros((), jnp.int32),
          jnp.asarray(False), jnp.asarray([0.0, jnp.inf], b.dtype),
          jnp.asarray([1.0, 0.0], b.dtype))
  x, _, _, gamma, k, _, spread, _ = jax.lax.while_loop(cond, body, init)
  return x, gamma <= threshold, k, spread


def cg_condition_estimate(spread, damping) -> jnp.ndarray:
  """κ of a damped system G + λI (G positive semi-definite: a Gram or a kernel) that cg
  solved, from `conjugate_gradients`' spread [upper, lower]: the upper bound over λ, the
  smallest eigenvalue's lower bound, attained wherever G is rank-deficient (p > n·C in
  parameter space). The precision rule (`check_precision`) applies to it as to the direct
  solvers' estimates: cg's residual test alone cannot see that round-off in the matvec is
  amplified by up to 1/λ. With λ = 0 (a consistent system cg solves in output space, to its
  minimum-norm solution) the smallest eigenvalue has no bound: NaN, unknown, and cg's
  residual test is the check that remains."""
  spread = jnp.asarray(spread)
  return jnp.where(damping > 0, spread[0] / jnp.where(damping > 0, damping, 1.0), jnp.nan)


# --------------------------------------------------------------------------------------
# Products of Jacobian rows kept in a narrower dtype.
# --------------------------------------------------------------------------------------


# Columns of the kept Jacobian rows widened to the solve dtype at a time: the products run in
# that dtype without a widened copy of all the rows (n·C·p numbers) in memory.
ROW_PRODUCT_COLUMNS = 4096


def _column_chunk_loop(p: int, body, init):
  """Runs `body(start, width, valid, carry)` over column chunks of width
  `ROW_PRODUCT_COLUMNS` (p if smaller) inside `lax.fori_loop`, so that one chunk is widened at a
  time (a Python loop in one program lets XLA widen every chunk at once: benchmarks/RESULTS.md
  §16). The last chunk starts at p - width and `valid` [width] masks its columns that the
  chunk before covered.
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


# --------------------------------------------------------------------------------------
# Rank-m Cholesky downdate (the request stream).
# --------------------------------------------------------------------------------------


# Blocking of the downdate: columns of L are processed in blocks of _DD_BLOCK, the rank-m
# correction in chunks of at most _DD_CHUNK columns (so the small sequential part of a block
# stays small and the rest is matrix-matrix products). Measured on a 2-core CPU at p = 1500.
_DD_BLOCK = 32
_DD_CHUNK = 64


def downdate_flops(p: int, m: int) -> float:
  """Predicted FLOPs of `cholesky_downdate` of a [p, p] factor by m columns."""
  pp = math.ceil(p / _DD_BLOCK) * _DD_BLOCK
  chunks, mc = _chunking(m)
  return chunks * 2.0 * pp * pp * (_DD_BLOCK + mc) ** 2 / _DD_BLOCK


def _chunking(m: int) -> tuple[int, int]:
  """(number of chunks, columns per chunk): at most _DD_CHUNK each, split evenly so that
  little zero padding is added (e.g. 80 -> 2 x 40, not 64 + 64)."""
  if m <= 0:
    return 0, 0
  chunks = math.ceil(m / _DD_CHUNK)
  return chunks, math.ceil(m / chunks)


def refactor_flops(p: int) -> float:
  """Predicted FLOPs of a Cholesky factorisation of a [p, p] matrix."""
  return p ** 3 / 3.0


def _pivot_block(s: jnp.ndarray, i, nb: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One column of a blocked hyperbolic-Householder downdate.

  `s` stacks rows of [L[:, block] | X] (width nb + m) and of the accumulated transformation.
  Row i of `s` is the pivot row a = (x1 = L_kk, x2 = X_k). With φ = diag(1, -I_m) on the
  coordinates (i, X), the reflector y ↦ y + (yφv) vᵀ / (r·v1), v = (v1, x2),
  r = sqrt(x1² - |x2|²), v1 = |x2|² / (x1 + r) (= x1 - r without cancellation), preserves
  y φ yᵀ-type products (so L Lᵀ - X Xᵀ is unchanged) and maps a to (r, 0).

  Returns:
    (transformed s, pivot ratio r²/x1²).
  """
  a = s[i]
  x1 = a[i]
  x2 = a[nb:]
  s2 = x2 @ x2
  r2 = x1 * x1 - s2
  r = jnp.sqrt(jnp.maximum(r2, jnp.finfo(s.dtype).tiny))
  v1 = s2 / (x1 + r)
  denom = r * v1
  # x2 = 0 (nothing to remove along this column) makes the reflector the identity.
  active = denom > 0
  inv = jnp.where(active, 1.0 / jnp.where(active, denom, 1.0), 0.0)
  c = (s[:, i] * v1 - s[:, nb:] @ x2) * inv
  s = s.at[:, i].add(c * v1)
  s = s.at[:, nb:].add(c[:, None] * x2[None, :])
  s = s.at[i, i].set(r).at[i, nb:].set(0.0)  # exactly (r, 0), as the algebra says
  return s, r2 / (x1 * x1)


def _downdate_chunk(l: jnp.ndarray, x: jnp.ndarray, nb: int):
  """Downdates a padded factor l [P, P] (P % nb == 0) by x [P, mc]; see cholesky_downdate."""
  big_p, mc = x.shape
  width = nb + mc
  dtype = l.dtype

  def block(carry, j0):
    l, x, min_ratio = carry
    w = jnp.concatenate([jax.lax.dynamic_slice(l, (0, j0), (big_p, nb)), x], axis=1)
    head = jax.lax.dynamic_slice(w, (j0, 0), (nb, width))
    # The reflectors of this block depend only on its nb head rows; applying them to the
    # identity as well accumulates their product T, applied to all rows in one matmul.
    s = jnp.concatenate([head, jnp.eye(width, dtype=dtype)], axis=0)

    def column(i, c):
      s, mr = c
      s, ratio = _pivot_block(s, i, nb)
      return s, jnp.minimum(mr, ratio)

    s, min_ratio = jax.lax.fori_loop(0, nb, column, (s, min_ratio))
    # Rows above the block are zero in these columns (l lower triangular, x already
    # zeroed there), so w @ T leaves them zero; the head rows take their exact values.
    w = jax.lax.dynamic_update_slice(w @ s[nb:], s[:nb], (j0, 0))
    l = jax.lax.dynamic_update_slice(l, w[:, :nb], (0, j0))
    return (l, w[:, nb:], min_ratio), None

  init = (l, x, jnp.asarray(jnp.inf, dtype))
  (l, _, min_ratio), _ = jax.lax.scan(block, init, jnp.arange(0, big_p, nb))
  return l, min_ratio


def cholesky_downdate(chol: jnp.ndarray, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Rank-m Cholesky downdate: L' with L' L'ᵀ = L Lᵀ - X Xᵀ, in O(m·p²).

  Blocked hyperbolic Householder reflections (see `_pivot_block`): columns of L in blocks
  of 32, X in even chunks of at most 64 columns, so most of the work is matrix products.
  Zero columns of X are no-ops (padding is free apart from its FLOPs). Pure and jit-able.

  Args:
    chol: lower-triangular L [p, p] with positive diagonal.
    x: X [p, m].

  Returns:
    (L' [p, p] lower triangular, min_ratio): min_ratio is the smallest (L'_kk/L_kk)² over
    all columns and chunks; it is <= 0 or non-finite iff L Lᵀ - X Xᵀ was not (numerically)
    positive definite, in which case L' is garbage and the caller must refactorise.
  """
  p, m = x.shape
  dtype = jnp.result_type(chol.dtype, x.dtype)
  chol, x = chol.astype(dtype), x.astype(dtype)
  nb = _DD_BLOCK
  big_p = math.ceil(p / nb) * nb
  if big_p != p:  # pad with an identity block: unit pivots, nothing to remove there
    pad = big_p - p
    chol = jnp.pad(chol, ((0, pad), (0, pad)))
    chol = chol.at[jnp.arange(p, big_p), jnp.arange(p, big_p)].set(1.0)
    x = jnp.pad(x, ((0, pad), (0, 0)))
  chunks, mc = _chunking(m)
  if chunks * mc != m:
    x = jnp.pad(x, ((0, 0), (0, chunks * mc - m)))
  min_ratio = jnp.asarray(1.0, dtype)
  if chunks:
    xs = x.reshape(big_p, chunks, mc).transpose(1, 0, 2)

    def one(carry, xc):
      l, mr = carry
      l, r = _downdate_chunk(l, xc, nb)
      return (l, jnp.minimum(mr, r)), None

    (chol, min_ratio), _ = jax.lax.scan(one, (chol, min_ratio), xs)
  return chol[:p, :p], min_ratio
