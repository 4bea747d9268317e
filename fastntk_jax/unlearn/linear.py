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
from fastntk_jax.models import trainable as trainable_lib
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


# --------------------------------------------------------------------------------------
# Many w0 that differ only in the head: the tables of f_lin from one pass through the body.
# --------------------------------------------------------------------------------------

HEAD = "head"
head_inputs = trainable_lib.head_inputs


@jax.tree_util.register_pytree_node_class
class HeadFactors:
  """f(w, x) = φ(x; θ)·W + b for a trainable collection {θ (the body), head: {kernel W [d, C],
  bias b [C]}}: for every w0 that shares θ0 and differs in the head (a fresh head per seed),
  f(w0, x) = φ0 W + b and J(w0, x) = [W-contracted ∂φ/∂θ | φ ⊗ I | I], so the features φ0
  [n, d] and their Jacobian ∂φ/∂θ [n, d, p_θ] at θ0, computed once, give each seed's table
  by products, with no pass through the network. `tables(head)` is pure and vmaps over
  heads; `check` compares it with the network's own table."""

  def __init__(self, features, feature_jacobian, segments, num_classes: int):
    self.features, self.feature_jacobian = features, feature_jacobian
    self.segments, self.num_classes = segments, num_classes

  def tree_flatten(self):
    return (self.features, self.feature_jacobian), (tuple(self.segments), self.num_classes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, list(aux[0]), aux[1])

  def tables(self, head: dict, dtype=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(f(w0) [n, C], J(w0) [n, C, p]) at w0 = {θ0, head}, columns in the `ravel_pytree`
    order of the trainable collection, in `dtype` (default: the features')."""
    dtype = dtype or self.features.dtype
    phi = self.features.astype(dtype)
    kernel, bias = head["kernel"].astype(dtype), head["bias"].astype(dtype)
    n, c = phi.shape[0], self.num_classes
    with jax.default_matmul_precision("highest"):
      f0 = phi @ kernel + bias
      body = jnp.einsum("ndj,dc->ncj", self.feature_jacobian.astype(dtype), kernel)
    eye = jnp.eye(c, dtype=dtype)
    head_cols = {"bias": jnp.broadcast_to(eye, (n, c, c)),
                 "kernel": jnp.einsum("nd,ce->ncde", phi, eye).reshape(n, c, -1)}
    cols = []
    for kind, name, lo, hi in self.segments:
      cols.append(body[:, :, lo:hi] if kind == "body" else head_cols[name])
    return f0, jnp.concatenate(cols, axis=2)

  def matches(self, model, frozen: dict, w0: PyTree, x, *, batch_size: int = 256) -> bool:
    """Whether the tables at w0 are the network's: f(w0) on every row and J(w0) on a few rows
    spread over them (first, last, between), to 1e-4 of their scale. A trainable acting after
    the head (a temperature, a gate), or a nonlinearity after it that some row reaches (a
    clip), makes them differ, and the factors must not be used."""
    base = {k: v for k, v in frozen.items() if k not in ("trainable", LINEARIZATION_POINT)}
    apply_fn = lambda w, xx: model.apply({**base, "trainable": w}, xx, train=False)
    xs = jnp.asarray(x)
    f0, jac = self.tables(w0[HEAD])
    logits = ntk.apply_rows(apply_fn, w0, xs, batch_size=batch_size)
    rows = _probe_rows(len(x))
    ref = ntk.jacobian_rows(apply_fn, w0, xs[rows], batch_size=batch_size)
    def close(a, b):
      return bool(jnp.all(jnp.abs(a - b) <= 1e-4 * (float(jnp.max(jnp.abs(b))) + 1.0)))
    return close(f0, logits.astype(f0.dtype)) and close(jac[rows], ref.astype(jac.dtype))


def head_factors(model, frozen: dict, w0: PyTree, x, *, batch_size: int = 256,
                 max_bytes: int = TABULATE_MAX_BYTES):
  """`HeadFactors` of `model` at the body of `w0` on inputs `x` [n, ...], or None when the
  trainable collection is not {body..., head: {bias, kernel [d, C]}} with f = φW + b (checked
  at w0 on the first rows), or when ∂φ/∂θ [n, d, p_θ] would exceed `max_bytes`.

  Args:
    model: the Flax model. frozen: its frozen collections (without "trainable").
    w0: a trainable collection (its head is only used for the check).
    x: the inputs whose rows are tabulated.
  """
  base = {k: v for k, v in frozen.items() if k not in ("trainable", LINEARIZATION_POINT)}
  if not isinstance(w0, dict) or HEAD not in w0 or set(w0[HEAD]) != {"bias", "kernel"}:
    return None
  kernel, bias = w0[HEAD]["kernel"], w0[HEAD]["bias"]
  if jnp.ndim(kernel) != 2 or jnp.shape(bias) != (jnp.shape(kernel)[1],):
    return None
  d, c = jnp.shape(kernel)
  body = {k: v for k, v in w0.items() if k != HEAD}
  p_body = sum(int(jnp.size(l)) for l in jax.tree_util.tree_leaves(body))
  itemsize = jnp.result_type(*jax.tree_util.tree_leaves(w0)).itemsize
  if itemsize * int(len(x)) * int(d) * max(p_body, 1) > max_bytes:
    return None
  phi, _ = head_inputs(model, {**base, "trainable": w0}, jnp.asarray(x[:2]))
  if phi is None or phi.ndim != 2 or phi.shape[-1] != d:
    return None

  def features(theta, xx):
    return head_inputs(model, {**base, "trainable": {**theta, HEAD: w0[HEAD]}}, xx)[0]

  xs = jnp.asarray(x)
  phi_all = ntk.apply_rows(features, body, xs, batch_size=batch_size)
  dphi = (ntk.jacobian_rows(features, body, xs, batch_size=batch_size) if p_body
          else jnp.zeros((len(x), d, 0), phi_all.dtype))
  # Columns of the collection's ravel order: its top-level keys sorted, the head's bias then
  # kernel; the body's Jacobian columns follow the same sorted keys without the head.
  segments, lo = [], 0
  for key in sorted(w0):
    if key == HEAD:
      segments += [("head", "bias", None, None), ("head", "kernel", None, None)]
    else:
      size = sum(int(jnp.size(l)) for l in jax.tree_util.tree_leaves(w0[key]))
      segments.append(("body", key, lo, lo + size))
      lo += size
  factors = HeadFactors(phi_all, dphi, segments, int(c))
  return factors if factors.matches(model, frozen, w0, x, batch_size=batch_size) else None


def _probe_rows(n: int, count: int = 4) -> np.ndarray:
  return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(int))




def put_table(model, frozen: dict, w0, x, f0, jacobian) -> None:
  """Primes `tabulate`'s cache: the table of the linearised `model` at `w0` on the rows of
  the array `x` (this very object) is (f0 [n, C], J [n, C, p]), e.g. from `HeadFactors`."""
  base = {k: v for k, v in frozen.items() if k not in ("trainable", LINEARIZATION_POINT)}
  model = model.model if isinstance(model, Linearized) else model
  keep = (model, jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(w0), x)
  key = (id(model), tuple(map(id, keep[1])), tuple(map(id, keep[2])), id(x))
  _TABLES.append((key, keep, (f0, jacobian)))
  del _TABLES[:-_TABLES_KEPT]
