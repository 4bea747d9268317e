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
    witness_iterations: conjugate-gradient steps that made d (0: given or none).
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


def _retain_hvp(apply_fn: Callable, *, damping: float, batch_size: Optional[int], dtype):
  """(w0, x, v [p]) -> (J_rᵀJ_r + λI) v: the Hessian of L_r, matrix-free (traceable)."""
  lam = jnp.asarray(damping, dtype)

  def hvp(w0, x, v):
    unravel = ravel_pytree(w0)[1]
    jv = ntk.jvp_rows(apply_fn, w0, x, unravel(v), batch_size=batch_size).astype(dtype)
    back = ntk.vjp_rows(apply_fn, w0, x, jv, batch_size=batch_size)
    return ravel_pytree(back)[0].astype(dtype) + lam * v
  return hvp


def certify(apply_fn: Callable, params_init: PyTree, params: PyTree, retain, *,
            num_classes: int, damping: float, batch_size: Optional[int] = 256,
            linearized: bool = True, dtype=None, witness=None,
            witness_iterations: int = 100, witness_tol: float = 1e-10,
            retain_gram=None) -> Certificate:
  """Certifies how close `params` are to retraining the linearised model on D_r alone.

  Args:
    apply_fn: `(params, x) -> logits [n, C]`, the network whose Jacobian at w0 defines
      f_lin (trainable pytree only; frozen weights and BatchNorm statistics closed over).
    params_init: w0, the linearisation point (the fine-tuning's start).
    params: w, e.g. the Fast-NTK update's result.
    retain: D_r = (x [n, ...], y [n] int labels in [0, C)).
    num_classes: C. damping: λ > 0, the update's (and the fine-tuning's) ridge.
    batch_size: samples per streamed block.
    linearized: whether `params` come from linearised fine-tuning (see `Certificate`).
    dtype: accumulation dtype (default: the widest of the params; float64 needs x64).
    witness: d [p] to bound with (e.g. a stored certificate's); None: made here by up to
      `witness_iterations` conjugate-gradient steps (stopping at relative residual
      `witness_tol`); `witness_iterations=0`: the gradient bound alone.
    retain_gram: G_r = J_rᵀJ_r [p, p] at w0 when the caller holds it (e.g. linearised
      fine-tuning in closed form): the witness is then d = (G_r + λI)⁻¹∇L_r(w), one Cholesky
      solve in float64 (`linalg.ridge_solve`), instead of the CG steps. The bound holds
      whatever d is: it is checked with H d computed here.

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
  out = jax.eval_shape(apply_fn, params_init, jnp.asarray(x)[:1])
  if getattr(out, "shape", None) != (1, num_classes):
    raise ValueError(f"apply_fn must return logits [n, num_classes={num_classes}]; on one "
                     f"input it returned shape {getattr(out, 'shape', type(out).__name__)}")
  grad = retain_gradient(apply_fn, params_init, params, (x, y), num_classes=int(num_classes),
                         damping=float(damping), batch_size=batch_size, dtype=dtype)
  gnorm = float(jnp.linalg.norm(grad))
  if not math.isfinite(gnorm):
    raise validate.SolveError("the retain gradient is non-finite: the network's logits or "
                              "Jacobian at w0 overflow on D_r, so nothing can be certified")
  gradient_bound = gnorm / float(damping)
  p = int(grad.shape[0])
  steps, d = 0, None
  if witness is None and retain_gram is not None:
    with linalg.enable_x64():  # a float32 witness loosens the bound (still valid)
      witness = np.asarray(linalg.ridge_solve(
          jnp.asarray(np.asarray(retain_gram, np.float64)),
          jnp.asarray(np.asarray(grad, np.float64)), float(damping))[0])
  if witness is not None:
    d = jnp.asarray(np.asarray(witness), grad.dtype)
    if d.shape != (p,) or not bool(jnp.all(jnp.isfinite(d))):
      raise ValueError(f"witness must be a finite vector of shape ({p},) (the ravelled "
                       f"params), got shape {tuple(d.shape)}")
  elif (isinstance(witness_iterations, bool)
        or not isinstance(witness_iterations, (int, np.integer)) or witness_iterations < 0):
    raise ValueError(f"witness_iterations must be an int >= 0, got {witness_iterations!r}")
  if d is not None or witness_iterations > 0:
    hvp = _retain_hvp(apply_fn, damping=float(damping), batch_size=batch_size,
                      dtype=grad.dtype)
    w0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, grad.dtype), params_init)
    x = jnp.asarray(x)
    if d is None:  # conjugate gradients on H d = ∇L_r(w), matrix-free, in one program
      cg = jax.jit(lambda w0, x, g: linalg.conjugate_gradients(
          lambda v: hvp(w0, x, v), g, tol=float(witness_tol), maxiter=int(witness_iterations)))
      d, _, steps = cg(w0, x, grad)
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
  update = float(np.linalg.norm(np.asarray(ravel_pytree(params)[0], np.float64)
                                - np.asarray(ravel_pytree(params_init)[0], np.float64)))
  relative = bound / update if update > 0 else math.inf
  retrain_relative = bound / (update - bound) if update > bound else math.inf
  scope = ("the linearised model in use (linearised fine-tuning)" if linearized else
           "the linearised model at w0 only; the network was fine-tuned in the standard mode, "
           "so this is a distance measure and certifies nothing about the network")
  statement = (f"‖w − w_r‖₂ ≤ {bound:.3g} ({relative:.3g} of ‖w − w0‖₂), where w_r is the "
               f"minimiser of the retain objective of {scope}, with λ = {float(damping):g} "
               f"and w0 the pre-trained backbone's trainable parameters (a backbone that saw "
               f"the forgotten data still knows it)")
  return Certificate(gradient_norm=gnorm, damping=float(damping), distance_bound=bound,
                     update_norm=update, relative_bound=relative,
                     retrain_relative_bound=retrain_relative, linearized=bool(linearized),
                     num_retain=int(x.shape[0]), dtype=str(grad.dtype), statement=statement,
                     gradient_bound=gradient_bound, witness_norm=witness_norm,
                     witness_residual=residual, witness_iterations=int(steps),
                     witness=None if d is None else np.asarray(d))


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
