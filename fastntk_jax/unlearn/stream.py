"""A stream of forget requests, served incrementally (pure functions: state in, state out).

Deletion requests name individual samples of the fine-tuning set D and arrive one after
another. Each request is served with the primal form of the Fast-NTK update
(docs/derivation.md §2, `solvers.primal_delta`): with the model linearised at w0, `J` the Jacobian
rows of the *currently retained* samples and `E` their residuals `one_hot(y) - f(w0, x)`,

    G = JᵀJ  [p, p],   b = JᵀE  [p],   s = (G + λI)⁻¹ b = (ridge solution on them) - w0.

A request forgetting samples with Jacobian rows `J_k` [m, p] (m = n_k·C) and residuals `E_k`
changes the retained system to

    G' = G - J_kᵀJ_k,   b' = b - J_kᵀE_k,   s' = (G' + λI)⁻¹ b',

and the parameters move by Δ = s' - s: exactly Eq. (1)'s `w_r - w_D` between the data set
before and after the request. The Δ's telescope, so after k requests the parameters are
`params + s_k - s_0`, which is what `unlearn.ntk_forget` gives for the union of the k forget
sets in one call (tested to float64 precision on models linear in their parameters).
The state is built by the same `ntk.gram_stats` as the one-shot primal solver.

What is reused between requests (the reason a later request is cheap):
  * G, b and the lower Cholesky factor L of G + λI over the retained samples: the factor is
    *downdated* by the rank-m correction (`cholesky_downdate`, O(m·p²)) instead of being
    refactorised (O(p³)), and G is never re-accumulated over D (O(n·C·p²) plus n·C
    backward passes, the dominant cost of a from-scratch update).
  * The Jacobian rows of D, cached when they fit in `max_cache_bytes` (n·C·p numbers);
    otherwise only the n_k requested samples' rows are recomputed (n_k·C backward passes).
  * The current solution s, so one request needs a single pair of triangular solves.

Numerical stability. A Cholesky downdate is a hyperbolic transformation; it is backward
stable only as long as G' + λI stays safely positive definite, which λ > 0 guarantees in
exact arithmetic (G' ⪰ 0). Each downdate reports its smallest pivot ratio
`(L'_kk / L_kk)²` (`ForgetState.last_pivot_ratio`); if a pivot is not positive and finite
(the downdated matrix lost definiteness to round-off) the request falls back, inside the
same jitted call, to a fresh Cholesky factorisation of G' + λI. `refactor_every=k` also
refactorises after every k downdates, to bound any accumulation of round-off in the factor.
G' itself is maintained by subtraction; its absolute error is ~eps·‖G‖ per request, which
perturbs the solution by ~eps·cond(G + λI) relative, the same order as the error of the
original solve on D. Use `solve_dtype=jnp.float64` (with x64 enabled) where that matters.
`factor_update="auto"` picks downdate or refactorisation per request from a FLOP estimate
(`downdate_flops`: ~2·p²·(32+m)²/32 for m <= 64, ~9·m·p² beyond; a factorisation ~p³/3).

Public API:
    state = init_forget_state(apply_fn, params_init, train=(x, y), num_classes=C, damping=λ)
    params, state = forget_request(state, params, forget_indices)      # host-checked, jitted
    params, state = forget_requests(state, params, [idx_1, idx_2, ...])
    params, state = serve_request(state, params, indices, mask)        # jit-able core; checks
                                                                       # the request at run time
    L = cholesky_downdate(L, X)                                        # L Lᵀ - X Xᵀ = L' L'ᵀ
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import linalg
from fastntk_jax import ntk
from fastntk_jax.enums import Solver
from fastntk_jax.linalg import cholesky_downdate, downdate_flops, refactor_flops
from fastntk_jax.unlearn import validate

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]

log = logging.getLogger(__name__)

__all__ = [
    "ForgetState",
    "FactorUpdate",
    "init_forget_state",
    "forget_request",
    "forget_requests",
    "serve_request",
    "cholesky_downdate",
    "downdate_flops",
    "refactor_flops",
    "retained_mask",
]

# Codes stored in `ForgetState.last_update`.
UPDATE_NONE = 0          # no request served yet (state fresh from init)
UPDATE_DOWNDATE = 1      # the factor was downdated
UPDATE_REFACTOR = 2      # refactorised by choice (factor_update / refactor_every)
UPDATE_FALLBACK = 3      # the downdate lost definiteness; refactorised instead

UPDATE_NAMES = ("none", "downdate", "refactor", "refactor after a failed downdate")

FACTOR_UPDATES = ("auto", "downdate", "refactor")
FactorUpdate = str  # one of FACTOR_UPDATES

@flax.struct.dataclass
class ForgetState:
  """Everything later requests reuse; a pytree of arrays plus static metadata.

  Array fields (pytree leaves; `s` = solve dtype, `d` = Jacobian/logits dtype):
    w_lin: the linearisation point w0 (pytree like the trainable params).
    labels: labels of D [n] (int32), what the residuals were formed with.
    x: inputs of D [n, ...] (Jacobian rows of requested samples are recomputed from them
      when `jac` is None).
    residuals: E = one_hot(y) - f(w0, x) [n, C], dtype s.
    jac: cached Jacobian rows [n, C, p] (dtype d), or None (not cached).
    gram: G = JᵀJ over the currently retained samples [p, p], dtype s (no λ).
    rhs: b = JᵀE over the currently retained samples [p], dtype s.
    chol: lower Cholesky factor of G + λI [p, p], dtype s.
    solution: s = (G + λI)⁻¹ b [p], dtype s: the ridge solution on the retained set, minus w0.
    forgotten: bool [n], True for every sample forgotten by an earlier request.
    damping: λ, scalar of dtype s.
    num_requests: int32, requests served so far.
    downdates_since_refactor: int32, consecutive downdates since the last factorisation.
    num_refactors: int32, factorisations done by requests (by choice or as fallback).
    last_update: int32, how the last request updated the factor (UPDATE_* codes).
    last_pivot_ratio: smallest (L'_kk/L_kk)² of the last downdate (1 = nothing removed,
      → 0 = the request removed almost everything along some direction); 1 otherwise.
    gram_scale: (max_k L0_kk)² of the initial factor, ~‖G_0 + λI‖: G is maintained by
      subtraction from G_0, so its round-off is ~ε·gram_scale whatever is left of it.
    last_condition_estimate: gram_scale / (min_k L_kk)² of the current factor, a lower bound
      on the error amplification of the current solve; requests refuse when it times the
      solve dtype's ε exceeds 1 (no digit could be trusted).

  Static fields (part of the pytree structure, hence of jit cache keys):
    apply_fn, num_classes, batch_size, factor_update, refactor_every.
  """
  w_lin: PyTree
  labels: jnp.ndarray
  x: jnp.ndarray
  residuals: jnp.ndarray
  jac: Optional[jnp.ndarray]
  gram: jnp.ndarray
  rhs: jnp.ndarray
  chol: jnp.ndarray
  solution: jnp.ndarray
  forgotten: jnp.ndarray
  damping: jnp.ndarray
  num_requests: jnp.ndarray
  downdates_since_refactor: jnp.ndarray
  num_refactors: jnp.ndarray
  last_update: jnp.ndarray
  last_pivot_ratio: jnp.ndarray
  gram_scale: jnp.ndarray
  last_condition_estimate: jnp.ndarray
  apply_fn: ApplyFn = flax.struct.field(pytree_node=False)
  num_classes: int = flax.struct.field(pytree_node=False)
  batch_size: Optional[int] = flax.struct.field(pytree_node=False)
  factor_update: str = flax.struct.field(pytree_node=False)
  refactor_every: Optional[int] = flax.struct.field(pytree_node=False)

  @property
  def num_samples(self) -> int:
    """n, the size of D (retained and forgotten)."""
    return int(self.forgotten.shape[0])

  @property
  def num_params(self) -> int:
    """p, scalars in the trainable pytree."""
    return int(self.rhs.shape[0])

  def arrays(self) -> dict:
    """The array fields by name (`state_arrays`): what persisting the state needs."""
    return state_arrays(self)


def state_arrays(state: ForgetState) -> dict:
  """The array fields of a state by name (None for an absent Jacobian cache): what persisting
  it needs; `state_from_arrays` rebuilds it with the static fields."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get("pytree_node", True)}


