"""Streaming forget requests (fastntk_jax.unlearn.stream): exactness, factor downdates, pytree, refusals.

The reference results are computed independently: the ridge solutions with numpy from an
explicitly built feature matrix Φ of a model linear in its parameters, and the single-call
`unlearn.ntk_forget` with the union of the requests.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from x64 import enable_x64
from jax.flatten_util import ravel_pytree

from fastntk_jax import unlearn
from fastntk_jax.unlearn import stream

C = 3
D_IN = 4
Q = 10  # mixing features: p = C (bias) + D_IN*C (kernel) + Q = 25


class CrossClassLinear:
  """f(w, x)_c = bias_c + Σ_k x_k kernel[k, c] + Σ_j g_j(x) K[j, c] mix_j,  g = cos(x R).

  Linear in w = {"head": {"bias", "kernel"}, "mix"} (a 3-leaf, 2-level pytree). The `mix`
  weights are shared by all classes through K, so each sample's C×C kernel block is dense.
  """

  def __init__(self, seed=0):
    rng = np.random.default_rng(seed)
    self.r = rng.normal(size=(D_IN, Q))
    self.k = rng.normal(size=(Q, C)) / np.sqrt(Q)

  def apply(self, params, x):
    g = jnp.cos(x @ self.r)
    return (params["head"]["bias"] + x @ params["head"]["kernel"]
            + (g * params["mix"]) @ self.k)

  def features(self, x):
    """Φ [n*C, p], columns in ravel order: head/bias, head/kernel (row-major), mix."""
    x = np.asarray(x)
    n = x.shape[0]
    eye = np.eye(C)
    f_bias = np.broadcast_to(eye, (n, C, C))
    f_kernel = np.einsum("nk,ce->ncke", x, eye).reshape(n, C, D_IN * C)
    g = np.cos(x @ self.r)
    f_mix = np.einsum("nj,jc->ncj", g, self.k)
    return np.concatenate([f_bias, f_kernel, f_mix], axis=-1).reshape(n * C, -1)

  def unravel(self, vec):
    vec = jnp.asarray(vec)
    return {"head": {"bias": vec[:C], "kernel": vec[C:C + D_IN * C].reshape(D_IN, C)},
            "mix": vec[C + D_IN * C:]}


P = C + D_IN * C + Q


def ridge(phi, w0, y, lam):
  """w0 + (ΦᵀΦ + λI)⁻¹ Φᵀ(Y - Φw0), numpy float64 (the primal form of kernel ridge)."""
  e = np.eye(C)[y].reshape(-1) - phi @ w0
  return w0 + np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T @ e)


def problem(n, seed=0):
  rng = np.random.default_rng(seed + 7)
  model = CrossClassLinear(seed)
  x = rng.normal(size=(n, D_IN))
  y = rng.integers(0, C, size=n)
  w0 = 0.3 * rng.normal(size=P)
  return model, x, y, w0


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


REGIMES = {  # name: (n, λ, request sizes)
    "p<nC": (30, 0.1, (3, 5, 2)),   # n*C = 90 > p = 25: G has full rank, Θ does not
    "p>nC": (7, 1e-3, (1, 2, 1)),   # n*C = 21 < p = 25: G is singular, only λ keeps it PD
}


def requests_for(n, sizes, seed=1):
  perm = np.random.default_rng(seed).permutation(n)
  out, start = [], 0
  for k in sizes:
    out.append(perm[start:start + k])
    start += k
  return out


def test_features_match_model():
  with enable_x64():
    model, x, _, w0 = problem(5)
    np.testing.assert_allclose(model.features(x) @ w0,
                               np.asarray(model.apply(model.unravel(w0), jnp.asarray(x))).ravel(),
                               rtol=1e-12, atol=1e-12)
    assert flat(model.unravel(w0)).tolist() == w0.tolist()  # ravel order = feature order


@pytest.mark.slow
@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("factor_update,cache", [("downdate", True), ("refactor", False)])
def test_three_requests_equal_one_update_with_their_union(regime, factor_update, cache):
  n, lam, sizes = REGIMES[regime]
  with enable_x64():
    model, x, y, w0 = problem(n)
    phi = model.features(x)
    w_full = ridge(phi, w0, y, lam)
    reqs = requests_for(n, sizes)
    union = np.concatenate(reqs)
    keep = np.setdiff1d(np.arange(n), union)
    rows = lambda idx: (np.asarray(idx)[:, None] * C + np.arange(C)).ravel()
    w_retrain = ridge(phi[rows(keep)], w0, y[keep], lam)
    assert np.linalg.norm(w_full - w_retrain) > 1e-2 * np.linalg.norm(w_retrain)

    state = stream.init_forget_state(
        model.apply, model.unravel(w0), train=(jnp.asarray(x), jnp.asarray(y)),
        num_classes=C, damping=lam, batch_size=4, cache_jacobian=cache,
        factor_update=factor_update)
    assert (state.jac is not None) == cache
    params = model.unravel(w_full)
    codes = []
    for idx in reqs:
      params, state = stream.forget_request(state, params, idx)
      codes.append(int(state.last_update))
    want_code = stream.UPDATE_DOWNDATE if factor_update == "downdate" else stream.UPDATE_REFACTOR
    assert codes == [want_code] * 3
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(model.unravel(w0))
    got = flat(params)

    # (2) the independent numpy ridge solution on D minus the union.
    rel_ridge = np.linalg.norm(got - w_retrain) / np.linalg.norm(w_retrain)
    # (1) one ntk_forget call with the union of the three forget sets.
    single = unlearn.ntk_forget(
        model.apply, model.unravel(w0), model.unravel(w_full),
        retain=(jnp.asarray(x[keep]), jnp.asarray(y[keep])),
        forget=(jnp.asarray(x[union]), jnp.asarray(y[union])),
        num_classes=C, damping=lam, solver="primal", batch_size=4)
    rel_single = np.linalg.norm(got - flat(single)) / np.linalg.norm(flat(single))
    print(f"{regime} {factor_update} cache={cache}: rel err vs numpy ridge {rel_ridge:.1e}, "
          f"vs ntk_forget(union) {rel_single:.1e}")
    assert rel_ridge < 1e-8, rel_ridge
    assert rel_single < 1e-8, rel_single
    # The state's own solution is the retained ridge solution, and it knows what it forgot.
    np.testing.assert_allclose(np.asarray(state.solution) + w0, w_retrain, rtol=1e-8, atol=1e-10)
    assert np.flatnonzero(np.asarray(state.forgotten)).tolist() == sorted(union.tolist())
    assert int(state.num_requests) == 3


@pytest.mark.slow
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_downdated_factor_equals_fresh_cholesky_of_retained_system(regime):
  n, lam, sizes = REGIMES[regime]
  with enable_x64():
    model, x, y, w0 = problem(n)
    phi = model.features(x)
    state = stream.init_forget_state(model.apply, model.unravel(w0),
                                     train=(jnp.asarray(x), jnp.asarray(y)), num_classes=C,
                                     damping=lam, factor_update="downdate")
    params = model.unravel(w0)
    forgotten = []
    for idx in requests_for(n, sizes, seed=3):
      params, state = stream.forget_request(state, params, idx)
      forgotten.extend(idx.tolist())
      keep = np.setdiff1d(np.arange(n), forgotten)
      phi_r = phi[(keep[:, None] * C + np.arange(C)).ravel()]
      g = phi_r.T @ phi_r
      fresh = np.linalg.cholesky(g + lam * np.eye(P))
      assert int(state.last_update) == stream.UPDATE_DOWNDATE
      assert 0 < float(state.last_pivot_ratio) <= 1
      err = np.abs(np.asarray(state.chol) - fresh).max() / np.abs(fresh).max()
      assert err < 1e-12, err
      np.testing.assert_allclose(np.asarray(state.gram), g, atol=1e-11 * np.abs(g).max())
      assert np.allclose(np.triu(np.asarray(state.chol), 1), 0.0)


@pytest.mark.parametrize("p,m", [(5, 2), (70, 1), (70, 150), (96, 64)])
def test_cholesky_downdate_matches_numpy(p, m):
  """Shapes not multiples of the block (32) or chunk (64), several chunks, rank > p."""
  with enable_x64():
    rng = np.random.default_rng(p + m)
    rows = rng.normal(size=(m + 2 * p, p))
    a = rows.T @ rows + 0.1 * np.eye(p)
    x = rows[:m].T                              # A - XXᵀ = (rest)ᵀ(rest) + 0.1 I is PD
    l, ratio = jax.jit(stream.cholesky_downdate)(jnp.asarray(np.linalg.cholesky(a)),
                                                 jnp.asarray(x))
    want = np.linalg.cholesky(a - x @ x.T)
    assert np.abs(np.asarray(l) - want).max() < 1e-10 * np.abs(want).max()
    assert 0 < float(ratio) <= 1
    # Zero columns (request padding) change nothing.
    l0, r0 = stream.cholesky_downdate(jnp.asarray(want), jnp.zeros((p, 3)))
    np.testing.assert_array_equal(np.asarray(l0), want)
    assert float(r0) == 1.0


def test_cholesky_downdate_reports_loss_of_definiteness():
  with enable_x64():
    a = np.diag([4.0, 1.0, 9.0])
    x = np.array([[0.0], [2.0], [0.0]])          # 1 - 4 < 0: not PD
    _, ratio = stream.cholesky_downdate(jnp.asarray(np.linalg.cholesky(a)), jnp.asarray(x))
    assert not float(ratio) > 0


def _linear_state(n=30, lam=0.1, **kwargs):
  model, x, y, w0 = problem(n)
  state = stream.init_forget_state(model.apply, model.unravel(w0),
                                   train=(jnp.asarray(x), jnp.asarray(y)), num_classes=C,
                                   damping=lam, **kwargs)
  w_full = ridge(model.features(x), w0, y, lam)
  return model, x, y, w0, w_full, state


def _retrain(model, x, y, w0, lam, forgotten):
  keep = np.setdiff1d(np.arange(len(y)), forgotten)
  return ridge(model.features(x[keep]), w0, y[keep], lam)


def test_fallback_refactorises_when_the_downdate_fails():
  """A factor that no longer matches G (here: corrupted on purpose) makes the downdate lose
  definiteness; the request must notice, refactorise G' + λI and still be exact."""
  with enable_x64():
    model, x, y, w0, w_full, state = _linear_state(factor_update="downdate")
    state = state.replace(chol=state.chol * 1e-3)
    params, state = stream.forget_request(state, model.unravel(w_full), [0, 5])
    assert int(state.last_update) == stream.UPDATE_FALLBACK
    assert int(state.num_refactors) == 1
    want = _retrain(model, x, y, w0, 0.1, [0, 5])
    assert np.linalg.norm(flat(params) - want) / np.linalg.norm(want) < 1e-10


