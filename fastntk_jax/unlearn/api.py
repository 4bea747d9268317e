"""The public API: a factory that validates options once and returns pure functions.

    forgetter = make_forgetter(apply_fn, num_classes=C, damping=1e-2)
    new_params = forgetter.forget(params_init, params, retain, forget)   # pure, jit-able
    state = forgetter.init(params_init, train)                           # request stream
    new_params, state = forgetter.serve(state, new_params, indices)

`ntk_forget` is the one-call form of `forget`; `ntk_forget_with_diagnostics` runs it compiled,
timed, with a `Diagnostics` record. A result is either right or refused: a non-finite update,
a solve failing the precision rule or an unconverged cg raises `SolveError`, immediately when
called eagerly and when the computation runs under `jax.jit` (a host callback: JAX then
re-raises it as a `jax.errors.JaxRuntimeError` whose message holds the `SolveError`'s);
`forget_with_info` instead hands the `SolveInfo` flags to the caller.

Samples are passed by value: `forget` must list samples that D held (each once) and
`retain` the rest of D. A forget sample listed twice, or also left in `retain`, is refused
(exact match of input and label; under `jax.jit` or `vmap`, on the host when the
computation runs); a sample that was never in D cannot be detected here (the update would
move the parameters as if it had been trained on): pass only samples of D, or use the request stream (`init`/`serve`), which names
samples by their index in D.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import enums
from fastntk_jax import linalg
from fastntk_jax import ntk
from fastntk_jax import sharding
from fastntk_jax.enums import LinearizationPoint, Solver
from fastntk_jax.linalg import SolveError
from fastntk_jax.unlearn import certificate
from fastntk_jax.unlearn import plan as plan_lib
from fastntk_jax.unlearn import solvers
from fastntk_jax.unlearn import stream
from fastntk_jax.unlearn import validate

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]
log = logging.getLogger(__name__)

# Conjugate-gradient steps that make a certificate's witness when no Gram factor is held
# (`Forgetter.certify`): each is one jvp and one vjp over D_r (benchmarks/RESULTS.md).
CERTIFICATE_CG_STEPS = 30


class Forgetter(NamedTuple):
  """Pure functions sharing one set of validated options (from `make_forgetter`).

  The update (pure, jit-able):
    plan(params_init, params, retain, forget) -> Plan: the solver and its predicted cost.
    forget(params_init, params, retain, forget) -> params: the Fast-NTK update, checked.
    forget_with_info(params_init, params, retain, forget, *, plan=None,
      with_condition=False) -> (params, SolveInfo): unchecked (the caller inspects `info`,
      or calls `check`); `plan` (from `plan`, e.g. made outside `jax.jit`) skips planning and
      must match these options and inputs; `with_condition` adds the exact κ (an O(dim³)
      eigensolve; otherwise the O(p) bound from the Cholesky factors).
    check(info, plan): raises `SolveError` for a non-finite, ill-conditioned (κ·ε > 1) or
      unconverged solve, and warns once (`PrecisionWarning`) when κ·ε > 1e-3.
  The primal update from Gram statistics summed elsewhere (pure, jit-able):
    gram_stats(w_lin, x, y, row_weights=None) -> (G [p, p], b [p]) in the solve dtype.
    from_gram_stats(params, stats_retain, stats_forget, plan) -> (params, SolveInfo), checked.
  The dual from kernel statistics taken once (D's Jacobian rows kept, D_r's first):
    kernel_stats(w_lin, x, y) -> `solvers.KernelStats` (J [n·C, p] in the network's dtype,
      E [n·C] and Θ = JJᵀ [n·C, n·C] in the solve dtype).
    from_kernel_stats(params, stats, num_retain, plan) -> (params, SolveInfo), checked: Eq.
      (1) with the first `num_retain` samples of `stats` as D_r, the rest as D_f; judged as
      the dual that ran (κ exact, in the solve dtype: the statistics define the model),
      whatever solver `plan` (made for these inputs) chose.
    ridge_from_kernel_stats(w_lin, stats, *, num_samples=None) -> params, checked: w_lin +
      J_Sᵀ(Θ_SS + λI)⁻¹E_S, S the first `num_samples` samples (None: all), refused when κ·ε > 1
      in the solve dtype or non-finite (`SolveError`); the statistics define the linearised
      model, so its precision is the solve's.
  The linearised model's own minimiser (what linearised fine-tuning reaches):
    ridge_solution(w_lin, parts, *, solver="cg") -> (params, SolveInfo): w_lin +
      (JᵀJ + λI)⁻¹JᵀE over the samples of `parts` [(x, y), ...], by "cg" (conjugate
      gradients, memory ~ p + n·C; refused unconverged) or "dual" (Jᵀ(Θ + λI)⁻¹E from the
      kernel over the parts' n·C outputs, memory (n·C)² for it and its Cholesky factor, κ
      the factor's bound, no eigensolve), refused when κ·ε > 1 (cg: κ from its Lanczos
      coefficients) or non-finite (`SolveError`).
  Host-side drivers (timed, resumable):
    forget_with_diagnostics(params_init, params, retain, forget, *, plan=None) ->
      (params, Diagnostics): compiled and run, compilation timed apart.
    accumulate(w_lin, x, y, *, chunk_rows, state=None, on_chunk=None, mesh=None) ->
      (state, compile_seconds): `gram_stats` summed over fixed-shape chunks of rows,
      resumable from `state` ({"g", "b", "next"}, what `on_chunk` saved); with a `mesh` each
      chunk's rows are split over its devices.
    diagnostics(plan, info, *, params, new_params, seconds, compile_seconds, ...) ->
      Diagnostics of an update made by the functions above.
    certify(params_init, params, retain, *, linearized=True, retain_stats=None, ...) ->
      Certificate (`certificate.certify` with these options' damping and batch size).
  The request stream (`fastntk_jax.unlearn.stream`):
    init(params_init, train, *, timings=None) -> ForgetState.
    serve(state, params, indices) -> (params, state).
    serve_with_diagnostics(state, params, indices) -> (params, state, Diagnostics).
    restore(arrays, params_init, train) -> ForgetState: a state persisted as
      `stream.state_arrays(state)`, refused (ValueError naming why) when it was built at
      another w0, on other data, with other options, or has served requests.
  options: the validated options (`validate.Options`).
  """
  options: Any
  plan: Callable
  forget: Callable
  forget_with_info: Callable
  check: Callable
  gram_stats: Callable
  from_gram_stats: Callable
  kernel_stats: Callable
  from_kernel_stats: Callable
  ridge_from_kernel_stats: Callable
  ridge_solution: Callable
  forget_with_diagnostics: Callable
  accumulate: Callable
  diagnostics: Callable
  certify: Callable
  init: Callable
  serve: Callable
  serve_with_diagnostics: Callable
  restore: Callable


def make_forgetter(apply_fn: ApplyFn, *, num_classes: int, damping=1e-2,
                   solver: Solver | str = Solver.AUTO, batch_size: Optional[int] = 256,
                   kernel_impl: str = "auto", solve_dtype=None,
                   linearize_at: LinearizationPoint | str = LinearizationPoint.INIT,
                   step_scale: float = 1.0, cg_tol: Optional[float] = None,
                   cg_maxiter: Optional[int] = None,
                   memory_limit_bytes: Optional[int] = None,
                   cache_jacobian: Optional[bool] = None, max_cache_bytes: int = 2 ** 28,
                   factor_update: str = "auto",
                   refactor_every: Optional[int] = None,
                   duplicate_tolerance: float = 0.0) -> Forgetter:
  """Validates the options once and returns the update's pure functions (`Forgetter`).

  Args:
    apply_fn: `(params, x) -> logits [n, C]`; params is the trainable pytree only, frozen
      weights and BatchNorm statistics closed over, BatchNorm in inference mode.
    num_classes: C; targets are one_hot(y, C).
    damping: λ >= 0 added to the diagonal of every inverted kernel block; may be traced.
      λ = 0 only with the dual solver and p >= n·C (`validate.allowed_solvers`).
    solver: a `Solver` or its value: "dual" | "primal" | "cg" | "auto" (cheapest allowed
      solver that fits in memory; logged).
    batch_size: rows per streamed block (bounds memory; None = all at once).
    kernel_impl: the dual's kernel, a `KernelImplementation` value ("auto": neural-tangents
      when it imports, else the built-in one, and the built-in one on kept Jacobian rows
      where a set spans several blocks; the one that ran is in `Plan.kernel`).
    solve_dtype: dtype of kernels, Grams and solves (jnp.float64 needs x64); default: the
      widest dtype of the params.
    linearize_at: "init" (w0, default) | "trained" (w_D; see `LinearizationPoint`).
    step_scale: multiplies Δ (1.0 = the exact update; other values are a heuristic).
    cg_tol, cg_maxiter: cg relative tolerance (default 1e-12 in float64, 1e-5 otherwise)
      and iteration cap (default 2·dim + 200; `auto` skips cg if the cap is below dim).
    memory_limit_bytes: budget for the solver choice (default 80% of free memory).
    cache_jacobian, max_cache_bytes, factor_update, refactor_every: for `init` (see
      `stream.init_forget_state`).
    duplicate_tolerance: a forget sample listed twice, or also in the retain set, is refused
      (`validate.check_disjoint`); 0 matches inputs exactly, > 0 also inputs of the same
      label within this distance in every entry (near-duplicates).

  Returns:
    Forgetter.

  Raises:
    ValueError / TypeError: an invalid option, named in the message.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable (params, x) -> logits, got {type(apply_fn)}")
  stream.check_stream_options(factor_update, refactor_every)
  opts = validate.check_options(
      num_classes=num_classes, damping=damping, solver=solver, batch_size=batch_size,
      kernel_impl=kernel_impl, solve_dtype=solve_dtype, linearize_at=linearize_at,
      step_scale=step_scale, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
      memory_limit_bytes=memory_limit_bytes, duplicate_tolerance=duplicate_tolerance)
  c = opts.num_classes
  stream_options = dict(cache_jacobian=cache_jacobian, max_cache_bytes=max_cache_bytes,
                        factor_update=factor_update, refactor_every=refactor_every)
  # Executables compiled by the host-side drivers, by what they were compiled for: a driver
  # called again on the same shapes (the next seed) reuses them.
  compiled_cache = {}

  def compiled(key, fn, *args):
    """(`fn` compiled for `args`, seconds spent compiling now: 0 when cached)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (key, treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
    if key in compiled_cache:
      return compiled_cache[key], 0.0
    start = time.perf_counter()
    compiled_cache[key] = jax.jit(fn).lower(*args).compile()
    return compiled_cache[key], time.perf_counter() - start

  def solve_dtype_of(*trees):
    return opts.solve_dtype or validate.default_solve_dtype(*trees)

  def prepare(params_init, params, retain, forget, traced=None, plan=None):
    validate.check_params(params_init, params)
    retain = validate.check_split("retain", retain, c)
    forget = validate.check_split("forget", forget, c)
    if retain[0].shape[1:] != forget[0].shape[1:]:
      raise ValueError(f"retain and forget inputs differ in per-sample shape: "
                       f"{retain[0].shape[1:]} vs {forget[0].shape[1:]}")
    validate.check_disjoint(retain, forget, tolerance=opts.duplicate_tolerance)
    w_lin = params_init if opts.linearize_at == LinearizationPoint.INIT else params
    sdtype = solve_dtype_of(params_init, params)
    if traced is None:
      traced = not all(validate.is_concrete(l) for l in jax.tree_util.tree_leaves(
          (params_init, params, retain, forget, opts.damping)))
    if plan is None:
      plan = plan_lib.make_plan(apply_fn, w_lin, retain, forget, options=opts,
                                solve_dtype=sdtype, traced=traced)
    else:
      check_plan(plan, w_lin, retain, forget, sdtype)
    return plan, w_lin, retain, forget

  def check_plan(plan, w_lin, retain, forget, sdtype):
    if not isinstance(plan, plan_lib.Plan):
      raise TypeError(f"plan must be a Plan (from Forgetter.plan), got {type(plan).__name__}")
    have = (ntk.num_params(w_lin), retain[0].shape[0], forget[0].shape[0], c,
            jnp.dtype(sdtype))
    want = (plan.num_params, plan.num_retain, plan.num_forget, plan.num_classes,
            jnp.dtype(plan.solve_dtype))
    if have != want:
      raise ValueError(f"the plan was made for other inputs or options: (p, n_r, n_f, C, "
                       f"solve dtype) = {want} in the plan, {have} here")
    explicit = opts.kernel_impl not in (ntk.KernelImplementation.AUTO,
                                        ntk.KernelImplementation.JAX)
    if plan.solver == Solver.DUAL and explicit and plan.kernel != opts.kernel_impl:
      raise ValueError(f"the plan runs the dual's kernel {plan.kernel and plan.kernel.value!r}"
                       f"{' on kept Jacobian rows' if plan.keep_jacobian_rows else ''} but "
                       f"this forgetter names kernel_impl={opts.kernel_impl.value!r}: make "
                       "the plan with this forgetter's `plan`")
    validate.allowed_solvers(plan.solver, opts.damping, num_params=plan.num_params,
                             num_outputs=plan.num_outputs, cg_budget=plan.cg_maxiter,
                             cg_dim=0)

  def plan_fn(params_init, params, retain, forget, *, traced=None) -> plan_lib.Plan:
    return prepare(params_init, params, retain, forget, traced)[0]

  def run(plan, w_lin, params, retain, forget, with_condition):
    delta, info = solvers.ridge_update(
        apply_fn, w_lin, retain, forget, opts.damping, num_classes=c, solver=plan.solver,
        dtype=plan.solve_dtype, batch_size=opts.batch_size,
        kernel_impl=plan.kernel or ntk.KernelImplementation.JAX, cg_tol=opts.cg_tol,
        cg_maxiter=lambda dim: plan_lib.cg_iteration_budget(dim, opts.cg_maxiter),
        with_condition=with_condition, keep_rows=plan.keep_jacobian_rows)
    return ntk.apply_delta(params, delta, opts.step_scale), info

  def forget_with_info(params_init, params, retain, forget, *, plan=None,
                       with_condition=False):
    plan, w_lin, retain, forget = prepare(params_init, params, retain, forget, plan=plan)
    return run(plan, w_lin, params, retain, forget, with_condition)

  def check(info, plan):
    check_solve(info, plan, opts.damping, opts.cg_tol)

  def forget_fn(params_init, params, retain, forget):
    plan, w_lin, retain, forget = prepare(params_init, params, retain, forget)
    new, info = run(plan, w_lin, params, retain, forget, False)
    check(info, plan)
    return new

  def gram_stats(w_lin, x, y, row_weights=None):
    return ntk.gram_stats(apply_fn, w_lin, x, y, num_classes=c, batch_size=opts.batch_size,
                          dtype=solve_dtype_of(w_lin), row_weights=row_weights)

  def from_gram_stats(params, stats_retain, stats_forget, plan):
    p = ntk.num_params(params)
    for name, st in (("retain", stats_retain), ("forget", stats_forget)):
      if len(st) != 2 or jnp.shape(st[0]) != (p, p) or jnp.shape(st[1]) != (p,):
        raise ValueError(f"stats_{name} must be (G [p, p], b [p]) with p = {p} (the params' "
                         f"size), got shapes {[jnp.shape(a) for a in st]}")
    if not isinstance(plan, plan_lib.Plan) or plan.num_params != p:
      raise ValueError("plan must be the Plan of these params (Forgetter.plan)")
    dtype = plan.solve_dtype
    narrower = [str(jnp.result_type(a)) for a in (*stats_retain, *stats_forget)
                if jnp.dtype(jnp.result_type(a)).itemsize < jnp.dtype(dtype).itemsize]
    if narrower:
      raise ValueError(f"from_gram_stats: statistics in {sorted(set(narrower))}, narrower than "
                       f"the plan's solve dtype {jnp.dtype(dtype).name}: their round-off would "
                       "pass for the solve's; accumulate them in the solve dtype (gram_stats)")
    delta, info = solvers.primal_delta(
        *(jnp.asarray(a, dtype) for a in (*stats_retain, *stats_forget)),
        jnp.asarray(opts.damping, dtype), with_condition=True)
    # Judged as what ran, the primal solve (its exact κ), whatever solver the plan chose.
    check(info, dataclasses.replace(plan, solver=Solver.PRIMAL, kernel=None,
                                    keep_jacobian_rows=False))
    return ntk.apply_delta(params, delta, opts.step_scale), info

  def kernel_stats(w_lin, x, y):
    validate.check_params(w_lin, w_lin)
    x, y = validate.check_split("kernel_stats", (x, y), c)
    validate.check_logits(apply_fn, w_lin, x, c)
    return solvers.kernel_stats(apply_fn, w_lin, x, y, num_classes=c,
                                batch_size=opts.batch_size, dtype=solve_dtype_of(w_lin))

  def check_kernel_stats(stats, p):
    if not isinstance(stats, solvers.KernelStats):
      raise TypeError(f"stats must be the KernelStats of Forgetter.kernel_stats, got "
                      f"{type(stats).__name__}")
    m = stats.residuals.shape[0]
    if stats.rows.shape != (m, p) or stats.kernel.shape != (m, m) or m % c:
      raise ValueError(f"kernel statistics of shapes rows {stats.rows.shape}, residuals "
                       f"{stats.residuals.shape}, kernel {stats.kernel.shape} do not fit "
                       f"params of size p = {p} and C = {c} (need rows [n·C, p], residuals "
                       "[n·C], kernel [n·C, n·C])")
    return m // c

  def ridge_from_kernel_stats(w_lin, stats, *, num_samples=None):
    validate.check_params(w_lin, w_lin)
    n = check_kernel_stats(stats, ntk.num_params(w_lin))
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
        or not 0 < num_samples <= n):
      raise ValueError(f"ridge_from_kernel_stats: num_samples={num_samples!r} must be an int "
                       f"in [1, {n}] (the statistics' samples) or None")
    dtype = stats.residuals.dtype
    step, info = solvers.kernel_ridge_step(
        stats, jnp.asarray(opts.damping, dtype),
        outputs=None if num_samples is None else int(num_samples) * c)
    linalg.check_precision(jnp.where(info.finite, info.kappa, jnp.nan), dtype,
                           what="the linearised model's ridge solution (dual, from kernel "
                           "statistics)", damping=opts.damping)
    return ntk.apply_delta(w_lin, step)

  def from_kernel_stats(params, stats, num_retain, plan):
    p = ntk.num_params(params)
    n = check_kernel_stats(stats, p)
    if (isinstance(num_retain, bool) or not isinstance(num_retain, (int, np.integer))
        or not 0 < num_retain < n):
      raise ValueError(f"from_kernel_stats: num_retain={num_retain!r} must be an int in "
                       f"[1, {n - 1}] (the statistics hold {n} samples: D_r's first, then "
                       "D_f's, at least one of each)")
    if not isinstance(plan, plan_lib.Plan):
      raise ValueError("plan must be the Plan of these params (Forgetter.plan)")
    have = (p, int(num_retain), n - int(num_retain), c, jnp.dtype(stats.residuals.dtype))
    want = (plan.num_params, plan.num_retain, plan.num_forget, plan.num_classes,
            jnp.dtype(plan.solve_dtype))
    if have != want:
      raise ValueError(f"from_kernel_stats: the plan was made for other inputs or options: "
                       f"(p, n_r, n_f, C, solve dtype) = {want} in the plan, {have} here")
    # Judged as what ran, the dual, on the linearised model these statistics define: its
    # exact κ (the eigensolve below) in the solve dtype, whatever the plan had chosen.
    judged = dataclasses.replace(plan, solver=Solver.DUAL, kernel=None,
                                 keep_jacobian_rows=True, logits_dtype=None)
    delta, info = solvers.kernel_delta(
        stats, int(num_retain) * c, jnp.asarray(opts.damping, plan.solve_dtype),
        with_condition=True)
    check(info, judged)
    return ntk.apply_delta(params, delta, opts.step_scale), info

  def ridge_solution(w_lin, parts, *, solver=Solver.CG):
    if str(getattr(solver, "value", solver)) not in (Solver.DUAL.value, Solver.CG.value):
      raise ValueError(f"ridge_solution solver {solver!r}: use 'dual' or 'cg' (the closed "
                       "form from Gram statistics is `linear.ridge_solution`)")
    solver = Solver(getattr(solver, "value", solver))
    validate.check_params(w_lin, w_lin)
    if not parts:
      raise ValueError("ridge_solution: parts is empty; give at least one (x, y) split")
    parts = [validate.check_split(f"parts[{k}]", part, c) for k, part in enumerate(parts)]
    shapes = {tuple(x.shape[1:]) for x, _ in parts}
    if len(shapes) > 1:
      raise ValueError(f"ridge_solution: the parts' inputs differ in per-sample shape: "
                       f"{sorted(shapes)}")
    n = sum(x.shape[0] for x, _ in parts)
    validate.allowed_solvers(solver, opts.damping, num_params=ntk.num_params(w_lin),
                             num_outputs=n * c, cg_budget=plan_lib.cg_iteration_budget(
                                 n * c, opts.cg_maxiter), cg_dim=0)
    if (solver == Solver.CG and validate.is_concrete(opts.damping)
        and float(opts.damping) == 0.0 and ntk.num_params(w_lin) > n * c):
      raise ValueError(f"ridge_solution: damping=0 leaves cg's parameter-space system "
                       f"singular (p={ntk.num_params(w_lin)} > n*C={n * c}); use damping > 0 "
                       "or solver='dual'")
    dtype = solve_dtype_of(w_lin)
    budget = lambda dim: plan_lib.cg_iteration_budget(dim, opts.cg_maxiter)
    step, info = solvers.ridge_solution(
        apply_fn, w_lin, parts, opts.damping, num_classes=c, solver=solver, dtype=dtype,
        batch_size=opts.batch_size, kernel_impl=ntk.resolve_implementation(opts.kernel_impl),
        cg_tol=opts.cg_tol, cg_maxiter=budget, with_condition=False)
    what = f"the linearised model's ridge solution ({solver.value})"
    linalg.runtime_check(
        info.finite, SolveError,
        f"{what} is non-finite (damping {{}}): {linalg.precision_remedy(dtype)}",
        jnp.asarray(opts.damping))
    x0 = parts[0][0]
    source = plan_lib.round_off_dtype(
        jax.eval_shape(apply_fn, w_lin,
                       jax.ShapeDtypeStruct((1,) + x0.shape[1:], x0.dtype)).dtype, w_lin,
        keep_rows=solver == Solver.DUAL and solvers.dual_keeps_rows(n, opts.batch_size))
    # κ: the dual's from its Cholesky factor, cg's `linalg.cg_condition_estimate`
    linalg.check_precision(_rule_kappa(info, solver), dtype, source, what=what,
                           damping=opts.damping)
    if solver == Solver.CG:
      tol = solvers.default_cg_tol(dtype) if opts.cg_tol is None else opts.cg_tol
      linalg.runtime_check(
          info.converged, SolveError,
          f"{what} did not reach its tolerance {tol:.1e} (relative residual {{}}, damping {{}}): "
          "raise cg_maxiter, increase the damping, or use the dual or the closed form "
          "(finetune.linearized_solver='dual' or 'closed_form')", info.relative_residual,
          jnp.asarray(opts.damping))
    return ntk.apply_delta(w_lin, step), info

  def diagnostics(plan, info, *, params, new_params, seconds, compile_seconds,
                  measured_bytes=None, reason_suffix="", extra=None):
    return make_diagnostics(plan, info, update_norm=_distance(new_params, params),
                            seconds=seconds, compile_seconds=compile_seconds,
                            measured_bytes=measured_bytes, reason_suffix=reason_suffix,
                            extra=extra)

  def forget_with_diagnostics(params_init, params, retain, forget, *, plan=None):
    if plan is None:
      plan = plan_fn(params_init, params, retain, forget, traced=True)
    probe = peak_memory_probe()
    args = (params_init, params, retain, forget)
    run_planned = lambda *a: forget_with_info(*a, plan=plan, with_condition=True)
    if plan.keep_jacobian_rows:
      # Run eagerly: the rows are then taken by a host loop over one compiled block step
      # (`ntk._scan`), not a rolled XLA loop (slower per block on XLA:CPU); the linear
      # algebra is a few large operations either way.
      with ntk.compile_timer() as compiled_blocks:
        start = time.perf_counter()
        new, info = jax.block_until_ready(run_planned(*args))
        elapsed = time.perf_counter() - start
      compile_seconds = compiled_blocks["seconds"]
      seconds = elapsed - compile_seconds
    else:
      executable, compile_seconds = compiled(("forget", repr(plan)), run_planned, *args)
      start = time.perf_counter()
      new, info = jax.block_until_ready(executable(*args))
      seconds = time.perf_counter() - start
    check(info, plan)
    diag = diagnostics(plan, info, params=params, new_params=new, seconds=seconds,
                       compile_seconds=compile_seconds, measured_bytes=probe())
    log.info("ntk_forget: solver=%s, %.3f s (compilation %.1f s apart), condition number %s",
             diag.solver, diag.seconds, diag.compile_seconds, diag.condition_number)
    return new, diag

  def accumulate(w_lin, x, y, *, chunk_rows, state=None, on_chunk=None, mesh=None):
    rows = validate.check_positive_int("chunk_rows", chunk_rows)
    p, dtype = ntk.num_params(w_lin), solve_dtype_of(w_lin)
    if state is None:
      state = {"g": np.zeros((p, p), dtype), "b": np.zeros((p,), dtype), "next": 0}
    compile_seconds = 0.0
    if mesh is None:
      # Compiled before any chunk runs (every chunk has this shape), so that the caller can
      # time the accumulation apart from XLA's compilation.
      example = (np.zeros((rows,) + x.shape[1:], x.dtype), np.zeros(rows, np.int32),
                 np.zeros(rows, np.float32))
      executable, compile_seconds = compiled("gram_stats", gram_stats, w_lin, *example)
      chunk = lambda xc, yc, wc: executable(w_lin, xc, yc, wc)
    else:  # each chunk's rows split over the devices, one all-reduce per statistic
      stats = sharding.data_parallel_sum(gram_stats, mesh, block_size=opts.batch_size)
      chunk = lambda xc, yc, wc: stats(w_lin, xc, yc, wc)
    y = np.asarray(y, np.int32)  # the compiled chunk's label dtype, whatever x64 says
    state = solvers.accumulate_chunks(chunk, x, y, chunk_rows=rows, state=state,
                                      on_chunk=on_chunk or (lambda _: None))
    return state, compile_seconds

  def certify(params_init, params, retain, *, linearized=True, retain_stats=None,
              witness_iterations=CERTIFICATE_CG_STEPS, witness=None, basis="auto"):
    return certificate.certify(
        apply_fn, params_init, params, retain, num_classes=c, damping=opts.damping,
        batch_size=opts.batch_size, linearized=linearized, dtype=opts.solve_dtype,
        witness=witness, witness_iterations=witness_iterations, retain_stats=retain_stats,
        basis=basis)

  def init(params_init, train, *, timings=None):
    return stream.init_forget_state(apply_fn, params_init, train=train, num_classes=c,
                                    damping=opts.damping, batch_size=opts.batch_size,
                                    solve_dtype=opts.solve_dtype, timings=timings,
                                    **stream_options)

  def restore(arrays, params_init, train):
    sdtype = solve_dtype_of(params_init)
    why = stream.stale_reason(arrays, params_init=params_init, train=train,
                              damping=opts.damping, solve_dtype=sdtype)
    if why is not None:
      raise ValueError(f"the stored state of D {why}")
    return stream.state_from_arrays(
        {**{k: v for k, v in arrays.items() if k != "w_lin"}, "w_lin": params_init},
        apply_fn=apply_fn, num_classes=c, batch_size=opts.batch_size,
        factor_update=factor_update, refactor_every=refactor_every)

  def serve_with_diagnostics(state, params, indices):
    indices = np.asarray(indices)
    # The request's computation compiles on its first call: served once untimed on the same
    # shapes (the state is immutable, so this changes nothing), then timed.
    start = time.perf_counter()
    jax.block_until_ready(stream.forget_request(state, params, indices))
    first = time.perf_counter() - start
    start = time.perf_counter()
    new, after = jax.block_until_ready(stream.forget_request(state, params, indices))
    seconds = time.perf_counter() - start
    # κ of both matrices the result was solved with (G + λI of D for the state's solution,
    # G_r + λI for the request's), as the one-shot primal reports; the stream's own estimate
    # is a lower bound only.
    lam = float(after.damping)
    cond = max(linalg.ridge_condition_number(after.gram, lam),
               linalg.ridge_condition_number(state.gram, lam))
    n, p = state.num_samples, state.num_params
    itemsize = jnp.dtype(after.rhs.dtype).itemsize
    cached = state.jac is not None
    # Recomputed request rows carry the network's round-off into G - J_fᵀJ_f.
    source = None if cached else jnp.result_type(*jax.tree_util.tree_leaves(state.w_lin))
    diag = Diagnostics(
        solver=Solver.PRIMAL.value, reason="served as a request on the state of D",
        kernel=None, num_params=p, num_outputs=n * c, condition_number=cond,
        cg_relative_residual=None, converged=True,
        estimated_bytes=int(itemsize * (3 * p * p + (n * c * p if cached else 0))),
        measured_bytes=None, seconds=seconds, compile_seconds=max(first - seconds, 0.0),
        update_norm=_distance(new, params), costs={},
        precision_warning=linalg.precision_warning(cond, after.rhs.dtype, source),
        extra={"request_seconds": seconds, "jacobian_cache": cached,
               "condition_estimate": float(after.last_condition_estimate),
               "factor_update": stream.UPDATE_NAMES[int(after.last_update)]})
    return new, after, diag

  return Forgetter(options=opts, plan=plan_fn, forget=forget_fn,
                   forget_with_info=forget_with_info, check=check, gram_stats=gram_stats,
                   from_gram_stats=from_gram_stats, kernel_stats=kernel_stats,
                   from_kernel_stats=from_kernel_stats,
                   ridge_from_kernel_stats=ridge_from_kernel_stats, ridge_solution=ridge_solution,
                   forget_with_diagnostics=forget_with_diagnostics, accumulate=accumulate,
                   diagnostics=diagnostics, certify=certify, init=init,
                   serve=stream.forget_request, serve_with_diagnostics=serve_with_diagnostics,
                   restore=restore)


def _distance(a: PyTree, b: PyTree) -> float:
  """‖a − b‖₂ over the ravelled pytrees, in float64 on the host."""
  flat = lambda t: np.concatenate([np.asarray(l, np.float64).ravel()
                                   for l in jax.tree_util.tree_leaves(t)] or [np.zeros(0)])
  return float(np.linalg.norm(flat(a) - flat(b)))


def _rule_kappa(info: linalg.SolveInfo, solver: Solver):
  """The κ the precision rule judges: `info.kappa`; for cg its estimate, and 1 (nothing to
  judge: its residual test remains) where that is unknown (NaN: damping 0)."""
  if solver != Solver.CG:
    return info.kappa
  estimate = jnp.asarray(info.condition_estimate)
  return jnp.where(jnp.isnan(estimate), 1.0, estimate)


def check_solve(info: linalg.SolveInfo, plan: plan_lib.Plan, damping, cg_tol=None) -> None:
  """Raises `SolveError` for a non-finite update, a direct solve that fails the precision rule
  (`linalg.check_precision`: κ·ε > 1, ε of the solve dtype or of the logits when narrower; a
  `PrecisionWarning` when κ·ε > 1e-3), or an unconverged cg; now, or when the jitted
  computation runs."""
  dtype = jnp.dtype(plan.solve_dtype)
  what = f"the Fast-NTK update ({plan.solver.value} solve)"
  linalg.runtime_check(
      info.finite, SolveError,
      f"{what} is non-finite (damping {{}}): the system is singular or overflows in "
      f"{dtype.name}; {linalg.precision_remedy(dtype)}", jnp.asarray(damping))
  # cg's κ is `linalg.cg_condition_estimate`: one rule for every solver
  linalg.check_precision(_rule_kappa(info, plan.solver), dtype, plan.logits_dtype, what=what,
                         damping=damping)
  if plan.solver == Solver.CG:
    tol = solvers.default_cg_tol(dtype) if cg_tol is None else cg_tol
    linalg.runtime_check(
        info.converged, SolveError,
        f"cg did not reach its tolerance {tol:.1e} within {plan.cg_maxiter} iterations "
        "(relative residual {}, damping {}): the result would be inaccurate; raise "
        "cg_maxiter, increase damping, or use solver='primal' or 'dual'",
        info.relative_residual, jnp.asarray(damping))


def ntk_forget(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *, retain, forget,
               num_classes: int, damping=1e-2, solver: str = "auto",
               batch_size: Optional[int] = 256, kernel_impl: str = "auto",
               solve_dtype=None, linearize_at: str = "init", step_scale: float = 1.0,
               cg_tol: Optional[float] = None, cg_maxiter: Optional[int] = None,
               memory_limit_bytes: Optional[int] = None,
               duplicate_tolerance: float = 0.0) -> PyTree:
  """Forgets `forget` from `params` with the Fast-NTK update (docs/derivation.md §1).

  The one-call form of `make_forgetter(apply_fn, ...).forget`: pure and jit-able (shapes
  drive every choice; values are checked when concrete, also under jit when closed over).

  Args:
    apply_fn, num_classes, damping, solver, batch_size, kernel_impl, solve_dtype,
      linearize_at, step_scale, cg_tol, cg_maxiter, memory_limit_bytes,
      duplicate_tolerance: see `make_forgetter`.
    params_init: w0, the trainable params before fine-tuning (the linearisation point).
    params: w_D, the trainable params after fine-tuning on D = D_r ∪ D_f (same structure,
      shapes and dtypes as params_init).
    retain: (x_r [n_r, ...], y_r [n_r] int labels in [0, C)): the rest of D.
    forget: (x_f [n_f, ...], y_f [n_f] int labels in [0, C)): samples of D, each once and
      none of them in `retain` (refused otherwise). A sample that was never in D cannot be
      detected from values: the update would move the parameters as if it had been trained
      on, so pass only samples of D (or serve requests by index, `Forgetter.init`/`serve`).

  Returns:
    Pytree with exactly the structure, shapes and dtypes of `params`: w_D + step_scale·Δ.

  Raises:
    ValueError / TypeError: bad input (named in the message), before any heavy work.
    InsufficientMemoryError: predicted memory beyond the budget (names what would fit).
    SolveError: a non-finite update or an unconverged cg.
  """
  return make_forgetter(
      apply_fn, num_classes=num_classes, damping=damping, solver=solver,
      batch_size=batch_size, kernel_impl=kernel_impl, solve_dtype=solve_dtype,
      linearize_at=linearize_at, step_scale=step_scale, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
      memory_limit_bytes=memory_limit_bytes,
      duplicate_tolerance=duplicate_tolerance).forget(params_init, params, retain, forget)


@dataclasses.dataclass
class Diagnostics:
  """What one update measured (`Forgetter.forget_with_diagnostics`, `diagnostics`,
  `serve_with_diagnostics`).

  Attributes:
    solver: the solver that ran. reason: why it was chosen. kernel: the dual's kernel
      implementation that ran (None for primal/cg).
    num_params: p. num_outputs: n·C over D.
    condition_number: κ of the matrix inverted (dual: Θ_rr+λI; primal: G+λI); None for cg.
    cg_relative_residual: cg only: ‖A x - b‖/‖b‖. converged: cg reached its tolerance.
    estimated_bytes: predicted peak working memory. measured_bytes: measured peak growth
      (device stats, or the process's peak RSS on CPU); None where unknown.
    seconds: wall-clock of the compiled update. compile_seconds: tracing and compiling.
    update_norm: ‖w − w_D‖₂. costs: every solver's predicted cost.
    precision_warning: the text of the `PrecisionWarning` the update gave (κ·ε > 1e-3), if any.
    extra: what a particular path adds (e.g. a served request's cold time).
  """
  solver: str
  reason: str
  kernel: Optional[str]
  num_params: int
  num_outputs: int
  condition_number: Optional[float]
  cg_relative_residual: Optional[float]
  converged: bool
  estimated_bytes: int
  measured_bytes: Optional[int]
  seconds: float
  compile_seconds: float
  update_norm: float
  costs: dict
  precision_warning: Optional[str] = None
  extra: dict = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict:
    out = dataclasses.asdict(self)
    return {**{k: v for k, v in out.items() if k != "extra"}, **out["extra"]}


def make_diagnostics(plan: plan_lib.Plan, info: linalg.SolveInfo, *, update_norm: float,
                     seconds: float, compile_seconds: float, measured_bytes=None,
                     reason_suffix: str = "", extra: Optional[dict] = None) -> Diagnostics:
  """The `Diagnostics` of a finished, checked update (its warning was given by the check)."""
  cond = float(info.condition_number)
  cond = None if np.isnan(cond) else cond
  return Diagnostics(
      solver=plan.solver.value, reason=plan.reason + reason_suffix,
      kernel=plan.kernel.value if plan.kernel is not None else None,
      num_params=plan.num_params, num_outputs=plan.num_outputs, condition_number=cond,
      cg_relative_residual=(float(info.relative_residual) if plan.solver == Solver.CG
                            else None),
      converged=bool(info.converged), estimated_bytes=plan.costs[plan.solver.value].bytes,
      measured_bytes=measured_bytes, seconds=seconds, compile_seconds=compile_seconds,
      update_norm=update_norm, costs={k: dataclasses.asdict(v) for k, v in plan.costs.items()},
      precision_warning=linalg.precision_warning(cond, plan.solve_dtype, plan.logits_dtype,
                                                 what=f"the {plan.solver.value} solve"),
      extra=dict(extra or {}))


def peak_memory_probe() -> Callable[[], Optional[int]]:
  """Returns a function giving the peak memory growth (bytes) since this call, or None."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      base = stats.get("bytes_in_use", 0)
      return lambda: int((device.memory_stats() or {}).get("peak_bytes_in_use", 0) - base)
    return lambda: None
  import resource  # pylint: disable=g-import-not-at-top
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  return lambda: int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def ntk_forget_with_diagnostics(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *,
                                retain, forget, num_classes: int, **options
                                ) -> tuple[PyTree, Diagnostics]:
  """`ntk_forget` compiled and run, timed, with a `Diagnostics` record (compilation apart).

  A dual that keeps the Jacobian rows of D (`Plan.keep_jacobian_rows`) runs eagerly, its
  blocks through one compiled block step; every other update runs as one compiled program.

  Args: as `ntk_forget` (options are `make_forgetter`'s).

  Returns:
    (new params like `params`, Diagnostics).

  Raises:
    As `ntk_forget`; a non-finite update or an unconverged cg raises `SolveError`.
  """
  forgetter = make_forgetter(apply_fn, num_classes=num_classes, **options)
  return forgetter.forget_with_diagnostics(params_init, params, retain, forget)


def ntk_forget_requests(apply_fn: ApplyFn, params_init: PyTree, params: PyTree, *, train,
                        requests: Sequence, num_classes: int, damping=1e-2,
                        **stream_options):
  """Serves a sequence of forget requests one after another, each incrementally.

  The Gram matrix of D and its Cholesky factor are computed once at w0 and downdated per
  request (`stream`), so a later request costs a small fraction of the first. After k
  requests the params equal `ntk_forget` with the union of the k forget sets.

  Args:
    apply_fn, params_init, params, num_classes, damping: as for `ntk_forget` (damping > 0).
    train: (x [n, ...], y [n]) the whole fine-tuning set D; requests index into it.
    requests: a sequence of integer index arrays, one per deletion request.
    **stream_options: `stream.init_forget_state`'s (batch_size, solve_dtype, ...).

  Returns:
    (params after the last request, the final `stream.ForgetState`).
  """
  state = stream.init_forget_state(apply_fn, params_init, train=train, num_classes=num_classes,
                                   damping=damping, **stream_options)
  return stream.forget_requests(state, params, requests)
