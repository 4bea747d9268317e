"""Input checks shared by every entry point (the one-shot update, the stream, the pipeline).

Checks on concrete values run in NumPy, so they also run at trace time under `jax.jit` when
the data are closed over (a jnp reduction there would be staged and fail). Checks that need
traced values go through `runtime_check`: an error raised when the value is known, at run
time (a host callback) when it is traced. One rule for the damping λ (`allowed_solvers`); the
one rule for precision is `linalg.check_precision`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.enums import KernelImplementation, LinearizationPoint, Solver, parse
# The errors and the run-time checks are the linear-algebra home's (its precision rule raises
# them); the input checks below use them too.
from fastntk_jax.linalg import PrecisionWarning, SolveError, is_concrete, runtime_check

PyTree = Any


def where(path) -> str:
  return jax.tree_util.keystr(path) or "the root"


def check_finite(name: str, tree) -> None:
  """Raises ValueError naming the first leaf of `tree` holding NaN/inf: now for concrete
  leaves, when the computation runs for traced ones."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      if is_concrete(leaf):
        if not np.all(np.isfinite(np.asarray(leaf))):
          raise ValueError(f"{name} contains non-finite values (NaN/inf) at {where(path)}")
      else:
        runtime_check(jnp.all(jnp.isfinite(leaf)), ValueError,
                      f"{name} contains non-finite values (NaN/inf) at {where(path)}")


def check_labels(name: str, y, num_classes: int) -> None:
  """Labels in [0, C): checked now when concrete, when the computation runs when traced."""
  if not np.size(y):
    return
  if is_concrete(y):
    y = np.asarray(y)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(f"{name} labels must lie in [0, {num_classes}), found range [{lo}, {hi}]")
  else:
    runtime_check((jnp.min(y) >= 0) & (jnp.max(y) < num_classes), ValueError,
                  f"{name} labels must lie in [0, {num_classes}), found range [{{}}, {{}}]",
                  jnp.min(y), jnp.max(y))


