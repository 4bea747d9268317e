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

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


TABLE = "linear_table"  # the frozen collection holding a `Tabulated` model's rows

# The largest Jacobian table `tabulate` builds (bytes of J [m, C, p]); above it, f_lin is
# evaluated by a forward-mode pass per batch instead.
TABULATE_MAX_BYTES = 2 ** 30


class Tabulated:
  """f_lin on a fixed set of m inputs, tabulated: its "inputs" are row indices [B] (int32)
  into f(w0) [m, C] and J(w0) [m, C, p], held in the frozen collection `TABLE`, so that
  each evaluation is one [B·C, p] product instead of a forward and a forward-mode pass
  through the network. The same affine function as `Linearized` on those inputs (up to
  round-off), with the `apply(variables, rows, train=False)` signature."""

  def __init__(self, model):
    self.model = model

  def apply(self, variables, rows, train: bool = False, mutable=False):
    del train
    table = variables[TABLE]
    delta = jnp.concatenate([
        jnp.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(variables["trainable"]),
                                         jax.tree_util.tree_leaves(
                                             variables[LINEARIZATION_POINT]))])
    rows = rows.astype(jnp.int32)
    out = table["f0"][rows] + jnp.einsum("bcp,p->bc", table["jacobian"][rows],
                                         delta.astype(table["jacobian"].dtype))
    return (out, {}) if mutable else out

  def __hash__(self):
    return hash(("Tabulated", self.model))

  def __eq__(self, other):
    return isinstance(other, Tabulated) and other.model == self.model


@functools.lru_cache(maxsize=16)
def _table_fn(model):
  """`(frozen, w0, x) -> (f(w0, x) [m, C], J(w0, x) [m, C, p])`, compiled once per model (and
  input shape)."""
  @jax.jit
  def table(base, w0, x):
    apply_fn = lambda w, xx: model.apply({**base, "trainable": w}, xx, train=False)
    return ntk.apply_rows(apply_fn, w0, x), ntk.jacobian_rows(apply_fn, w0, x)
  return table


# The tables of the last inputs tabulated, by the identity of (model, frozen leaves, w0
# leaves, inputs), the objects kept alive beside them so that no identity is reused: the
# methods of one seed train on the same D_r and D_f arrays at the same w0, so each table
# is computed once per seed.
_TABLES: list = []
_TABLES_KEPT = 8


def _rows_table(model, base: dict, w0, x):
  keep = (model, jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(w0), x)
  key = (id(model), tuple(map(id, keep[1])), tuple(map(id, keep[2])), id(x))
  for k, _, value in _TABLES:
    if k == key:
      return value
  value = _table_fn(model)(base, w0, jnp.asarray(x))
  _TABLES.append((key, keep, value))
  del _TABLES[:-_TABLES_KEPT]
  return value


def tabulate(model, frozen: dict, inputs: Sequence, *,
             max_bytes: int = TABULATE_MAX_BYTES):
  """The `Tabulated` form of a `Linearized` model over the rows of `inputs` (arrays [n_k,
  ...], stacked in order), or None when `model` is not linearised or J would exceed
  `max_bytes`.

  Returns:
    (Tabulated model, its frozen collections (with `TABLE`), [the row indices of each input,
    int32 [n_k]]) or None.
  """
  if not isinstance(model, Linearized):
    return None
  x = inputs[0]
  m = sum(len(a) for a in inputs)
  w0 = frozen[LINEARIZATION_POINT]
  p = sum(int(jnp.size(l)) for l in jax.tree_util.tree_leaves(w0))
  base = {k: v for k, v in frozen.items() if k not in ("trainable", LINEARIZATION_POINT)}
  num_classes = jax.eval_shape(lambda: model.model.apply({**base, "trainable": w0}, x[:1],
                                                         train=False)).shape[-1]
  itemsize = jnp.result_type(*jax.tree_util.tree_leaves(w0)).itemsize
  if itemsize * int(m) * int(num_classes) * p > max_bytes:
    return None
  parts = [_rows_table(model.model, base, w0, a) for a in inputs]
  table = {"f0": jnp.concatenate([f for f, _ in parts]),
           "jacobian": jnp.concatenate([j for _, j in parts])}
  starts = [0]
  for a in inputs:
    starts.append(starts[-1] + len(a))
  rows = [jnp.arange(a, b, dtype=jnp.int32) for a, b in zip(starts[:-1], starts[1:])]
  return Tabulated(model.model), {**frozen, TABLE: table}, rows


def tabulated_streams(model, frozen: dict, streams: dict, what: str = "fit"):
  """`objectives.fit_objective`'s model, frozen collections and streams with a linearised model
  tabulated on the streams' inputs (`tabulate`): (the `Tabulated` model, its frozen
  collections, the streams with row indices for inputs), or None when `model` is not
  linearised or its table does not fit. A stream given as `epoch -> (x, y)` must return the
  same x every epoch (only its labels may be drawn anew)."""
  if not isinstance(model, Linearized):
    return None
  first = {name: (s(0) if callable(s) else s) for name, s in streams.items()}
  table = tabulate(model, frozen, [np.asarray(first[name][0]) for name in streams])
  if table is None:
    return None
  tab_model, tab_frozen, rows = table
  out = {}
  for (name, stream), index in zip(streams.items(), rows):
    index = np.asarray(index)
    if callable(stream):
      def relabelled(epoch, stream=stream, x0=first[name][0], index=index, name=name):
        x, y = stream(epoch)
        if x is not x0 and not np.array_equal(x, x0):
          raise ValueError(f"{what}: the stream {name!r} gives other inputs in epoch "
                           f"{epoch + 1} (a stream drawn anew may change its labels only)")
        return index, y
      out[name] = relabelled
    else:
      out[name] = (index, stream[1])
  return tab_model, tab_frozen, out


@functools.lru_cache(maxsize=16)
def _rows_gradient_fn(per_example_loss: Callable):
  @jax.jit
  def rows_gradients(logits, labels, jacobian):
    # ∂ℓ/∂w = J_iᵀ ∂ℓ/∂f_i for f_lin: the loss's gradient in the logits through the table.
    dlogits = jax.vmap(jax.grad(lambda z, t: per_example_loss(z[None], t[None])[0]))(
        logits, labels)
    return jnp.einsum("bc,bcp->bp", dlogits, jacobian)
  return rows_gradients


def tabulated_gradients(model, trainable, frozen: dict, x, y, per_example_loss: Callable):
  """The gradient of each example's loss over the trainable collection, through the table of
  a linearised model ([n, p] float32, `ravel_pytree` order, like
  `objectives.per_example_gradients`), or None when `model` is not linearised or its table does
  not fit. `per_example_loss(logits [B, C], labels [B]) -> [B]` (a module-level function,
  so that its compiled gradient is reused)."""
  table = tabulate(model, frozen, [x]) if len(x) else None
  if table is None:
    return None
  tab_model, tab_frozen, (rows,) = table
  logits = tab_model.apply({**tab_frozen, "trainable": trainable}, rows)
  jac = tab_frozen[TABLE]["jacobian"]
  return np.asarray(_rows_gradient_fn(per_example_loss)(logits, jnp.asarray(y), jac),
                    np.float32)