def test_refactor_every_and_auto():
  with enable_x64():
    model, x, y, w0, w_full, state = _linear_state(factor_update="downdate", refactor_every=2)
    params, codes, gone = model.unravel(w_full), [], []
    for i in range(5):
      params, state = stream.forget_request(state, params, [2 * i, 2 * i + 1])
      codes.append(int(state.last_update))
      gone += [2 * i, 2 * i + 1]
    d, r = stream.UPDATE_DOWNDATE, stream.UPDATE_REFACTOR
    assert codes == [d, d, r, d, d]
    assert int(state.num_refactors) == 1
    want = _retrain(model, x, y, w0, 0.1, gone)
    assert np.linalg.norm(flat(params) - want) / np.linalg.norm(want) < 1e-10
    # auto: a factorisation is cheaper than a downdate at this tiny p, not at p = 2000.
    _, _, _, _, _, auto = _linear_state(factor_update="auto")
    _, auto = stream.forget_request(auto, params, [0])
    assert int(auto.last_update) == r
    assert stream.downdate_flops(2000, 10) < stream.refactor_flops(2000)
    assert stream.downdate_flops(2000, 2000) > stream.refactor_flops(2000)


@pytest.mark.slow
def test_float32_downdates_stay_as_accurate_as_refactorising():
  """Twenty successive downdates in float32 (solve dtype float32) against the float64 truth:
  the streamed result must be as accurate as refactorising at every request."""
  model, x, y, w0 = problem(60)
  lam = 0.05
  with enable_x64():
    w_full = ridge(model.features(x), w0, y, lam)
  to32 = lambda v: jax.tree_util.tree_map(lambda l: jnp.asarray(l, jnp.float32), model.unravel(v))
  reqs = requests_for(60, [2] * 20, seed=5)
  with enable_x64():
    want = _retrain(model, x, y, w0, lam, np.concatenate(reqs))
  errs = {}
  for mode in ("downdate", "refactor"):
    state = stream.init_forget_state(model.apply, to32(w0),
                                     train=(jnp.asarray(x, jnp.float32), jnp.asarray(y)),
                                     num_classes=C, damping=lam, factor_update=mode)
    params = to32(w_full)
    for idx in reqs:
      params, state = stream.forget_request(state, params, idx)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))
    if mode == "downdate":
      assert int(state.num_refactors) == 0  # no fallback was needed
    errs[mode] = np.linalg.norm(flat(params).astype(np.float64) - want) / np.linalg.norm(want)
  print(f"float32, 20 requests: rel err downdate {errs['downdate']:.1e}, "
        f"refactor {errs['refactor']:.1e}")
  assert errs["downdate"] < 1e-4
  assert errs["downdate"] < 10 * errs["refactor"] + 1e-6


