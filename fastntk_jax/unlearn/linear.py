"""The model the update is exact for: the network linearised at w0 (docs/derivation.md §5).

    f_lin(w, x) = f(w0, x) + J(w0, x)(w - w0)
    L_S(w) = ½ Σ_{i∈S} ‖f_lin(w, x_i) - one_hot(y_i)‖² + ½ λ ‖w - w0‖²

L_D's minimiser is w_D, L_{D_r}'s is w_r, and the Fast-NTK update maps the first to the
second exactly. `linearize` gives f_lin for any `apply_fn`; `ridge_solution` gives the
minimiser in closed form from the Gram statistics the primal solver uses (one Jacobian pass
instead of epochs of training); `Linearized` wraps a Flax model so the training and evaluation
code (`fastntk_jax.train`) runs on f_lin unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fastntk_jax import linalg
from fastntk_jax import ntk
from fastntk_jax.models.layers import LINEARIZATION_POINT

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]

def linearize(apply_fn: ApplyFn, w0: PyTree) -> ApplyFn:
  """f_lin: `(w, x) -> f(w0, x) + J(w0, x)(w - w0)`, one forward-mode pass (`jax.jvp`).

  Args:
    apply_fn: `(params, x) -> logits [n, C]` over the trainable pytree.
    w0: the linearisation point (pytree like params).

  Returns:
    `apply_lin(w, x) -> logits [n, C]`, linear (affine) in w, equal to apply_fn at w0.
  """
  def apply_lin(w, x):
    tangent = jax.tree_util.tree_map(lambda a, b: (a - b).astype(b.dtype), w, w0)
    y0, dy = jax.jvp(lambda p: apply_fn(p, x), (w0,), (tangent,))
    return y0 + dy
  return apply_lin


def ridge_solution(w0: PyTree, stats: Sequence[tuple], damping) -> PyTree:
  """argmin L_S in closed form: w0 + (Σ G + λI)⁻¹ Σ b over the Gram statistics of S's parts.

  Args:
    w0: the linearisation point.
    stats: [(G [p, p], b [p]), ...] from `ntk.gram_stats` at w0, one per part of S (e.g.
      D_r and D_f for Full; D_r alone for Retrain).
    damping: λ (the same as the update's).

  Returns:
    Pytree like `w0`.

  Raises:
    SolveError: G + λI is not positive definite, or κ·ε > 1 (`linalg.check_precision`).
  """
  g = sum(jnp.asarray(s[0]) for s in stats)
  b = sum(jnp.asarray(s[1]) for s in stats)
  step, info = linalg.ridge_solve(g, b, damping)
  linalg.check_precision(jnp.where(info.finite, info.kappa, jnp.nan), g.dtype,
                         what="the ridge solution of the linearised model", damping=damping)
  return ntk.apply_delta(w0, step)


class Linearized:
  """A Flax model's first-order expansion in its `trainable` collection, with the module's
  `apply(variables, x, train=False, mutable=False)` signature.

  `variables` holds the frozen collections as for the model itself (BatchNorm statistics are
  those at w0: inference mode, whatever `train` says), the trainable params `w`, and w0 under
  `LINEARIZATION_POINT`.
  """

  def __init__(self, model):
    self.model = model

  def apply(self, variables, x, train: bool = False, mutable=False):
    del train  # f_lin has no batch statistics
    base = {k: v for k, v in variables.items() if k not in ("trainable", LINEARIZATION_POINT)}
    apply_fn = lambda w, xx: self.model.apply({**base, "trainable": w}, xx, train=False)
    out = linearize(apply_fn, variables[LINEARIZATION_POINT])(variables["trainable"], x)
    if mutable:  # nothing is updated: the statistics stay those at w0
      # Flax's forms: True (every collection), one name, or a sequence of names.
      names = (list(variables) if mutable is True
               else [mutable] if isinstance(mutable, str) else list(mutable))
      return out, {k: variables[k] for k in names if k in variables}
    return out

  def __hash__(self):
    return hash(("Linearized", self.model))

  def __eq__(self, other):
    return isinstance(other, Linearized) and other.model == self.model