def check_split(name: str, split, num_classes: int) -> tuple[Any, Any]:
  """(x [n, ...], y [n] int labels in [0, C)), non-empty; returns (x, y)."""
  if not isinstance(split, (tuple, list)) or len(split) != 2:
    raise TypeError(f"{name} must be a pair (x, y) of inputs and integer labels, "
                    f"got {type(split).__name__}")
  x, y = split
  if not hasattr(x, "shape") or not hasattr(y, "shape"):
    raise TypeError(f"{name}: x and y must be arrays, got {type(x).__name__}, "
                    f"{type(y).__name__}")
  if y.ndim != 1:
    raise ValueError(f"{name}: labels y must be 1-D integer class ids, got shape {y.shape}")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise TypeError(f"{name}: labels y must be integers (class ids), got dtype {y.dtype}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
  if x.shape[0] == 0:
    raise ValueError(f"{name} set is empty: nothing to "
                     + ("forget" if name == "forget" else "retain (forget set = all data?)"))
  check_labels(name, y, num_classes)
  check_finite(f"{name} inputs", x)
  return x, y


def _listed(indices, limit: int = 10) -> str:
  indices = [int(i) for i in indices]
  return str(indices[:limit])[:-1] + (", ...]" if len(indices) > limit else "]")


def _near_pairs(x_a, y_a, x_b, y_b, tolerance: float) -> list:
  """(i, j) with y_a[i] == y_b[j] and max|x_a[i] - x_b[j]| <= tolerance ([n, d] inputs).

  Candidates come from a sort along a random direction r (two such rows project at most
  tolerance·‖r‖₁ apart), so the cost is O(n log n) plus the candidates' own comparisons,
  not O(n_a·n_b·d)."""
  d = x_a.shape[1]
  r = np.random.default_rng(0).standard_normal(d)
  reach = tolerance * np.abs(r).sum() * (1 + 1e-9) + 1e-300
  pa, pb = x_a.astype(np.float64) @ r, x_b.astype(np.float64) @ r
  order = np.argsort(pa)
  lo = np.searchsorted(pa[order], pb - reach, side="left")
  hi = np.searchsorted(pa[order], pb + reach, side="right")
  pairs = []
  for j in range(x_b.shape[0]):
    for i in order[lo[j]:hi[j]]:
      if y_a[i] == y_b[j] and np.abs(x_a[i] - x_b[j]).max() <= tolerance:
        pairs.append((int(i), j))
  return pairs


def _rows(x) -> np.ndarray:
  """Inputs as float64 rows [n, d], -0.0 made 0.0: samples compare by value, not by bytes."""
  return np.ascontiguousarray(np.asarray(x, np.float64)).reshape(np.shape(x)[0], -1) + 0.0


def matching_samples(a, b, *, tolerance: float = 0.0) -> list:
  """The pairs (i, j) of samples a[i], b[j] that are the same sample: equal labels and inputs
  equal in value (`tolerance` 0; dtypes aside) or within `tolerance` in every entry. `a`, `b`:
  (x [n, ...], y [n]) host arrays; `b` is the smaller set (its rows are kept in memory, `a`'s
  are read one at a time). `a` with itself gives each pair once, i < j."""
  (x_a, y_a), (x_b, y_b) = a, b
  same = a is b
  y_a, y_b = np.asarray(y_a, np.int64), np.asarray(y_b, np.int64)
  if tolerance > 0:
    return [(i, j) for i, j in _near_pairs(_rows(x_a), y_a, _rows(x_b), y_b, tolerance)
            if not same or i < j]
  rows_b = _rows(x_b)
  index = {}
  for j in range(rows_b.shape[0]):
    index.setdefault(rows_b[j].tobytes() + y_b[j].tobytes(), []).append(j)
  x_a = np.asarray(x_a)
  pairs = []
  for i in range(x_a.shape[0]):
    key = _rows(x_a[i:i + 1])[0].tobytes() + y_a[i].tobytes()
    pairs += [(i, j) for j in index.get(key, ()) if not same or i < j]
  return pairs


def check_disjoint(retain, forget, *, tolerance: float = 0.0) -> None:
  """Refuses a forget set that lists a sample twice, or a sample that `retain` also holds.

  A sample is an (input, label) pair. With `tolerance` 0 rows match exactly; with
  `tolerance` > 0 two samples of the same label match when their inputs differ by at most
  `tolerance` in every entry (near-duplicates, found through a sort: `_near_pairs`). On
  concrete data it checks now; on traced data (under `jax.jit` or `vmap`) when the
  computation runs, on the host (`jax.debug.callback`): the error then arrives as a
  `jax.errors.JaxRuntimeError` carrying this message.

  Raises:
    ValueError: naming the forget rows (and the retain rows they match).
  """
  if not all(is_concrete(a) for pair in (retain, forget) for a in pair):
    import jax  # pylint: disable=g-import-not-at-top
    jax.debug.callback(lambda xr, yr, xf, yf: check_disjoint((xr, yr), (xf, yf),
                                                              tolerance=tolerance),
                       *retain, *forget)
    return
  near = f" within duplicate_tolerance={tolerance:g}" if tolerance else ""
  repeated = matching_samples(forget, forget, tolerance=tolerance)
  if repeated:
    raise ValueError(f"the forget set lists {len(repeated)} sample(s) more than once{near} "
                     f"(forget rows {_listed(j for _, j in repeated)} repeat rows "
                     f"{_listed(i for i, _ in repeated)}): each sample of D must be forgotten "
                     "once; drop the repeats")
  shared = matching_samples(retain, forget, tolerance=tolerance)
  if shared:
    raise ValueError(f"{len(shared)} sample(s) of the forget set are also in the retain set"
                     f"{near} (forget rows {_listed(j for _, j in shared)}, retain rows "
                     f"{_listed(i for i, _ in shared)}): a sample left in the retain set is "
                     "not forgotten; remove it from the retain set")


def check_params(params_init: PyTree, params: PyTree) -> None:
  """Same structure, shapes and dtypes; non-empty; finite."""
  s_init, s_trained = (jax.tree_util.tree_structure(t) for t in (params_init, params))
  if s_init != s_trained:
    raise ValueError("params and params_init have different pytree structure:\n"
                     f"  params_init: {s_init}\n  params:      {s_trained}")
  if not jax.tree_util.tree_leaves(params):
    raise ValueError("params is an empty pytree: there is nothing trainable to update")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_init),
                          jax.tree_util.tree_leaves(params)):
    at = where(path)
    for leaf in (a, b):
      if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(f"every params leaf must be a floating-point array; at {at} got "
                        f"{type(leaf).__name__}" + (f" of dtype {leaf.dtype}"
                                                    if hasattr(leaf, "dtype") else ""))
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"params and params_init differ in shape at {at}: "
                       f"{jnp.shape(b)} vs {jnp.shape(a)}")
    if jnp.result_type(a) != jnp.result_type(b):
      raise TypeError(f"params and params_init differ in dtype at {at}: "
                      f"{jnp.result_type(b)} vs {jnp.result_type(a)}; cast one to the other")
  check_finite("params", params)
  check_finite("params_init", params_init)