@pytest.mark.slow
def test_state_is_a_pytree_and_the_core_jits():
  with enable_x64():
    model, x, y, w0, w_full, state = _linear_state(factor_update="downdate")
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert all(isinstance(l, jax.Array) for l in leaves)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.apply_fn is state.apply_fn and again.num_classes == C
    doubled = jax.tree_util.tree_map(lambda a: a, state)
    assert isinstance(doubled, stream.ForgetState)
    assert isinstance(jax.jit(lambda s: s)(state), stream.ForgetState)

    params = model.unravel(w_full)
    idx = jnp.asarray([3, 4, 9])
    eager, s_eager = stream.forget_request(state, params, idx)
    # The whole request, traced indices and all, under the caller's jit.
    jitted, s_jit = jax.jit(stream.forget_request)(state, params, idx)
    np.testing.assert_allclose(flat(jitted), flat(eager), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(s_jit.forgotten), np.asarray(s_eager.forgotten))
    # Padding entries of serve_request are ignored.
    padded, _ = jax.jit(stream.serve_request)(state, params, jnp.asarray([3, 4, 9, 0]),
                                              jnp.asarray([True, True, True, False]))
    np.testing.assert_allclose(flat(padded), flat(eager), rtol=1e-12)
    # The input state is unchanged (pure function).
    assert not bool(jnp.any(state.forgotten))


