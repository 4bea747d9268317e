"""A certificate of forgetting: how far parameters can be from retraining on D_r alone.

The linearised model at w0, f_lin(w, x) = f(w0, x) + J(x)(w - w0), fitted to D_r with the
update's damping λ, has the retain objective

    L_r(w) = ½ Σ_{i∈D_r} ‖f_lin(w, x_i) − Y_i‖² + ½ λ ‖w − w0‖²,     ∇²L_r = J_rᵀJ_r + λI ⪰ λI,

whose unique minimiser w_r is exactly what retraining f_lin on D_r from w0 gives (the
closed form of `unlearn.linear`, the target of Eq. (1); docs/derivation.md). Strong
convexity gives, for any w,

    ‖w − w_r‖₂ ≤ ‖∇L_r(w)‖₂ / λ,     ∇L_r(w) = J_rᵀ(f_lin(w, X_r) − Y_r) + λ(w − w0).

That bound is loose by up to κ = (μ_max + λ)/λ when ∇L_r(w) lies along large eigenvalues
of J_rᵀJ_r (round-off of float32 parameters does). Since L_r is quadratic with Hessian
H = J_rᵀJ_r + λI, w − w_r = H⁻¹∇L_r(w), so for any vector d (a "witness"),

    ‖w − w_r‖₂ ≤ ‖d‖₂ + ‖∇L_r(w) − H d‖₂ / λ,

and a few conjugate-gradient steps on H d = ∇L_r(w) (matrix-free: one jvp and one vjp per
batch of D_r each) give a d that makes it tight. The witness is kept with the certificate, so
re-checking it costs two passes over D_r (the gradient and H d), whoever made d.

The gradient costs one forward, one jvp and one vjp per batch of D_r: anyone holding D_r,
w0, λ and the network can recompute it without retraining (`python -m fastntk_jax.audit`).
It bounds the parameters relative to the backbone w0 only: a backbone that saw D_f before
w0 still knows it (the paper's Table III), and for a network fine-tuned in the standard
(non-linearised) mode the figure is a distance to the linearised model's retrain, not a
statement about the network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import linalg
from fastntk_jax import ntk
from fastntk_jax.unlearn import validate

PyTree = Any

LOGIT_NORM = ("ℓ2 over the C logits of one input: |f_lin(w, x) − f_lin(w_r, x)|₂ ≤ "
              "‖J(x)‖₂ · ‖w − w_r‖₂, ‖J(x)‖₂ the spectral norm of the C×p Jacobian at w0")


@dataclasses.dataclass(frozen=True)
class Certificate:
  """What `certify` proves (all norms Euclidean over the ravelled trainable params).

  Attributes:
    gradient_norm: ‖∇L_r(w)‖₂.
    damping: λ.
    distance_bound: ‖w − w_r‖₂ ≤ this (= gradient_norm / λ).
    update_norm: ‖w − w0‖₂.
    relative_bound: distance_bound / ‖w − w0‖₂ (inf when w = w0).
    retrain_relative_bound: a bound on ‖w − w_r‖₂ / ‖w_r − w0‖₂, from
      ‖w_r − w0‖ ≥ ‖w − w0‖ − distance_bound (inf when that is not positive).
    linearized: True when the parameters come from linearised fine-tuning, so the bound is
      a statement about the model in use; False: a distance measure only.
    num_retain: |D_r|.
    dtype: the dtype the gradient was accumulated in.
    statement: the claim in words.
    gradient_bound: ‖∇L_r(w)‖/λ, the bound without the witness.
    witness_norm, witness_residual: ‖d‖ and ‖∇L_r(w) − H d‖ (0, ‖∇L_r‖ without a witness);
      distance_bound = min(gradient_bound, witness_norm + witness_residual / λ).
    witness_iterations: steps that made d (0: given or none): conjugate-gradient steps
      (matrix-free), or refinements of the Cholesky solve (Gram statistics).
    basis: "gram_statistics": the linearised model is the ridge model of the Gram statistics
      (G_r, b_r) of D_r's Jacobian rows at w0 (the statistics linearised fine-tuning and the
      primal update solve with), and the bound holds in exact arithmetic (`rounding`);
      "matrix_free": gradient and H d by jvp/vjp of the network in `dtype`, their round-off
      not bounded.
    rounding: the rounding-error term included in the bound (NaN: not bounded).
    stats_sha256: SHA-256 of (G_r, b_r) as float64 (basis "gram_statistics"), else "".
    witness: d [p] (not in `as_dict`; the audit log keeps it in the evidence).
  """
  gradient_norm: float
  damping: float
  distance_bound: float
  update_norm: float
  relative_bound: float
  retrain_relative_bound: float
  linearized: bool
  num_retain: int
  dtype: str
  statement: str
  gradient_bound: float = math.nan
  witness_norm: float = 0.0
  witness_residual: float = math.nan
  witness_iterations: int = 0
  basis: str = "matrix_free"
  rounding: float = math.nan
  stats_sha256: str = ""
  witness: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)

  def as_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "witness"}


def retain_gradient(apply_fn: Callable, params_init: PyTree, params: PyTree, retain, *,
                    num_classes: int, damping: float, batch_size: Optional[int] = 256,
                    dtype=None) -> jnp.ndarray:
  """∇L_r(params) of the linearised retain objective, ravelled [p], in `dtype`.

  The network runs in the dtype of the params cast to `dtype` (float64 params promote a
  float32 network's activations where they meet them), so with x64 the gradient carries no
  float32 round-off of the residuals.
  """
  dtype = jnp.dtype(dtype or validate.default_solve_dtype(params_init, params))
  cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)
  w0, w = cast(params_init), cast(params)
  x, y = retain
  x = jnp.asarray(x)
  d = jax.tree_util.tree_map(jnp.subtract, w, w0)
  f0 = ntk.apply_rows(apply_fn, w0, x, batch_size=batch_size).astype(dtype)
  jd = ntk.jvp_rows(apply_fn, w0, x, d, batch_size=batch_size).astype(dtype)
  residual = f0 + jd - jax.nn.one_hot(jnp.asarray(y), num_classes, dtype=dtype)
  pulled = ntk.vjp_rows(apply_fn, w0, x, residual, batch_size=batch_size)
  flat_pulled = ravel_pytree(pulled)[0].astype(dtype)
  return flat_pulled + jnp.asarray(damping, dtype) * ravel_pytree(d)[0].astype(dtype)


# --------------------------------------------------------------------------------------
# The certificate from Gram statistics, with a rounding-error term.
# --------------------------------------------------------------------------------------


def _gamma(n: int, unit: float) -> float:
  """γ_n = n·u / (1 − n·u): the relative error bound of an n-term dot product in a precision
  of unit round-off u (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1)."""
  nu = n * unit
  if not nu < 0.5:
    return math.inf
  return nu / (1.0 - nu)


def _round_up(x) -> float:
  """The float64 just above `x` (a bound that must not shrink when it is stored)."""
  return float(np.nextafter(np.float64(x), np.inf)) if math.isfinite(float(x)) else math.inf


@dataclasses.dataclass(frozen=True)
class StatsBound:
  """‖w − w_r‖ ≤ `bound` for the ridge model of Gram statistics (G_r, b_r), exact arithmetic.

  Attributes:
    bound: ‖d‖ + ‖(G_r + λI)(δ − d) − b_r‖/λ, each term rounded up by its error bound.
    gradient_bound: ‖∇L_r(w)‖/λ, rounded up the same way (the bound without a witness).
    gradient_norm: ‖∇L_r(w)‖ as computed (for the record).
    witness_norm, residual_norm: ‖d‖ and ‖∇L_r(w) − H d‖ as computed.
    rounding: the residual's rounding-error term added before dividing by λ.
    update_norm: ‖δ‖ = ‖w − w0‖ as computed.
    unit_roundoff: u of the extended precision the sums ran in.
  """
  bound: float
  gradient_bound: float
  gradient_norm: float
  witness_norm: float
  residual_norm: float
  rounding: float
  update_norm: float
  unit_roundoff: float


def stats_bound(delta, gram, rhs, damping: float, witness) -> StatsBound:
  """A bound on ‖w − w_r‖ that holds in exact arithmetic for the ridge model the Gram
  statistics define: w_r = w0 + (G_r + λI)⁻¹ b_r, ∇L_r(w) = (G_r + λI)δ − b_r, δ = w − w0.

  Everything runs on the host in numpy's `longdouble` (x87 80-bit on x86-64: u = 2⁻⁶⁴;
  where longdouble is float64, u = 2⁻⁵³ and the rounding term is 2¹¹× larger). With the
  residual r = (G_r + λI)(δ − d) − b_r computed as r̂, each entry satisfies
  |r̂ − r| ≤ 2γ_{p+4}((|G_r| + λI)|δ − d| + |b_r|) (dot products of p terms, the λ term,
  the subtraction, and δ − d itself rounded), and ‖·‖ of p squares errs by at most
  γ_{p+2} relative; the bound adds those terms and rounds up (`_round_up`). G is the
  model's symmetric matrix (`model_gram`), and the residual is divided by λ' = λ less any
  negative eigenvalue of G and a margin for the eigensolver's error (`definite_damping`),
  since ‖H⁻¹‖ <= 1/λ' needs H = G + λI ⪰ λ'I.

  Args:
    delta: δ = w − w0 [p], float64 or narrower (converted exactly).
    gram, rhs: G_r [p, p] and b_r [p] (float64): the statistics that define the model.
    damping: λ > 0.
    witness: d [p] (any vector: the bound holds for every d; d ≈ (G_r + λI)⁻¹∇L_r makes it
      tight).

  Returns:
    A `StatsBound`.
  """
  ld = np.longdouble
  unit = float(np.finfo(ld).eps) / 2
  p = int(np.shape(rhs)[0])
  g64 = model_gram(gram)
  g = g64.astype(ld)
  b = np.asarray(rhs, np.float64).astype(ld)
  lam = ld(float(damping))
  lam_div = ld(definite_damping(g64, float(damping)))  # H >= lam_div I: |H^-1 v| <= |v|/lam_div
  dlt = np.asarray(delta).astype(ld)
  d = np.asarray(witness, np.float64).astype(ld)
  gamma_dot = 2 * _gamma(p + 4, unit)
  gamma_norm = _gamma(p + 2, unit)
  abs_g = np.abs(g)

  def rounded_residual(v):  # (G + λI)v − b, and the bound on its rounding, componentwise
    r = g @ v + lam * v - b
    err = ld(gamma_dot) * (abs_g @ np.abs(v) + lam * np.abs(v) + np.abs(b))
    return r, err

  grow = ld(1) + ld(2) * ld(gamma_norm)  # in longdouble: 1 + 1e-17 is 1 in float64

  def norm_up(v):  # ‖v‖ in longdouble, rounded up by its own error bound
    return np.sqrt(np.sum(v * v)) * grow

  # The few longdouble operations combining the terms round by at most u each: 1 + 8u covers
  # them; `_round_up` then covers the conversion to float64.
  tail = (ld(1) + ld(8) * ld(unit)) / lam_div
  grad, grad_err = rounded_residual(dlt)
  grad_norm = float(np.sqrt(np.sum(grad * grad)))
  gradient_bound = _round_up((norm_up(grad) + norm_up(grad_err)) * tail)
  res, res_err = rounded_residual(dlt - d)
  rounding = norm_up(res_err)
  bound = _round_up((norm_up(d) * lam_div + norm_up(res) + rounding) * tail)
  return StatsBound(bound=min(bound, gradient_bound), gradient_bound=gradient_bound,
                    gradient_norm=grad_norm, witness_norm=float(np.sqrt(np.sum(d * d))),
                    residual_norm=float(np.sqrt(np.sum(res * res))), rounding=_round_up(rounding),
                    update_norm=float(np.sqrt(np.sum(dlt * dlt))), unit_roundoff=unit)


def model_gram(gram) -> np.ndarray:
  """The symmetric G of the model Gram statistics define: the lower triangle mirrored (what
  the Cholesky solves of the update, Full and Retrain read), float64."""
  g = np.asarray(gram, np.float64)
  return np.tril(g) + np.tril(g, -1).T


def definite_damping(gram_sym: np.ndarray, damping: float) -> float:
  """λ' <= λ with G + λI ⪰ λ'I for the symmetric `gram_sym`: λ less G's most negative
  eigenvalue (a PSD Gram can have one of round-off size) less a margin of 10·p·u·‖G‖_F that
  covers the eigensolver's backward error (numpy's LAPACK `syevd`).

  Raises:
    SolveError: λ' <= λ/2: G is too far from PSD for the bound (not a Gram matrix).
  """
  p = gram_sym.shape[0]
  eig_min = linalg.smallest_eigenvalue(gram_sym)
  tau = max(0.0, -eig_min) + 10 * p * float(np.finfo(np.float64).eps) * float(
      np.linalg.norm(gram_sym))
  if not tau < damping / 2:
    raise validate.SolveError(
        f"the Gram statistics are not positive semi-definite to within λ/2 (smallest "
        f"eigenvalue {eig_min:.3g}, round-off margin {tau:.3g}, λ = {damping:g}): they are "
        "not JᵀJ of any rows, so no bound can be certified from them")
  return damping - tau


def stats_witness(delta, gram, rhs, damping: float, *, max_refinements: int = 3):
  """d ≈ (G_r + λI)⁻¹∇L_r(w) for `stats_bound`: a float64 Cholesky solve, refined with
  residuals computed in extended precision while the bound improves (at most
  `max_refinements` times).

  Returns:
    (d [p] float64, StatsBound of d, refinements made).
  """
  ld = np.longdouble
  g64 = model_gram(gram)
  g, b = g64.astype(ld), np.asarray(rhs, np.float64).astype(ld)
  dlt = np.asarray(delta).astype(ld)
  lam = float(damping)
  with linalg.enable_x64():
    chol = linalg.ridge_factor(jnp.asarray(g64), lam)
    solve = lambda v: np.asarray(linalg.cho_solve(chol, jnp.asarray(v, jnp.float64)))
    grad = g @ dlt + ld(lam) * dlt - b
    d = solve(np.asarray(grad, np.float64))
    best = stats_bound(delta, gram, rhs, lam, d)
    steps = 0
    for _ in range(max_refinements):
      e = dlt - d.astype(ld)
      residual = g @ e + ld(lam) * e - b  # ∇L_r − H d
      candidate = d + solve(np.asarray(residual, np.float64))
      trial = stats_bound(delta, gram, rhs, lam, candidate)
      if not trial.bound < best.bound:
        break
      d, best, steps = candidate, trial, steps + 1
  if not np.all(np.isfinite(d)):
    raise validate.SolveError("the certificate's witness is non-finite: G_r + λI is not "
                              "positive definite in float64 (raise the damping)")
  return d, best, steps


def _retain_hvp(apply_fn: Callable, *, damping: float, batch_size: Optional[int], dtype):
  """(w0, x, v [p]) -> (J_rᵀJ_r + λI) v: the Hessian of L_r, matrix-free (traceable)."""
  lam = jnp.asarray(damping, dtype)

  def hvp(w0, x, v):
    unravel = ravel_pytree(w0)[1]
    jv = ntk.jvp_rows(apply_fn, w0, x, unravel(v), batch_size=batch_size).astype(dtype)
    back = ntk.vjp_rows(apply_fn, w0, x, jv, batch_size=batch_size)
    return ravel_pytree(back)[0].astype(dtype) + lam * v
  return hvp


# Above this many trainable parameters `certify` bounds matrix-free: the Gram basis holds
# G_r (p² float64) and its extended-precision copies (two p² longdouble arrays) on the host.
GRAM_BASIS_MAX_PARAMS = 4096


class Basis:
  """How `certify` evaluates ∇L_r and H d (see `Certificate.basis`)."""
  AUTO = "auto"
  GRAM_STATISTICS = "gram_statistics"
  MATRIX_FREE = "matrix_free"


def flat64(tree) -> np.ndarray:
  """A pytree's leaves ravelled in `ravel_pytree`'s order, as float64 (exact for float32)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in leaves])