def state_from_arrays(arrays: dict, *, apply_fn: ApplyFn, num_classes: int,
                      batch_size: Optional[int], factor_update: FactorUpdate = "auto",
                      refactor_every: Optional[int] = None) -> ForgetState:
  """A `ForgetState` from `state_arrays`' dict (e.g. read back from disk) and the static
  fields it was built with (`init_forget_state`'s arguments of the same names).

  Raises:
    ValueError: a missing or unexpected field, or shapes that do not fit together.
  """
  names = {f.name for f in dataclasses.fields(ForgetState) if f.metadata.get("pytree_node", True)}
  arrays = {"jac": None, **arrays}
  if set(arrays) != names:
    raise ValueError(f"a stream state needs the fields {sorted(names)}; got {sorted(arrays)}")
  check_stream_options(factor_update, refactor_every)
  state = ForgetState(**{k: v if k == "w_lin" or v is None else jnp.asarray(v)
                         for k, v in arrays.items()},
                      apply_fn=apply_fn, num_classes=int(num_classes), batch_size=batch_size,
                      factor_update=factor_update, refactor_every=refactor_every)
  n, p = state.num_samples, state.num_params
  if (state.gram.shape != (p, p) or state.chol.shape != (p, p) or state.solution.shape != (p,)
      or state.residuals.shape != (n, num_classes) or state.x.shape[0] != n
      or ntk.num_params(state.w_lin) != p):
    raise ValueError("the stream state's arrays do not fit together (n samples, p params, "
                     f"C={num_classes}): gram {state.gram.shape}, residuals "
                     f"{state.residuals.shape}, x {state.x.shape}")
  return state