def test_forget_requests_sequence_and_stream_from_scratch_state():
  with enable_x64():
    model, x, y, w0, w_full, state = _linear_state()
    reqs = [[1], [2, 3], [10, 11, 12, 13, 14]]
    params, final = stream.forget_requests(state, model.unravel(w_full), reqs)
    want = _retrain(model, x, y, w0, 0.1, sum(reqs, []))
    assert np.linalg.norm(flat(params) - want) / np.linalg.norm(want) < 1e-10
    np.testing.assert_array_equal(np.asarray(stream.retained_mask(final)),
                                  ~np.isin(np.arange(30), sum(reqs, [])))


@pytest.mark.slow
def test_bad_requests_are_refused():
  with enable_x64():
    model, x, y, w0, w_full, state = _linear_state(n=10)
    params = model.unravel(w_full)
    _, state = stream.forget_request(state, params, [0, 1])
    cases = [
        ([], "empty"),
        ([10], "out of range"),
        ([-1], "out of range"),
        ([1], "already forgotten"),
        ([2, 2], "more than once"),
        (list(range(2, 10)), "every remaining sample"),
        ([[2, 3]], "1-D"),
    ]
    for idx, msg in cases:
      with pytest.raises(ValueError, match=msg):
        stream.forget_request(state, params, idx)
    with pytest.raises(TypeError, match="integers"):
      stream.forget_request(state, params, [2.0])
    with pytest.raises(ValueError, match="request 1: .*already forgotten"):
      stream.forget_requests(state, params, [[3], [3]])
    with pytest.raises(ValueError, match="structure"):
      stream.forget_request(state, {"mix": params["mix"]}, [3])
    with pytest.raises(ValueError, match="non-finite"):
      stream.forget_request(state, jax.tree_util.tree_map(lambda l: l * jnp.nan, params), [3])
    with pytest.raises(TypeError, match="ForgetState"):
      stream.forget_request({"not": "a state"}, params, [3])
    # Forgetting all but one sample is allowed.
    _, last = stream.forget_request(state, params, list(range(2, 9)))
    assert int(jnp.sum(stream.retained_mask(last))) == 1


