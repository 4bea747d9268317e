"""Each result is right or refused: the edge cases that returned wrong numbers without a word.

Every test here failed on d97aaa7 (issue 11, findings 1-8); the reference answers are ridge
solutions computed independently with NumPy on models linear in their parameters
(`test_unlearn_exact.LinearModel`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from x64 import enable_x64

from fastntk_jax.experiment import report
from fastntk_jax import unlearn
from fastntk_jax.unlearn import stream
from fastntk_jax import linalg
from fastntk_jax.unlearn import plan as unlearn_plan
from test_unlearn_exact import make_problem, ridge

C = 3


def _setup(n_r, n_f, pa, pw, seed=0, params_dtype=jnp.float64, x_dtype=jnp.float64):
  """Model, data, w0 and the ridge solutions w_D (on D) and w_r (on D_r) for a given λ."""
  model, x_r, y_r, x_f, y_f, w0 = make_problem(n_r, n_f, C, pa, pw, seed=seed)
  phi_r, phi_f = model.features(x_r), model.features(x_f)
  phi = np.concatenate([phi_r, phi_f])
  onehot = lambda y: np.eye(C)[y]
  y_all = np.concatenate([onehot(y_r), onehot(y_f)])
  cast = lambda t: jax.tree_util.tree_map(lambda l: l.astype(params_dtype), t)

  def solutions(lam):
    w_d = ridge(phi, w0, y_all, lam)
    w_r = ridge(phi_r, w0, onehot(y_r), lam)
    return cast(model.unravel(w_d)), w_r

  retain = (jnp.asarray(x_r, x_dtype), jnp.asarray(y_r))
  forget = (jnp.asarray(x_f, x_dtype), jnp.asarray(y_f))
  return model, cast(model.unravel(w0)), retain, forget, solutions


def _flat(tree):
  return np.concatenate([np.asarray(l, np.float64).reshape(-1)
                         for l in jax.tree_util.tree_leaves(tree)])


def _rel(new, w_r, w0):
  # Relative to the size of the update the solvers must compute.
  return np.linalg.norm(_flat(new) - w_r) / np.linalg.norm(w_r - _flat(w0))


# 1. auto with damping = 0 picked the primal solver, whose Grams are then singular: NaN.
@pytest.mark.slow
def test_auto_with_zero_damping_never_picks_a_singular_solver():
  with enable_x64():
    # p = 44 > n*C = 27 (and the features' rank, 33 >= 27): the kernel is invertible, the
    # p x p Grams of D_r are not.
    model, w0, retain, forget, solutions = _setup(n_r=7, n_f=2, pa=20, pw=21)
    w_d, w_r = solutions(0.0)
    # In small blocks, run eagerly, the dual recomputes Jacobians per block pair: by FLOPs
    # alone auto would take the primal, whose Grams are singular at damping = 0.
    costs = unlearn_plan.estimate_costs(44, 7, 2, C, batch_size=2, dtype_bytes=8, traced=False,
                                   network=unlearn_plan.network_cost(model.apply, w0, retain[0]))
    assert costs["primal"].flops < costs["dual"].flops
    new = unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget,
                             num_classes=C, damping=0.0, solver="auto", batch_size=2)
    assert _rel(new, w_r, w0) < 1e-6
    # A budget that only cg fits: cg solves it in output space (p > n·C).
    new = unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget,
                             num_classes=C, damping=0.0, batch_size=2,
                             memory_limit_bytes=costs["cg"].bytes + 1)
    assert _rel(new, w_r, w0) < 1e-8


# 2. damping = 0 on a singular kernel: NaN from the dual and auto; cg 2.9e2 off at p = n·C.
@pytest.mark.slow
def test_zero_damping_on_a_singular_kernel_is_refused_or_solved_exactly():
  with enable_x64():
    # A retain sample duplicated: Θ_rr is singular, the system consistent (same label).
    model, w0, (x_r, y_r), forget, solutions = _setup(n_r=6, n_f=2, pa=20, pw=21)
    retain = (jnp.concatenate([x_r, x_r[:1]]), jnp.concatenate([y_r, y_r[:1]]))
    w_d, w_r = solutions(0.0)  # the duplicate changes neither ridge solution at λ = 0
    with pytest.raises(unlearn.SolveError, match="non-finite.*singular"):
      unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C,
                         damping=0.0, solver="dual")
    # cg works in output space (p > n·C) and finds the minimum-norm solution.
    new = unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget,
                             num_classes=C, damping=0.0, solver="cg")
    assert _rel(new, w_r, w0) < 1e-8
    try:
      new = unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget,
                               num_classes=C, damping=0.0, solver="auto")
    except unlearn.SolveError as e:
      assert "damping" in str(e)
    else:
      assert _rel(new, w_r, w0) < 1e-8
    # p = n·C = 33: cg would work in parameter space, where the Gram of D_r is singular.
    model, w0, retain, forget, solutions = _setup(n_r=9, n_f=2, pa=16, pw=14)
    w_d, _ = solutions(0.0)
    with pytest.raises(ValueError, match="solver='cg' with damping=0"):
      unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C,
                         damping=0.0, solver="cg")


# 3. cg stopped at min(2·dim, 2000) iterations, far from its tolerance, and said nothing.
@pytest.mark.slow
def test_cg_is_accurate_or_refused():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=16, n_f=6, pa=16, pw=17)  # p < n*C
    for lam in (1e-5, 1e-4):
      w_d, w_r = solutions(lam)
      new = unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget,
                               num_classes=C, damping=lam, solver="cg")
      assert _rel(new, w_r, w0) < 1e-6, lam
    w_d, _ = solutions(1e-5)
    with pytest.raises(unlearn.SolveError, match="cg did not reach its tolerance"):
      unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C,
                         damping=1e-5, solver="cg", cg_maxiter=5)
    forgetter = unlearn.make_forgetter(model.apply, num_classes=C, damping=1e-5, solver="cg",
                                       cg_maxiter=5)
    _, info = forgetter.forget_with_info(w0, w_d, retain, forget)
    assert not bool(info.converged)
    assert forgetter.plan(w0, w_d, retain, forget).cg_maxiter == 5
    # auto, with a budget only cg fits, refuses a cg capped below the system's dimension.
    costs = unlearn_plan.estimate_costs(36, 16, 6, C, dtype_bytes=8, cg_maxiter=5)
    with pytest.raises(unlearn.InsufficientMemoryError, match="cg is excluded: cg_maxiter=5"):
      unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C,
                         damping=1e-5, cg_maxiter=5, memory_limit_bytes=costs["cg"].bytes + 1)


# 4. jit over the damping with the data closed over raised ConcretizationTypeError.
@pytest.mark.parametrize("solver", ["dual", "primal", "cg", "auto"])
def test_jit_over_damping_with_data_closed_over(solver):
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, w_r = solutions(1e-2)
    update = jax.jit(lambda lam: unlearn.ntk_forget(
        model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C, damping=lam,
        solver=solver))
    assert _rel(update(1e-2), w_r, w0) < 1e-6
    # Traced damping: a bad value is caught when the computation runs.
    for bad in (-1e6, -0.01, jnp.nan):
      with pytest.raises(Exception, match="damping must be a finite number >= 0"):
        jax.block_until_ready(update(bad))


# 5. solve_dtype=float64 did not reach dual and cg (tangents cast to the params' dtype).
@pytest.mark.slow
@pytest.mark.parametrize("solver", ["dual", "primal", "cg"])
def test_float64_solve_reaches_every_solver_with_float32_params(solver):
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17,
                                                  params_dtype=jnp.float32)
    w_d, _ = solutions(1e-3)
    # The reference: the same update from the float32 params, in float64 throughout.
    w0_64, w_d_64 = (jax.tree_util.tree_map(lambda l: l.astype(jnp.float64), t)
                     for t in (w0, w_d))
    ref = unlearn.ntk_forget(model.apply, w0_64, w_d_64, retain=retain, forget=forget,
                             num_classes=C, damping=1e-3, solver="primal")
    new = unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C,
                             damping=1e-3, solver=solver, solve_dtype=jnp.float64)
    delta, delta_ref = _flat(new) - _flat(w_d), _flat(ref) - _flat(w_d)
    # float32 params round the result once (~6e-8 of |w|); the solve itself is float64.
    assert np.linalg.norm(delta - delta_ref) / np.linalg.norm(delta_ref) < 1e-5


def test_narrow_logits_are_named_in_the_precision_warning():
  assert "float32 logits" in linalg.precision_warning(1e8, jnp.float64, jnp.float32)
  assert linalg.precision_warning(1e8, jnp.float64, jnp.float64) is None


# 6. The default solve dtype came from params_init; mixed float32/float64 leaves crashed.
def test_params_and_params_init_must_agree_in_dtype():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, _ = solutions(1e-2)
    w0_32 = jax.tree_util.tree_map(lambda l: l.astype(jnp.float32), w0)
    with pytest.raises(TypeError, match=r"differ in dtype at \['a'\]: float64 vs float32"):
      unlearn.ntk_forget(model.apply, w0_32, w_d, retain=retain, forget=forget, num_classes=C)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["dual", "primal", "cg"])
def test_leaves_of_mixed_dtypes(solver):
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, w_r = solutions(1e-2)
    mixed = lambda t: {"a": t["a"].astype(jnp.float32), "b": t["b"]}
    new = unlearn.ntk_forget(model.apply, mixed(w0), mixed(w_d), retain=retain, forget=forget,
                             num_classes=C, damping=1e-2, solver=solver,
                             solve_dtype=jnp.float32)
    assert jax.tree_util.tree_map(lambda l: l.dtype, new) == jax.tree_util.tree_map(
        lambda l: l.dtype, mixed(w_d))
    assert _rel(new, w_r, w0) < 1e-3  # a float32 solve
    # The default solve dtype is the widest of the leaves: float64 here.
    new64 = unlearn.ntk_forget(model.apply, mixed(w0), mixed(w_d), retain=retain,
                               forget=forget, num_classes=C, damping=1e-2, solver=solver)
    assert _rel(new64, w_r, w0) < 1e-6


# 7. The stream under jit skipped every check: repeated / out-of-range / forgotten indices.
@pytest.mark.slow
def test_stream_requests_under_jit_are_checked():
  with enable_x64():
    model, w0, (x_r, y_r), (x_f, y_f), solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, _ = solutions(1e-2)
    train = (jnp.concatenate([x_r, x_f]), jnp.concatenate([y_r, y_f]))
    state = stream.init_forget_state(model.apply, w0, train=train, num_classes=C, damping=1e-2)
    serve = jax.jit(stream.forget_request)
    for bad, why in (([2, 2], r"1 sample\(s\) named more than once"),
                     ([3, 11], r"1 index\(es\) out of range"),
                     ([-1], r"1 index\(es\) out of range"),
                     (list(range(11)), r"0 sample\(s\) of D would be left")):
      with pytest.raises(Exception, match=why):
        jax.block_until_ready(serve(state, w_d, jnp.asarray(bad)))
    params, state2 = serve(state, w_d, jnp.asarray([4, 5]))
    with pytest.raises(Exception, match=r"1 already forgotten"):
      jax.block_until_ready(serve(state2, params, jnp.asarray([5, 6])))
    # A valid request under jit equals the eager, host-checked one.
    eager, _ = stream.forget_request(state, w_d, [4, 5])
    np.testing.assert_allclose(_flat(params), _flat(eager), rtol=1e-10, atol=1e-12)


# 8. Nothing recorded which kernel ran; versions listed neural-tangents when it failed.
@pytest.mark.slow
def test_the_kernel_that_ran_is_recorded():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=4, n_f=2, pa=16, pw=17)
    w_d, _ = solutions(1e-2)
    _, diag = unlearn.ntk_forget_with_diagnostics(
        model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C, solver="dual",
        kernel_impl="jax")
    assert diag.kernel == "jax"
    _, diag = unlearn.ntk_forget_with_diagnostics(
        model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C, solver="dual")
    expected = ("neural_tangents" if unlearn.KernelImplementation.NEURAL_TANGENTS
                == __import__("fastntk_jax.ntk").ntk.resolve_implementation("auto") else "jax")
    assert diag.kernel == expected
    _, diag = unlearn.ntk_forget_with_diagnostics(
        model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C, solver="primal")
    assert diag.kernel is None


def test_versions_list_neural_tangents_only_when_it_imports(monkeypatch):
  from fastntk_jax import ntk
  monkeypatch.setattr(ntk, "neural_tangents_available", lambda: False)
  v = report.versions()
  assert v["neural-tangents"] is None
  monkeypatch.setattr(ntk, "neural_tangents_available", lambda: True)
  v2 = report.versions()
  assert "neural-tangents (not importable)" not in v2


# ---------------------------------------------------------------------------------------
# Found by the review of this change (a new user's attack): each failed before its fix.
# ---------------------------------------------------------------------------------------


def _right_or(error, fn, check):
  """`fn()` either raises `error` or returns a result that passes `check`."""
  try:
    out = fn()
  except error:
    return None
  check(out)
  return out


@pytest.mark.slow
def test_float32_auto_never_returns_a_solve_it_measured_as_singular():
  # float32 (no x64), p = 31 > n*C = 18, tiny damping: the primal's Gram is rank-deficient.
  model, w0, retain, forget, solutions = _setup(n_r=4, n_f=2, pa=12, pw=16,
                                                params_dtype=jnp.float32, x_dtype=jnp.float32)
  for lam in (3e-6, 1e-5):
    w_d, w_r = solutions(lam)
    run = lambda: unlearn.ntk_forget(model.apply, w0, w_d, retain=retain, forget=forget,
                                     num_classes=C, damping=lam, solver="auto")
    _right_or(unlearn.SolveError, run, lambda new: _rel(new, w_r, w0) < 1e-3)
    # The primal, named: refused, or right to 1e-3, or warned with its bound.
    import warnings
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      new = _right_or(unlearn.SolveError, lambda: unlearn.ntk_forget(
          model.apply, w0, w_d, retain=retain, forget=forget, num_classes=C, damping=lam,
          solver="primal"), lambda new: None)
    if new is not None and _rel(new, w_r, w0) > 1e-3:
      assert any(issubclass(w.category, unlearn.PrecisionWarning) for w in caught)


@pytest.mark.slow
def test_narrow_logits_make_an_imprecise_update_refused_or_warned():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=4, n_f=2, pa=12, pw=16)
    w_d, w_r = solutions(1e-4)
    half = lambda w, x: model.apply(w, x).astype(jnp.float16)
    with pytest.warns(unlearn.PrecisionWarning, match="float16 logits") as record:
      try:
        new = unlearn.ntk_forget(half, w0, w_d, retain=retain, forget=forget, num_classes=C,
                                 damping=1e-4, solver="dual")
      except unlearn.SolveError as e:
        assert "float16 logits" in str(e)
        import warnings
        warnings.warn("float16 logits (refused)", unlearn.PrecisionWarning)
    assert record


@pytest.mark.slow
def test_float32_stream_warns_when_its_error_bound_grows():
  model, w0, (x_r, y_r), (x_f, y_f), solutions = _setup(n_r=50, n_f=10, pa=14, pw=13,
                                                        params_dtype=jnp.float32,
                                                        x_dtype=jnp.float32)
  x, y = jnp.concatenate([x_r, x_f]), jnp.concatenate([y_r, y_f])
  w_d, _ = solutions(1e-4)
  state = stream.init_forget_state(model.apply, w0, train=(x, y), num_classes=C,
                                   damping=1e-4)
  params, warned = w_d, []
  import warnings
  for start in range(0, 56, 4):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        params, state = stream.forget_request(state, params, list(range(start, start + 4)))
      except unlearn.SolveError:
        warned.append(True)
        break
    warned.append(any(issubclass(w.category, unlearn.PrecisionWarning) for w in caught))
    bound = float(state.last_condition_estimate) * np.finfo(np.float32).eps
    assert warned[-1] == (bound > 1e-3), (start, bound)
  assert any(warned)  # the last requests leave 4 samples for p = 29: the bound is large


@pytest.mark.slow
def test_half_precision_params_solve_in_float32_and_cg_convergence_is_checked():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, w_r = solutions(1e-1)
  to16 = lambda t: jax.tree_util.tree_map(lambda l: jnp.asarray(l, jnp.bfloat16), t)
  retain = (retain[0].astype(jnp.float32), retain[1])
  forget = (forget[0].astype(jnp.float32), forget[1])
  for solver in ("dual", "primal", "cg"):
    run = lambda: unlearn.ntk_forget(model.apply, to16(w0), to16(w_d), retain=retain,
                                     forget=forget, num_classes=C, damping=1e-1, solver=solver)
    _right_or(unlearn.SolveError, run, lambda new: _rel(new, w_r, w0) < 5e-2)


def test_traced_inputs_are_checked_when_the_computation_runs():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, _ = solutions(1e-2)
    update = jax.jit(lambda a, b, xr, yr, xf, yf: unlearn.ntk_forget(
        model.apply, a, b, retain=(xr, yr), forget=(xf, yf), num_classes=C, solver="primal"))
    bad_labels = forget[1].at[0].set(7)
    with pytest.raises(Exception, match=r"forget labels must lie in \[0, 3\)"):
      jax.block_until_ready(update(w0, w_d, *retain, forget[0], bad_labels))
    nan_params = jax.tree_util.tree_map(lambda l: l.at[(0,) * l.ndim].set(jnp.nan), w_d)
    with pytest.raises(Exception, match="params contains non-finite"):
      jax.block_until_ready(update(w0, nan_params, *retain, *forget))


def test_statistics_and_plans_must_belong_to_the_params():
  with enable_x64():
    model, w0, retain, forget, solutions = _setup(n_r=8, n_f=3, pa=16, pw=17)
    w_d, _ = solutions(1e-2)
    f = unlearn.make_forgetter(model.apply, num_classes=C, damping=1e-2, solver="primal")
    plan = f.plan(w0, w_d, retain, forget)
    p = plan.num_params
    small = {"b": w_d["b"]}
    stats = (jnp.eye(p), jnp.ones(p))
    with pytest.raises(ValueError, match="must be \\(G \\[p, p\\], b \\[p\\]\\) with p"):
      f.from_gram_stats(small, stats, stats, plan)
    other = unlearn.make_forgetter(model.apply, num_classes=C, damping=0.0, solver="dual")
    with pytest.raises(ValueError, match="solver='primal' with damping=0"):
      other.forget_with_info(w0, w_d, retain, forget, plan=plan)
    foreign = f.plan(w0, w_d, retain, (forget[0][:2], forget[1][:2]))
    with pytest.raises(ValueError, match="plan was made for other inputs"):
      f.forget_with_info(w0, w_d, retain, forget, plan=foreign)
    # forget_with_info returns JAX types only: it jits.
    new, info = jax.jit(f.forget_with_info)(w0, w_d, retain, forget)
    assert bool(info.finite) and bool(info.converged)


@pytest.mark.parametrize("options,error,match", [
    (dict(damping="0.01"), TypeError, "damping must be a real number"),
    (dict(damping=True), TypeError, "damping must be a real number"),
    (dict(damping=1j), TypeError, "damping must be a real number"),
    (dict(step_scale="a"), ValueError, "step_scale must be a finite number"),
    (dict(factor_update="x"), ValueError, "unknown factor_update 'x'"),
    (dict(solve_dtype=jnp.float16), ValueError, "solve_dtype must be float32 or float64"),
])
def test_options_are_refused_clearly_at_the_factory(options, error, match):
  with pytest.raises(error, match=match):
    unlearn.make_forgetter(lambda w, x: x, num_classes=C, **options)


def test_stream_refuses_zero_damping_naming_the_fix_it_has():
  model, w0, retain, _, _ = _setup(n_r=8, n_f=3, pa=16, pw=17, params_dtype=jnp.float32)
  with pytest.raises(ValueError, match="use damping > 0"):
    stream.init_forget_state(model.apply, w0, train=retain, num_classes=C, damping=0.0)


def test_integer_logits_are_refused():
  w = {"w": jnp.ones((4, C))}
  x = jnp.arange(24, dtype=jnp.int32).reshape(6, 4)
  with pytest.raises(TypeError, match="int32 logits"):
    unlearn.ntk_forget(lambda p, xx: xx @ p["w"].astype(jnp.int32), w, w,
                       retain=(x[:5], jnp.zeros(5, jnp.int32)),
                       forget=(x[5:], jnp.zeros(1, jnp.int32)), num_classes=C)