def stale_reason(arrays, *, params_init: PyTree, train, damping, solve_dtype) -> Optional[str]:
  """Why a persisted state (`state_arrays`, read back from disk) cannot serve requests for
  these inputs and options, or None when it can: one built at another w0, on other inputs,
  with another damping or solve dtype, or that has already served requests. Arrays are
  compared as stored, before `jnp.asarray` could narrow a float64 state to float32.
  """
  if not isinstance(arrays, dict):
    return f"holds a {type(arrays).__name__}, not a state of D"
  flat = lambda t: np.concatenate([np.asarray(l).ravel() for l in jax.tree_util.tree_leaves(t)])
  if "w_lin" not in arrays or not np.array_equal(flat(arrays["w_lin"]), flat(params_init)):
    return "was built at another w0"
  dtype = np.dtype(solve_dtype)
  for name in ("gram", "rhs", "chol", "solution", "residuals", "damping"):
    if name not in arrays:
      return f"has no {name!r}"
    got = np.asarray(arrays[name]).dtype
    if got != dtype:
      return f"was solved in {got.name} ({name}), not {dtype.name}"
  if float(np.asarray(arrays["damping"])) != float(np.asarray(damping, dtype)):
    return f"was built with damping {float(np.asarray(arrays['damping']))}, not {damping}"
  if not np.array_equal(np.asarray(arrays.get("x")), np.asarray(train[0])):
    return "was built on other inputs than this D"
  if "labels" not in arrays or not np.array_equal(np.asarray(arrays["labels"]),
                                                  np.asarray(train[1])):
    return "was built with other labels than this D's"
  if int(np.asarray(arrays.get("num_requests", 0))) or np.asarray(
      arrays.get("forgotten", False)).any():
    return "has already served requests"
  return None


def retained_mask(state: ForgetState) -> jnp.ndarray:
  """bool [n]: the samples of D not forgotten so far (the "current D")."""
  return jnp.logical_not(state.forgotten)