def check_positive_int(name: str, value, *, allow_none: bool = False) -> Optional[int]:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                     f"got {value!r}")
  return int(value)


def check_logits(apply_fn, params: PyTree, x, num_classes: int):
  """The shape and dtype of `apply_fn(params, x[:1])` (traced abstractly, no computation).

  Raises:
    ValueError: it is not [1, num_classes] (logits must be [n, C]).
  """
  out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]),
                                                              x.dtype))
  if getattr(out, "shape", None) != (1, num_classes):
    raise ValueError(f"apply_fn(params, x[:1]) returned shape "
                     f"{getattr(out, 'shape', type(out).__name__)}; expected (1, num_classes="
                     f"{num_classes}): logits must be [n, C]")
  return out


def check_damping(damping) -> None:
  """λ must be a real, finite number >= 0: checked now when concrete, when the computation
  runs when traced."""
  if isinstance(damping, (bool, str, complex)) or not (
      isinstance(damping, (int, float, np.number)) or hasattr(damping, "dtype")):
    raise TypeError(f"damping must be a real number, got {type(damping).__name__} {damping!r}")
  if hasattr(damping, "dtype") and not (jnp.issubdtype(damping.dtype, jnp.floating)
                                        or jnp.issubdtype(damping.dtype, jnp.integer)):
    raise TypeError(f"damping must be a real number, got dtype {damping.dtype}")
  if np.ndim(damping) != 0:
    raise ValueError(f"damping must be a scalar, got shape {np.shape(damping)}")
  if is_concrete(damping):
    if not np.isfinite(float(damping)) or float(damping) < 0:
      raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
  else:
    runtime_check(jnp.isfinite(damping) & (damping >= 0), ValueError,
                  "damping must be a finite number >= 0, got {}", damping)


def allowed_solvers(solver: Solver, damping, *, num_params: int, num_outputs: int,
                    cg_budget: int, cg_dim: int) -> dict[str, str]:
  """The one damping rule, and cg's budget rule: which solvers may run.

  λ = 0 (concrete) leaves the ridge systems without regularisation: they are solvable only
  in output space, where Θ (n·C × n·C) can be invertible when p >= n·C. The primal's Grams
  (p × p, rank <= n_r·C < p) are then singular, and so is cg's parameter-space system, which
  cg uses when p <= n·C; the stream (primal) loses rank with every request. `auto` skips cg
  when its iteration budget is below the system's dimension (the exact-arithmetic bound),
  since it could then stop before its tolerance.

  Returns:
    {solver value: why `auto` must not pick it}.

  Raises:
    ValueError: `solver` is named explicitly but excluded by the damping rule.
  """
  excluded = {}
  if is_concrete(damping) and float(damping) == 0.0:
    if num_params < num_outputs:
      raise ValueError(
          f"damping=0 makes the system singular: p={num_params} trainable parameters < "
          f"n*C={num_outputs} outputs, so the kernel has rank <= p; use damping > 0")
    why = ("damping=0 leaves its p x p Gram singular (rank <= n_r*C < p); use damping > 0 "
           "(or, for a one-shot update, solver='dual')")
    excluded[Solver.PRIMAL.value] = why
    if num_params <= num_outputs:  # cg would work in parameter space
      excluded[Solver.CG.value] = why
  if cg_budget < cg_dim:
    excluded.setdefault(Solver.CG.value, f"cg_maxiter={cg_budget} is below the system's "
                        f"dimension {cg_dim}, so it may stop before its tolerance")
  if solver != Solver.AUTO and solver.value in excluded and "damping=0" in excluded[solver.value]:
    raise ValueError(f"solver='{solver.value}' with {excluded[solver.value]}")
  return excluded