def test_bad_init_is_refused():
  with enable_x64():
    model, x, y, w0 = problem(6)
    kw = dict(train=(jnp.asarray(x), jnp.asarray(y)), num_classes=C, damping=0.1)
    w = model.unravel(w0)
    bad = [
        (dict(damping=0.0), ValueError, "damping"),
        (dict(damping=float("nan")), ValueError, "damping"),
        (dict(num_classes=2), ValueError, "labels must lie"),
        (dict(train=(jnp.asarray(x[:1]), jnp.asarray(y[:1]))), ValueError, "at least 2"),
        (dict(train=(jnp.asarray(x), jnp.asarray(y[:5]))), ValueError, "labels"),
        (dict(train=(jnp.asarray(x) * jnp.nan, jnp.asarray(y))), ValueError, "non-finite"),
        (dict(train=(jnp.asarray(x), jnp.asarray(y, jnp.float64))), TypeError, "integers"),
        (dict(factor_update="qr"), ValueError, "factor_update"),
        (dict(refactor_every=0), ValueError, "refactor_every"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(num_classes=4, train=(jnp.asarray(x), jnp.asarray(y))), ValueError, "returned shape"),
    ]
    for over, err, msg in bad:
      with pytest.raises(err, match=msg):
        stream.init_forget_state(model.apply, w, **{**kw, **over})
  with pytest.raises(ValueError, match="x64"):
    stream.init_forget_state(model.apply, jax.tree_util.tree_map(
        lambda l: jnp.asarray(l, jnp.float32), w),
        train=(jnp.asarray(x, jnp.float32), jnp.asarray(y)), num_classes=C, damping=0.1,
        solve_dtype=jnp.float64)


@pytest.mark.parametrize("cache", [True, False])
def test_state_persisted_and_read_back_serves_the_same_request(tmp_path, cache):
  """state_arrays -> workdir.save_state -> load_state -> state_from_arrays: a request on the
  state read back gives the same parameters as on the original, with and without the
  Jacobian cache (jac None must survive the round trip)."""
  from fastntk_jax import workdir as wd
  with enable_x64():
    model, x, y, w0 = problem(12)
    w = model.unravel(w0)
    state = stream.init_forget_state(model.apply, w, train=(jnp.asarray(x), jnp.asarray(y)),
                                     num_classes=C, damping=0.1, solve_dtype=jnp.float64,
                                     cache_jacobian=cache)
    path = str(tmp_path / "state")
    wd.save_state(path, stream.state_arrays(state))
    back = stream.state_from_arrays({**wd.load_state(path, None), "w_lin": w},
                                    apply_fn=model.apply, num_classes=C, batch_size=256)
    assert (back.jac is None) == (not cache)
    params = model.unravel(w0 + 0.05)
    expected, _ = stream.forget_request(state, params, [2, 5])
    got, _ = stream.forget_request(back, params, [2, 5])
    np.testing.assert_array_equal(flat(got), flat(expected))
    with pytest.raises(ValueError, match="fit together"):
      stream.state_from_arrays({**stream.state_arrays(state), "solution": jnp.zeros(3)},
                               apply_fn=model.apply, num_classes=C, batch_size=256)
    with pytest.raises(ValueError, match="needs the fields"):
      stream.state_from_arrays({"gram": state.gram}, apply_fn=model.apply, num_classes=C,
                               batch_size=256)