# --------------------------------------------------------------------------------------
# Initialisation.
# --------------------------------------------------------------------------------------


def check_stream_options(factor_update, refactor_every) -> None:
  """Validates the stream's own options (also at `make_forgetter`, before any request)."""
  if factor_update not in FACTOR_UPDATES:
    raise ValueError(f"unknown factor_update {factor_update!r}; choose one of "
                     f"{list(FACTOR_UPDATES)}")
  validate.check_positive_int("refactor_every", refactor_every, allow_none=True)


def _gram_of_d(apply_fn, w_lin, x, y, *, num_classes, batch_size, sdtype, cache):
  """(E [n, C], G [p, p], b [p], J [n, C, p] or None) at w_lin over all of D.

  `ntk.gram_stats`, unrolled to keep the residuals (the state's E). Called eagerly: the
  block loops then run one compiled block step per block (`ntk._scan`), the reverse-mode
  floor, where one jitted program would run them as an XLA while loop (several times slower
  on CPU) or unroll them (minutes of compilation per block for a deep network).
  """
  apply_s = lambda w, xx: apply_fn(w, xx).astype(sdtype)
  residuals = ntk.residuals(apply_s, w_lin, x, y, num_classes=num_classes,
                            batch_size=batch_size, dtype=sdtype)
  with jax.default_matmul_precision("highest"):
    stats = ntk.gram(apply_s, w_lin, x, residuals, batch_size=batch_size, dtype=sdtype,
                     keep_jacobian=cache)
  return residuals, stats[0], stats[1], (stats[2] if cache else None)


@jax.jit
@linalg.full_precision
def _factor(g, b, lam):
  """(Cholesky factor of G + λI, the ridge solution s = (G + λI)⁻¹ b)."""
  chol = linalg.ridge_factor(g, lam)
  return chol, linalg.cho_solve(chol, b)


def _init_state(apply_fn, w_lin, x, y, damping, *, num_classes, batch_size, sdtype, cache,
                factor_update, refactor_every, timings=None):
  with ntk.compile_timer() as compiled:
    start = time.perf_counter()
    residuals, g, b, jac = _gram_of_d(apply_fn, w_lin, x, y, num_classes=num_classes,
                                      batch_size=batch_size, sdtype=sdtype, cache=cache)
    lam = jnp.asarray(damping, sdtype)
    factor_start = time.perf_counter()
    factor = _factor.lower(g, b, lam).compile()
    compiled["seconds"] += time.perf_counter() - factor_start
    chol, solution = jax.block_until_ready(factor(g, b, lam))
  if timings is not None:
    timings.update(seconds=time.perf_counter() - start, compile_seconds=compiled["seconds"])
  zero = jnp.zeros((), jnp.int32)
  diag = jnp.abs(jnp.diagonal(chol))
  scale = jnp.square(jnp.max(diag))
  return ForgetState(
      w_lin=w_lin, labels=jnp.asarray(y, jnp.int32), x=x, residuals=residuals, jac=jac,
      gram=g, rhs=b,
      chol=chol, solution=solution, forgotten=jnp.zeros((x.shape[0],), bool), damping=lam,
      num_requests=zero, downdates_since_refactor=zero, num_refactors=zero,
      last_update=jnp.asarray(UPDATE_NONE, jnp.int32),
      last_pivot_ratio=jnp.asarray(1.0, sdtype), gram_scale=scale,
      last_condition_estimate=scale / jnp.square(jnp.min(diag)), apply_fn=apply_fn,
      num_classes=int(num_classes), batch_size=batch_size, factor_update=factor_update,
      refactor_every=refactor_every)