@dataclasses.dataclass(frozen=True)
class Options:
  """The validated options of `make_forgetter` (see its docstring)."""
  num_classes: int
  damping: Any
  solver: Solver
  batch_size: Optional[int]
  kernel_impl: KernelImplementation
  solve_dtype: Optional[np.dtype]
  linearize_at: LinearizationPoint
  step_scale: float
  cg_tol: Optional[float]
  cg_maxiter: Optional[int]
  memory_limit_bytes: Optional[int]
  duplicate_tolerance: float = 0.0


def check_float_dtype(name: str, dtype) -> Optional[np.dtype]:
  """None, or float32 / float64 (float64 only with 64-bit JAX, else it would silently be
  float32); returns the normalised dtype."""
  if dtype is None:
    return None
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
    raise ValueError(f"{name} must be float32 or float64, got {dtype}")
  if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ValueError(f"{name}=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                     "jax.config.update('jax_enable_x64', True) before creating arrays")
  return dtype


def check_options(*, num_classes, damping, solver, batch_size, kernel_impl, solve_dtype,
                  linearize_at, step_scale, cg_tol, cg_maxiter, memory_limit_bytes,
                  duplicate_tolerance=0.0) -> Options:
  """Validates the data-independent options once; returns them normalised (enums, dtypes)."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  check_damping(damping)
  solve_dtype = check_float_dtype("solve_dtype", solve_dtype)
  if isinstance(step_scale, (bool, str)) or not isinstance(step_scale, (int, float, np.number)) \
      or not np.isfinite(float(step_scale)):
    raise ValueError(f"step_scale must be a finite number, got {step_scale!r}")
  if cg_tol is not None and not (0 < float(cg_tol) < 1):
    raise ValueError(f"cg_tol must lie in (0, 1), got {cg_tol!r}")
  if (isinstance(duplicate_tolerance, (bool, str))
      or not isinstance(duplicate_tolerance, (int, float, np.number))
      or not np.isfinite(float(duplicate_tolerance)) or duplicate_tolerance < 0):
    raise ValueError(f"duplicate_tolerance must be a finite number >= 0, got "
                     f"{duplicate_tolerance!r}")
  return Options(
      num_classes=int(num_classes), damping=damping,
      solver=parse(Solver, solver, name="solver"),
      batch_size=check_positive_int("batch_size", batch_size, allow_none=True),
      kernel_impl=parse(KernelImplementation, kernel_impl, name="kernel implementation"),
      solve_dtype=solve_dtype,
      linearize_at=parse(LinearizationPoint, linearize_at, name="linearize_at"),
      step_scale=float(step_scale), cg_tol=None if cg_tol is None else float(cg_tol),
      cg_maxiter=check_positive_int("cg_maxiter", cg_maxiter, allow_none=True),
      memory_limit_bytes=check_positive_int("memory_limit_bytes", memory_limit_bytes,
                                            allow_none=True),
      duplicate_tolerance=float(duplicate_tolerance))


def default_solve_dtype(*trees) -> np.dtype:
  """The widest floating dtype among the leaves of `trees` (params and params_init), at
  least float32 (Cholesky has no half-precision kernels, and half precision would carry no
  digit of an ill-conditioned solve)."""
  leaves = [l for t in trees for l in jax.tree_util.tree_leaves(t)
            if jnp.issubdtype(jnp.result_type(l), jnp.floating)]
  widest = jnp.dtype(jnp.result_type(*leaves)) if leaves else jnp.dtype(jnp.float32)
  return widest if widest.itemsize >= 4 else jnp.dtype(jnp.float32)