def test_jacobian_rows_in_blocks_equal_the_features():
  """`ntk.jacobian_rows` (blocks of 4, the last one padded) against Φ built by hand."""
  from fastntk_jax import ntk
  model, x, _, w0 = problem(10)
  with enable_x64():
    rows = ntk.jacobian_rows(model.apply, model.unravel(w0), jnp.asarray(x), batch_size=4)
    assert rows.shape == (10, C, P)
    np.testing.assert_allclose(np.asarray(rows).reshape(-1, P), model.features(x), atol=1e-12)


def test_init_reports_its_compilation_apart():
  """`timings` gets the cold time and the part of it spent compiling (the eager block loops'
  AOT compiles and the factorisation's)."""
  model, x, y, w0 = problem(30)
  timings = {}
  with enable_x64():
    stream.init_forget_state(model.apply, model.unravel(w0), train=(x, y), num_classes=C,
                             damping=0.1, batch_size=8, timings=timings)
  assert set(timings) == {"seconds", "compile_seconds"}
  assert 0 < timings["compile_seconds"] <= timings["seconds"]


@pytest.mark.slow
def test_uncached_request_in_a_narrower_dtype_warns_and_the_cache_does_not():
  """Rows recomputed for a request (no Jacobian cache) in float32 need not equal the rows
  summed into the float64 G at init, so the request warns with κ·ε32; the cached rows are
  the very rows of G, so the cached request does not."""
  model, x, y, w0 = problem(7)
  to32 = lambda v: jax.tree_util.tree_map(lambda l: jnp.asarray(l, jnp.float32),
                                          model.unravel(v))
  train = (jnp.asarray(x, jnp.float32), jnp.asarray(y))
  with enable_x64():
    for cache in (False, True):
      state = stream.init_forget_state(model.apply, to32(w0), train=train, num_classes=C,
                                       damping=1e-4, solve_dtype=jnp.float64,
                                       cache_jacobian=cache)
      assert float(state.last_condition_estimate) * np.finfo(np.float32).eps > 1e-3
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream.forget_request(state, to32(w0), np.array([2]))
      recomputed = [w for w in caught if "recomputed" in str(w.message)]
      if cache:
        assert not recomputed
      else:
        assert recomputed and issubclass(recomputed[0].category, unlearn.PrecisionWarning)
        assert "cache_jacobian=True" in str(recomputed[0].message)


@pytest.mark.slow
def test_uncached_request_of_several_blocks_computes_its_rows_outside_the_jit(monkeypatch):
  """A request spanning several Jacobian blocks on a state without the cache gets its rows
  from the eager block loop (a compiled block step, not copies unrolled in the request's
  program), and equals the cached state's request."""
  from fastntk_jax import ntk
  model, x, y, w0 = problem(30)
  calls = []
  real = ntk.jacobian_rows

  def spy(apply_fn, params, xs, **kw):
    calls.append(isinstance(xs, jax.core.Tracer))
    return real(apply_fn, params, xs, **kw)

  monkeypatch.setattr(ntk, "jacobian_rows", spy)
  with enable_x64():
    out = {}
    for cache in (True, False):
      state = stream.init_forget_state(model.apply, model.unravel(w0), train=(x, y),
                                       num_classes=C, damping=0.1, batch_size=2,
                                       cache_jacobian=cache)
      out[cache], _ = stream.forget_request(state, model.unravel(w0), np.arange(3, 8))
  assert calls == [False]  # once, eagerly, for the uncached request (bucket 8 > 2)
  np.testing.assert_allclose(flat(out[False]), flat(out[True]), rtol=1e-12, atol=1e-12)