def init_forget_state(apply_fn: ApplyFn, params_init: PyTree, *, train, num_classes: int,
                      damping: float = 1e-2, batch_size: Optional[int] = 256,
                      solve_dtype=None, cache_jacobian: Optional[bool] = None,
                      max_cache_bytes: int = 2 ** 28, factor_update: FactorUpdate = "auto",
                      refactor_every: Optional[int] = None,
                      timings: Optional[dict] = None) -> ForgetState:
  """Computes, once, what every later forget request reuses (the expensive part).

  At the linearisation point w0 = `params_init`: the residuals E = one_hot(y) - f(w0, x),
  G = JᵀJ and b = JᵀE over all of D, the Cholesky factor of G + λI and the ridge solution
  s = (G + λI)⁻¹ b. Cost: n forward passes, n·C backward passes, O(n·C·p²) + O(p³).

  Args:
    apply_fn: `(params, x) -> logits [n, C]`; params is the trainable pytree only, frozen
      weights and BatchNorm statistics closed over, BatchNorm in inference mode. Must be
      hashable (a function or a hashable callable: it is a static part of the state).
    params_init: w0, the trainable params before fine-tuning.
    train: D = (x [n, ...], y [n] int labels in [0, C)); requests name indices into it.
    num_classes: C.
    damping: λ > 0 (the damping rule of `validate.allowed_solvers`: the stream is primal).
    batch_size: samples per streamed block of the initial Gram (bounds memory).
    solve_dtype: dtype of G, b, the factor and the solution (e.g. jnp.float64, needs x64);
      default: the widest dtype of `params_init`.
    cache_jacobian: keep the Jacobian rows of D [n, C, p] so a request needs no backward
      pass; None (default) caches iff they take at most `max_cache_bytes`.
    max_cache_bytes: the memory bound of the automatic cache decision.
    factor_update: how a request updates the factor: "downdate" (rank-m Cholesky downdate),
      "refactor" (fresh Cholesky of G' + λI) or "auto" (whichever `downdate_flops` /
      `refactor_flops` predicts cheaper for that request's rank).
    refactor_every: if set, refactorise (instead of downdating) after this many
      consecutive downdates, bounding the accumulation of round-off in the factor.
    timings: if a dict, filled with "seconds" (wall time of building the state, its
      compilation included) and "compile_seconds" (the part spent compiling).

  Returns:
    A `ForgetState` with nothing forgotten yet.

  Raises:
    ValueError / TypeError: bad input, named in the message, before any heavy work.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable (params, x) -> logits, got {type(apply_fn)}")
  opts = validate.check_options(
      num_classes=num_classes, damping=damping, solver=Solver.PRIMAL, batch_size=batch_size,
      kernel_impl="auto", solve_dtype=solve_dtype, linearize_at="init", step_scale=1.0,
      cg_tol=None, cg_maxiter=None, memory_limit_bytes=None)
  x, y = validate.check_split("train", train, opts.num_classes)
  if x.shape[0] < 2:
    raise ValueError(f"train must hold at least 2 samples (one to forget, one to retain), "
                     f"got {x.shape[0]}")
  validate.check_params(params_init, params_init)
  check_stream_options(factor_update, refactor_every)
  refactor_every = None if refactor_every is None else int(refactor_every)
  n, p, c = x.shape[0], ntk.num_params(params_init), opts.num_classes
  validate.allowed_solvers(Solver.PRIMAL, damping, num_params=p, num_outputs=n * c,
                           cg_budget=0, cg_dim=0)
  validate.check_logits(apply_fn, params_init, x, c)
  sdtype = opts.solve_dtype or validate.default_solve_dtype(params_init)
  cache_bytes = n * c * p * sdtype.itemsize
  if cache_jacobian is None:
    cache_jacobian = cache_bytes <= max_cache_bytes
  log.info("init_forget_state: n=%d, C=%d, p=%d, Jacobian cache %s (%.1f MiB), solve dtype "
           "%s", n, c, p, "on" if cache_jacobian else "off", cache_bytes / 2**20, sdtype)
  state = _init_state(apply_fn, params_init, jnp.asarray(x), jnp.asarray(y), damping,
                      num_classes=c, batch_size=opts.batch_size, sdtype=sdtype,
                      cache=bool(cache_jacobian), factor_update=factor_update,
                      refactor_every=refactor_every, timings=timings)
  _check_solve(state, "the stream's initial ridge solve")
  return state


def _check_solve(state: ForgetState, what: str) -> None:
  """The precision rule (`linalg.check_precision`) on the stream's error amplification,
  gram_scale / (min L_kk)²: G is kept by subtraction from the initial Gram, so its round-off is
  relative to that Gram's scale whatever is left of it. A non-finite solution is refused."""
  kappa = jnp.where(jnp.all(jnp.isfinite(state.solution)), state.last_condition_estimate,
                    jnp.nan)
  linalg.check_precision(kappa, state.rhs.dtype, what=what, damping=state.damping)