def hash_stats(gram, rhs) -> str:
  """SHA-256 of Gram statistics as float64 (what a certificate of that basis is about)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for a in (gram, rhs):
    a = np.ascontiguousarray(np.asarray(a, np.float64))
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def gram_statistics(apply_fn: Callable, params_init: PyTree, retain, *, num_classes: int,
                 batch_size: Optional[int] = 256):
  """(G_r [p, p], b_r [p]) float64 numpy: the Gram statistics of D_r's Jacobian rows at w0
  (`ntk.gram_stats`: rows in the network's dtype, summed in float64), what the primal update
  and linearised fine-tuning in closed form solve with."""
  x, y = retain
  n = np.shape(x)[0]
  with linalg.enable_x64():
    # Compiled as `Forgetter.accumulate` compiles it (one chunk of all rows, 0/1 row weights,
    # int32 labels): the same program gives the same bits as the run's statistics.
    stats = jax.jit(lambda w, xx, yy, ww: ntk.gram_stats(
        apply_fn, w, xx, yy, num_classes=int(num_classes), batch_size=batch_size,
        dtype=jnp.float64, row_weights=ww))
    g, b = stats(params_init, np.asarray(x), np.asarray(y, np.int32), np.ones(n, np.float32))
    return np.asarray(g, np.float64), np.asarray(b, np.float64)


def reference_distances(params_init: PyTree, params: PyTree, retrain: PyTree, stats,
                        damping: float, bound: float) -> dict:
  """Distances to an independent float64 retrain of the statistics' model
  (`linalg.reference_ridge_solve`: numpy LU, refined), relative to ‖w_ref − w0‖.

  Returns:
    {"fastntk_relative": ‖w − w_ref‖/‖w_ref − w0‖ of `params`, "retrain_relative": the same
     of `retrain`, "bound_over_distance": `bound` / ‖w − w_ref‖ (the certificate's
     tightness; ≥ 1 up to the reference's own round-off)}.
  """
  w0 = flat64(params_init)
  ref = linalg.reference_ridge_solve(*stats, float(damping))
  scale = float(np.linalg.norm(ref))
  fast = float(np.linalg.norm(flat64(params) - w0 - ref))
  return {"fastntk_relative": fast / scale,
          "retrain_relative": float(np.linalg.norm(flat64(retrain) - w0 - ref)) / scale,
          "bound_over_distance": bound / fast if fast > 0 else math.inf}


def certify(apply_fn: Callable, params_init: PyTree, params: PyTree, retain, *,
            num_classes: int, damping: float, batch_size: Optional[int] = 256,
            linearized: bool = True, dtype=None, witness=None,
            witness_iterations: int = 100, witness_tol: float = 1e-10,
            retain_stats=None, basis: str = Basis.AUTO) -> Certificate:
  """Certifies how close `params` are to retraining the linearised model on D_r alone.

  Two bases (`Certificate.basis`):
    * Gram statistics (`retain_stats`, or computed here when p <= `GRAM_BASIS_MAX_PARAMS`):
      the model is the ridge model of (G_r, b_r), the one linearised fine-tuning and the
      primal update solve with. ∇L_r(w) = (G_r + λI)(w − w0) − b_r and the residual of the
      witness are evaluated in extended precision with a rounding-error term
      (`stats_bound`), so the bound holds in exact arithmetic; the witness is a Cholesky
      solve refined while the bound improves. The bound is then within a few percent of the
      true distance when w is the update's result (its float32 storage dominates).
    * Matrix-free: ∇L_r and H d by a forward, jvp and vjp per batch of D_r in `dtype`,
      the witness by conjugate gradients; its round-off is not bounded.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`, the network whose Jacobian at w0 defines
      f_lin (trainable pytree only; frozen weights and BatchNorm statistics closed over).
    params_init: w0, the linearisation point (the fine-tuning's start).
    params: w, e.g. the Fast-NTK update's result.
    retain: D_r = (x [n, ...], y [n] int labels in [0, C)).
    num_classes: C. damping: λ > 0, the update's (and the fine-tuning's) ridge.
    batch_size: samples per streamed block.
    linearized: whether `params` come from linearised fine-tuning (see `Certificate`).
    dtype: matrix-free: accumulation dtype (default: the widest of the params; float64
      needs x64).
    witness: d [p] to bound with (e.g. a stored certificate's); None: made here.
    witness_iterations, witness_tol: matrix-free: at most this many conjugate-gradient
      steps, stopping at this relative residual; `witness_iterations=0` (no `witness`):
      the gradient bound alone, whatever the basis.
    retain_stats: (G_r [p, p], b_r [p]) the caller holds (e.g. linearised fine-tuning in
      closed form): the model those statistics define is the one certified. They are
      trusted to be D_r's (only `num_retain` is read from `retain`): `gram_statistics`
      computes them, and the audit recomputes them from D_r.
    basis: "auto" (Gram statistics when given or p is small enough), "gram_statistics"
      or "matrix_free".

  Returns:
    A `Certificate`.

  Raises:
    ValueError / TypeError: bad input, named in the message.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable (params, x) -> logits, got {type(apply_fn)}")
  validate.check_damping(damping)
  if not validate.is_concrete(damping):
    raise TypeError("certify runs on the host (it returns Python floats): call it outside "
                    "jax.jit, with a concrete damping")
  if not float(damping) > 0:
    raise ValueError(f"damping must be > 0 to certify (the bound divides by it), got "
                     f"{damping!r}")
  if basis not in (Basis.AUTO, Basis.GRAM_STATISTICS, Basis.MATRIX_FREE):
    raise ValueError(f"basis must be 'auto', 'gram_statistics' or 'matrix_free', got {basis!r}")
  traced = [name for name, tree in (("params_init", params_init), ("params", params),
                                      ("retain", retain))
            if not all(map(validate.is_concrete, jax.tree_util.tree_leaves(tree)))]
  if traced:
    raise TypeError(f"certify runs on the host (it returns Python floats): call it outside "
                    f"jax.jit / vmap / grad, with concrete arrays (traced: {', '.join(traced)})")
  num_classes = validate.check_positive_int("num_classes", num_classes)
  dtype = validate.check_float_dtype("dtype", dtype)
  x, y = validate.check_split("retain", retain, num_classes)
  validate.check_params(params_init, params)
  validate.check_logits(apply_fn, params_init, jnp.asarray(x), num_classes)
  if (isinstance(witness_iterations, bool)
      or not isinstance(witness_iterations, (int, np.integer)) or witness_iterations < 0):
    raise ValueError(f"witness_iterations must be an int >= 0, got {witness_iterations!r}")
  p = int(ntk.num_params(params_init))
  if witness is not None:
    witness = np.asarray(witness)
    if witness.shape != (p,) or not np.all(np.isfinite(witness)):
      raise ValueError(f"witness must be a finite vector of shape ({p},) (the ravelled "
                       f"params), got shape {tuple(witness.shape)}")
  if retain_stats is not None:
    if basis == Basis.MATRIX_FREE:
      raise ValueError("retain_stats define the Gram basis; drop them for basis='matrix_free'")
    g, b = (np.asarray(a) for a in retain_stats)
    if g.shape != (p, p) or b.shape != (p,):
      raise ValueError(f"retain_stats must be (G_r [p, p], b_r [p]) with p = {p}, got shapes "
                       f"{g.shape}, {b.shape}")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(b))):
      raise validate.SolveError("retain_stats are non-finite: nothing can be certified")
    basis = Basis.GRAM_STATISTICS
  elif basis == Basis.GRAM_STATISTICS or (basis == Basis.AUTO and p <= GRAM_BASIS_MAX_PARAMS):
    g, b = gram_statistics(apply_fn, params_init, (x, y), num_classes=int(num_classes),
                        batch_size=batch_size)
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(b))):
      raise validate.SolveError("the Gram statistics of D_r are non-finite: the network's "
                                "logits or Jacobian at w0 overflow, so nothing can be certified")
    basis = Basis.GRAM_STATISTICS
  else:
    basis = Basis.MATRIX_FREE
  if basis == Basis.GRAM_STATISTICS:
    delta = flat64(params).astype(np.longdouble) - flat64(params_init).astype(np.longdouble)
    steps = 0
    if witness is None and witness_iterations > 0:
      witness, bound, steps = stats_witness(delta, g, b, float(damping))
    else:
      bound = stats_bound(delta, g, b, float(damping),
                          np.zeros(p) if witness is None else witness)
    return _certificate(
        bound=bound.bound, gradient_norm=bound.gradient_norm,
        gradient_bound=bound.gradient_bound, witness_norm=bound.witness_norm,
        residual=bound.residual_norm, steps=steps, update=bound.update_norm,
        damping=damping, linearized=linearized, num_retain=int(x.shape[0]),
        dtype="float64", basis=basis, rounding=bound.rounding,
        stats_sha256=hash_stats(g, b), witness=witness)
  return _matrix_free(apply_fn, params_init, params, (x, y), num_classes=int(num_classes),
                      damping=damping, batch_size=batch_size, linearized=linearized,
                      dtype=dtype, witness=witness, witness_iterations=witness_iterations,
                      witness_tol=witness_tol)


def _matrix_free(apply_fn, params_init, params, retain, *, num_classes, damping, batch_size,
                 linearized, dtype, witness, witness_iterations, witness_tol) -> Certificate:
  x, y = retain
  grad = retain_gradient(apply_fn, params_init, params, (x, y), num_classes=num_classes,
                         damping=float(damping), batch_size=batch_size, dtype=dtype)
  gnorm = float(jnp.linalg.norm(grad))
  if not math.isfinite(gnorm):
    raise validate.SolveError("the retain gradient is non-finite: the network's logits or "
                              "Jacobian at w0 overflow on D_r, so nothing can be certified")
  gradient_bound = gnorm / float(damping)
  steps, d = 0, None
  if witness is not None:
    d = jnp.asarray(witness, grad.dtype)
  if d is not None or witness_iterations > 0:
    hvp = _retain_hvp(apply_fn, damping=float(damping), batch_size=batch_size,
                      dtype=grad.dtype)
    w0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, grad.dtype), params_init)
    x = jnp.asarray(x)
    if d is None:  # conjugate gradients on H d = ∇L_r(w), matrix-free, in one program
      cg = jax.jit(lambda w0, x, g: linalg.conjugate_gradients(
          lambda v: hvp(w0, x, v), g, tol=float(witness_tol), maxiter=int(witness_iterations)))
      d, _, steps, _ = cg(w0, x, grad)
      steps = int(steps)
    # The residual is recomputed, not taken from the recursion: the bound must hold for d.
    residual = float(jnp.linalg.norm(grad - jax.jit(hvp)(w0, x, d)))
    witness_norm = float(jnp.linalg.norm(d))
    bound = min(gradient_bound, witness_norm + residual / float(damping))
  else:
    residual, witness_norm, bound = gnorm, 0.0, gradient_bound
  if not math.isfinite(bound):
    raise validate.SolveError("the certificate's bound is non-finite (the Hessian-vector "
                              "products overflow on D_r), so nothing can be certified")
  update = float(np.linalg.norm(flat64(params) - flat64(params_init)))
  return _certificate(bound=bound, gradient_norm=gnorm, gradient_bound=gradient_bound,
                      witness_norm=witness_norm, residual=residual, steps=steps, update=update,
                      damping=damping, linearized=linearized, num_retain=int(x.shape[0]),
                      dtype=str(grad.dtype), basis=Basis.MATRIX_FREE, rounding=math.nan,
                      stats_sha256="", witness=None if d is None else np.asarray(d))


def _certificate(*, bound, gradient_norm, gradient_bound, witness_norm, residual, steps, update,
                 damping, linearized, num_retain, dtype, basis, rounding, stats_sha256,
                 witness) -> Certificate:
  if not math.isfinite(bound):
    raise validate.SolveError("the certificate's bound is non-finite, so nothing can be "
                              "certified")
  relative = bound / update if update > 0 else math.inf
  retrain_relative = bound / (update - bound) if update > bound else math.inf
  scope = ("the linearised model in use (linearised fine-tuning)" if linearized else
           "the linearised model at w0 only; the network was fine-tuned in the standard mode, "
           "so this is a distance measure and certifies nothing about the network")
  exact = ("; the bound holds in exact arithmetic for the ridge model of D_r's Gram "
           "statistics (rounding term included)" if basis == Basis.GRAM_STATISTICS else
           "; float round-off of the network's evaluation is not bounded")
  statement = (f"‖w − w_r‖₂ ≤ {bound:.3g} ({relative:.3g} of ‖w − w0‖₂), where w_r is the "
               f"minimiser of the retain objective of {scope}, with λ = {float(damping):g} "
               f"and w0 the pre-trained backbone's trainable parameters (a backbone that saw "
               f"the forgotten data still knows it){exact}")
  return Certificate(gradient_norm=gradient_norm, damping=float(damping), distance_bound=bound,
                     update_norm=update, relative_bound=relative,
                     retrain_relative_bound=retrain_relative, linearized=bool(linearized),
                     num_retain=num_retain, dtype=dtype, statement=statement,
                     gradient_bound=gradient_bound, witness_norm=witness_norm,
                     witness_residual=residual, witness_iterations=int(steps), basis=basis,
                     rounding=rounding, stats_sha256=stats_sha256,
                     witness=None if witness is None else np.asarray(witness))


def logit_bound(apply_fn: Callable, params_init: PyTree, x, certificate: Certificate, *,
                batch_size: Optional[int] = 256) -> np.ndarray:
  """Per input, a bound on how far its logits under f_lin can be from retraining's.

  |f_lin(w, x) − f_lin(w_r, x)|₂ ≤ ‖J(x)‖₂ · ‖w − w_r‖₂ (`LOGIT_NORM`), with ‖J(x)‖₂ the
  spectral norm of the C×p Jacobian at w0 (square root of the largest eigenvalue of the C×C
  block J(x)J(x)ᵀ).

  Returns:
    [n] float64 bounds.
  """
  x = jnp.asarray(x)
  rows = ntk.jacobian_rows(apply_fn, params_init, x, batch_size=batch_size)  # [n, C, p]
  blocks = np.einsum("ncp,ndp->ncd", np.asarray(rows, np.float64), np.asarray(rows, np.float64))
  spectral = np.sqrt(linalg.spectral_norms_squared(blocks))
  return spectral * certificate.distance_bound