# --------------------------------------------------------------------------------------
# Serving a request.
# --------------------------------------------------------------------------------------


def _request_rows(state: ForgetState, indices: jnp.ndarray, mask: jnp.ndarray, rows=None):
  """Jacobian rows [m, p] (m = len(indices)·C) and residuals [m] of the requested samples,
  zeroed where `mask` is False (padding), and the dtype the rows were computed in (the
  Jacobian cache's, or the network's when they are recomputed)."""
  sdtype = state.rhs.dtype
  c, p = state.num_classes, state.num_params
  if state.jac is not None:
    jk = state.jac[indices]
  elif rows is not None:
    if rows.shape != (indices.shape[0], c, p):
      raise ValueError(f"rows must have shape {(indices.shape[0], c, p)} (requested samples, "
                       f"C, p), got {rows.shape}")
    jk = rows
  else:
    jk = ntk.jacobian_rows(state.apply_fn, state.w_lin, state.x[indices],
                           batch_size=state.batch_size)
  rows_dtype = jk.dtype
  jk = jnp.where(mask[:, None, None], jk.astype(sdtype), 0).reshape(-1, p)
  ek = jnp.where(mask[:, None], state.residuals[indices], 0).reshape(-1)
  return jk, ek, rows_dtype


def _check_request_in_jit(state: ForgetState, indices, mask) -> None:
  """The request's validity, computed from (possibly traced) values; raises at run time."""
  n = state.num_samples
  in_range = (indices >= 0) & (indices < n)
  safe = jnp.clip(indices, 0, n - 1)
  counts = jnp.zeros((n,), jnp.int32).at[safe].add((mask & in_range).astype(jnp.int32))
  bad_range = jnp.sum(mask & ~in_range)
  repeated = jnp.sum(counts > 1)
  again = jnp.sum(mask & in_range & state.forgotten[safe])
  left = n - jnp.sum(state.forgotten | (counts > 0))
  validate.runtime_check(
      (bad_range == 0) & (repeated == 0) & (again == 0) & (left > 0), ValueError,
      "invalid forget request: {} index(es) out of range [0, " + str(n) + "), {} sample(s) "
      "named more than once, {} already forgotten, {} sample(s) of D would be left (must be "
      "> 0)", bad_range, repeated, again, left)


def serve_request(state: ForgetState, params: PyTree, indices: jnp.ndarray,
                  mask: Optional[jnp.ndarray] = None,
                  rows: Optional[jnp.ndarray] = None) -> tuple[PyTree, ForgetState]:
  """Serves one forget request: the pure, jit-able core.

  `forget_request` checks the request on the host (messages naming the indices), pads it to
  a bucket size and calls this jitted. Called directly (e.g. under `jax.jit` with traced
  indices), the request is checked here at run time: an index out of range, named twice or
  already forgotten, or a request that forgets all of D raises (via a host callback).

  Args:
    state: the `ForgetState` before the request.
    params: the current trainable params (pytree like `state.w_lin`).
    indices: int [k], indices into D of the samples to forget.
    mask: bool [k], False marks padding entries to ignore (default: all True).
    rows: optional [k, C, p] Jacobian rows of `indices` at w0, computed by the caller (for a
      state without the Jacobian cache); default: the cache, or computed here.

  Returns:
    (params + Δ with Δ = s' - s, the state after the request).
  """
  if mask is None:
    mask = jnp.ones(indices.shape, bool)
  _check_request_in_jit(state, indices, mask)
  jk, ek, rows_dtype = _request_rows(state, indices, mask, rows)
  p, m = jk.shape[1], jk.shape[0]
  sdtype = state.rhs.dtype
  with jax.default_matmul_precision("highest"):
    gram = state.gram - jk.T @ jk
    gram = 0.5 * (gram + gram.T)  # keep it exactly symmetric for the fallback factorisation
    rhs = state.rhs - jk.T @ ek

  def refactor():
    return linalg.ridge_factor(gram, state.damping)

  method = state.factor_update
  if method == "auto":
    method = "downdate" if downdate_flops(p, m) < refactor_flops(p) else "refactor"
  if method == "refactor":
    chol, code = refactor(), jnp.asarray(UPDATE_REFACTOR, jnp.int32)
    ratio = jnp.asarray(1.0, sdtype)
  else:
    def downdate():
      l, r = cholesky_downdate(state.chol, jk.T)
      ok = jnp.isfinite(r) & (r > 0) & jnp.all(jnp.isfinite(l))
      return jax.lax.cond(ok, lambda: (l, jnp.asarray(UPDATE_DOWNDATE, jnp.int32)),
                          lambda: (refactor(), jnp.asarray(UPDATE_FALLBACK, jnp.int32))), r

    if state.refactor_every is None:
      (chol, code), ratio = downdate()
    else:
      due = state.downdates_since_refactor >= state.refactor_every
      (chol, code), ratio = jax.lax.cond(
          due, lambda: ((refactor(), jnp.asarray(UPDATE_REFACTOR, jnp.int32)),
                        jnp.asarray(1.0, sdtype)),
          downdate)
    ratio = ratio.astype(sdtype)
  solution = linalg.cho_solve(chol, rhs)
  estimate = state.gram_scale / jnp.square(jnp.min(jnp.abs(jnp.diagonal(chol))))
  _check_solve(state.replace(solution=solution, last_condition_estimate=estimate),
               "the request's ridge solve")
  if state.jac is None and jnp.finfo(rows_dtype).eps > jnp.finfo(sdtype).eps:
    # Recomputed rows need not equal, bit for bit, the rows summed into G at init (another
    # block shape or program may round differently), so G - J_kᵀJ_k keeps a residue of
    # J_k's round-off, amplified by κ. The cache reuses the very rows: no such residue.
    linalg.check_precision(
        estimate, sdtype, rows_dtype,
        what="the request (its Jacobian rows recomputed: no Jacobian cache)",
        damping=state.damping,
        remedy="build the state with cache_jacobian=True (a request then reuses the exact "
               "rows) or increase the damping")
  new_params = ntk.apply_delta(params, solution - state.solution)
  downdated = code == UPDATE_DOWNDATE
  # Scatter-add of the mask (not a set): padding entries may repeat any index harmlessly.
  hits = jnp.zeros(state.forgotten.shape, jnp.int32).at[indices].add(mask.astype(jnp.int32))
  new_state = state.replace(
      gram=gram, rhs=rhs, chol=chol, solution=solution,
      forgotten=state.forgotten | (hits > 0),
      num_requests=state.num_requests + 1,
      downdates_since_refactor=jnp.where(downdated, state.downdates_since_refactor + 1, 0),
      num_refactors=state.num_refactors + jnp.where(downdated, 0, 1).astype(jnp.int32),
      last_update=code, last_pivot_ratio=ratio, last_condition_estimate=estimate)
  return new_params, new_state


_serve_jit = jax.jit(serve_request)


def request_bucket(k: int) -> int:
  """Padded request size: the next power of two (a stream compiles O(log n) variants)."""
  return 1 << max(0, (k - 1).bit_length())


def _check_params(state: ForgetState, params: PyTree) -> None:
  validate.check_params(state.w_lin, params)


def _check_indices(state: ForgetState, forget_indices) -> np.ndarray:
  idx = np.asarray(forget_indices)
  if idx.ndim != 1:
    raise ValueError(f"forget_indices must be a 1-D sequence of sample indices, got shape "
                     f"{idx.shape}")
  if idx.size == 0:
    raise ValueError("forget request is empty: it names no sample to forget")
  if not (np.issubdtype(idx.dtype, np.integer)):
    raise TypeError(f"forget_indices must be integers (indices into D), got dtype "
                    f"{idx.dtype}")
  n = state.num_samples
  bad = idx[(idx < 0) | (idx >= n)]
  if bad.size:
    raise ValueError(f"forget_indices out of range [0, {n}): {bad[:10].tolist()}"
                     + (" ..." if bad.size > 10 else ""))
  uniq, counts = np.unique(idx, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"forget request names samples more than once: "
                     f"{uniq[counts > 1][:10].tolist()}")
  forgotten = np.asarray(state.forgotten)
  again = idx[forgotten[idx]]
  if again.size:
    raise ValueError(f"samples already forgotten by an earlier request: "
                     f"{again[:10].tolist()}" + (" ..." if again.size > 10 else ""))
  if int(forgotten.sum()) + idx.size >= n:
    raise ValueError(f"this request would forget every remaining sample of D "
                     f"({n - int(forgotten.sum())} left, {idx.size} requested): nothing would "
                     "be retained to train on")
  return idx.astype(np.int32)


def forget_request(state: ForgetState, params: PyTree,
                   forget_indices) -> tuple[PyTree, ForgetState]:
  """Forgets the named samples of D from `params`, reusing the state's Gram and factor.

  Checks the request on the host (when its values are concrete), pads it to the next power
  of two and calls the jitted `serve_request`. Under an outer `jax.jit` with traced indices
  or state, `serve_request` checks the request when it runs instead.

  Args:
    state: from `init_forget_state` or an earlier request.
    params: the current trainable params (w_D after fine-tuning, or the output of the
      previous request); same structure, shapes and dtypes as `params_init`.
    forget_indices: int sequence [k] of indices into D, distinct and not yet forgotten.

  Returns:
    (new params like `params`, new state). `new params = params + s' - s`: after requests
    1..k, `params + s_k - s_0`, the single Fast-NTK update for the union of the requests.

  Raises:
    ValueError / TypeError: empty request, an index out of range, repeated or already
      forgotten, a request that would forget all remaining samples, params that do not
      match the state.
  """
  if not isinstance(state, ForgetState):
    raise TypeError(f"state must be a ForgetState (from init_forget_state), got "
                    f"{type(state).__name__}")
  _check_params(state, params)
  if not validate.is_concrete(forget_indices) or not validate.is_concrete(state.forgotten):
    idx = jnp.asarray(forget_indices)
    return serve_request(state, params, idx, jnp.ones(idx.shape, bool))
  idx = _check_indices(state, forget_indices)
  k = idx.size
  size = min(request_bucket(k), state.num_samples)
  padded = np.full(size, idx[0], np.int32)
  padded[:k] = idx
  mask = np.arange(size) < k
  rows = None
  if state.jac is None and size > state.batch_size:
    # Several Jacobian blocks: computed here by the eager block loop (one compiled block
    # step, as the state's init), not unrolled inside the jitted request (each unrolled
    # copy of a deep network's Jacobian compiles for minutes).
    rows = ntk.jacobian_rows(state.apply_fn, state.w_lin, state.x[jnp.asarray(padded)],
                             batch_size=state.batch_size)
  return _serve_jit(state, params, jnp.asarray(padded), jnp.asarray(mask), rows)


def forget_requests(state: ForgetState, params: PyTree,
                    requests: Sequence) -> tuple[PyTree, ForgetState]:
  """Serves a sequence of requests in order (`forget_request` for each).

  Args:
    state, params: as for `forget_request`.
    requests: sequence of index sequences.

  Returns:
    (params after the last request, state after the last request).
  """
  for i, request in enumerate(requests):
    try:
      params, state = forget_request(state, params, request)
    except (ValueError, TypeError) as e:
      raise type(e)(f"request {i}: {e}") from e
  return params, state
