"""The linear-algebra home (`fastntk_jax.linalg`) against independent computations: numpy's
and LAPACK's factorisations and solves, closed forms, and the precision rule's verdicts."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from x64 import enable_x64

from fastntk_jax import linalg


def _spd(n, seed=0, kappa=1e3):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.logspace(0, -np.log10(kappa), n)) @ q.T


def test_ridge_solve_is_numpys_solve_with_its_condition_number():
  with enable_x64():
    rng = np.random.default_rng(1)
    j = rng.normal(size=(30, 12))
    g, b, lam = j.T @ j, rng.normal(size=12), 0.3
    x, info = linalg.ridge_solve(jnp.asarray(g), jnp.asarray(b), lam, with_condition=True)
    want = np.linalg.solve(g + lam * np.eye(12), b)
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-12)
    assert float(info.condition_number) == pytest.approx(np.linalg.cond(g + lam * np.eye(12)),
                                                          rel=1e-8)
    assert 1 <= float(info.condition_estimate) <= float(info.condition_number) * (1 + 1e-9)
    assert bool(info.finite) and bool(info.converged)
    # Indefinite (λ < -min eig): the factorisation fails, every entry NaN, the estimate NaN.
    x, info = linalg.ridge_solve(jnp.asarray(g), jnp.asarray(b), -1e3)
    assert not bool(info.finite) and np.isnan(float(info.condition_estimate))


def test_power_condition_is_a_close_lower_bound_where_the_diagonal_one_is_not():
  """κ by power iterations on A and A⁻¹ (its Cholesky factor) against numpy's eigenvalues: a
  lower bound within 10%, where the factor's diagonal misses κ several-fold (a rotated
  spectrum spreads over the diagonal); ridge_solve reports the
  larger estimate when asked."""
  with enable_x64():
    for kappa in (1e2, 1e6):
      a = _spd(40, seed=3, kappa=kappa)
      eig = np.linalg.eigvalsh(a)
      true = eig[-1] / eig[0]
      chol = linalg.cholesky(jnp.asarray(a))
      estimate = float(linalg.power_condition(lambda v: jnp.asarray(a) @ v, chol))
      assert 0.9 * true <= estimate <= true * (1 + 1e-9), (kappa, estimate, true)
      assert float(linalg.diagonal_condition(chol)) < 0.2 * true  # 6x and 19x low here
      _, info = linalg.ridge_solve(jnp.asarray(a), jnp.ones(40), 0.0)
      assert float(info.condition_estimate) == pytest.approx(estimate, rel=1e-6)
    # a failed factorisation (indefinite) gives NaN, which the precision rule refuses
    _, info = linalg.ridge_solve(jnp.asarray(_spd(8)), jnp.ones(8), -10.0)
    assert np.isnan(float(info.condition_estimate))


def test_schur_delta_is_the_block_inverse_of_the_full_kernel():
  """Eq. (1) in the dual, from the kernel blocks and three linear maps, equals the difference
  of the two ridge solutions computed whole (the identity it rests on)."""
  with enable_x64():
    rng = np.random.default_rng(2)
    p, m_r, m_f, lam = 9, 7, 4, 0.05
    j_r, j_f = rng.normal(size=(m_r, p)), rng.normal(size=(m_f, p))
    e_r, e_f = rng.normal(size=m_r), rng.normal(size=m_f)
    k = lambda a, b: a @ b.T
    delta, estimates = linalg.schur_delta(
        *(jnp.asarray(a) for a in (k(j_r, j_r) + lam * np.eye(m_r), k(j_r, j_f),
                                   k(j_f, j_f) + lam * np.eye(m_f), e_r, e_f)),
        pull_forget=lambda z: j_f.T @ z, push_retain=lambda u: j_r @ u,
        pull_retain=lambda v: j_r.T @ v)
    j, e = np.concatenate([j_r, j_f]), np.concatenate([e_r, e_f])
    w_r = j_r.T @ np.linalg.solve(k(j_r, j_r) + lam * np.eye(m_r), e_r)
    w_d = j.T @ np.linalg.solve(k(j, j) + lam * np.eye(m_r + m_f), e)
    np.testing.assert_allclose(np.asarray(delta), w_r - w_d, rtol=1e-9, atol=1e-12)
    assert len(estimates) == 2 and all(float(e) >= 1 for e in estimates)


def test_conjugate_gradients_converges_counts_and_stops_on_its_cap():
  with enable_x64():
    a = _spd(20, kappa=1e4)
    b = np.random.default_rng(3).normal(size=20)
    solve = jax.jit(lambda b, maxiter: linalg.conjugate_gradients(
        lambda v: jnp.asarray(a) @ v, b, tol=1e-10, maxiter=maxiter), static_argnums=1)
    x, converged, steps, top = solve(jnp.asarray(b), 200)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-6)
    assert bool(converged) and 1 <= int(steps) <= 200
    # Gershgorin's bounds on the Lanczos tridiagonal cg built bracket its Ritz values, which
    # approach A's extreme eigenvalues (numpy's, here) once the Krylov space spans them
    eig = np.linalg.eigvalsh(a)
    assert eig[-1] * (1 - 1e-8) <= float(top[0]) <= 3 * eig[-1]
    assert float(top[1]) <= eig[0] * (1 + 1e-6)
    np.testing.assert_allclose(linalg.cg_condition_estimate(top, 0.5), top[0] / 0.5)
    assert np.isnan(float(linalg.cg_condition_estimate(jnp.asarray([2.0, 0.5]), 0.0)))
    _, converged, steps, _ = solve(jnp.asarray(b), 3)
    assert not bool(converged) and int(steps) == 3


def test_the_precision_rule_warns_refuses_and_names_its_remedy():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    linalg.check_precision(1e3, jnp.float32, what="the solve")      # κ·ε = 1.2e-4: silent
    assert not caught
    linalg.check_precision(1e5, jnp.float32, what="the solve")      # 1.2e-2: one warning
  assert len(caught) == 1 and issubclass(caught[0].category, linalg.PrecisionWarning)
  assert "solve in float64" in str(caught[0].message)
  with pytest.raises(linalg.SolveError, match="cannot be trusted.*increase the damping$"):
    linalg.check_precision(1e17, jnp.float64, what="the solve")     # no float64 advice there
  with pytest.raises(linalg.SolveError, match="not positive definite"):
    linalg.check_precision(float("nan"), jnp.float64, what="the solve", damping=0.0)
  with pytest.raises(linalg.SolveError, match="float32 logits"):
    linalg.check_precision(1e8, jnp.float64, jnp.float32, what="the solve")
  # Traced: the verdict comes when the computation runs.
  with pytest.raises(Exception, match="cannot be trusted"):
    jax.block_until_ready(jax.jit(lambda k: linalg.check_precision(
        k, jnp.float32, what="the solve") or k)(jnp.float32(1e9)))


def test_enable_x64_restores_the_mode_it_found():
  before = bool(jax.config.read("jax_enable_x64"))
  with linalg.enable_x64():
    assert jnp.asarray(1.0, jnp.float64).dtype == jnp.float64
  assert bool(jax.config.read("jax_enable_x64")) == before
  with pytest.raises(RuntimeError), linalg.enable_x64():
    raise RuntimeError("inside")
  assert bool(jax.config.read("jax_enable_x64")) == before


def test_the_downdate_is_a_fresh_factorisation_of_the_downdated_matrix():
  with enable_x64():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 3)) * 0.3
    a = _spd(40, kappa=1e2) + x @ x.T
    l, ratio = linalg.cholesky_downdate(jnp.asarray(np.linalg.cholesky(a)), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(l), np.linalg.cholesky(a - x @ x.T), rtol=1e-9,
                               atol=1e-12)
    assert 0 < float(ratio) <= 1


def test_row_products_widen_column_chunks_to_the_solve_dtype(monkeypatch):
  monkeypatch.setattr(linalg, "ROW_PRODUCT_COLUMNS", 3)  # p = 7: chunks 3, 3, 1
  with enable_x64():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    b = rng.normal(size=(4, 7)).astype(np.float32)
    v, u = rng.normal(size=7), rng.normal(size=5)
    a64 = a.astype(np.float64)
    prod = linalg.rows_product(jnp.asarray(a), jnp.asarray(b), jnp.float64)
    assert prod.dtype == jnp.float64
    np.testing.assert_allclose(prod, a64 @ b.astype(np.float64).T, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(linalg.rows_matvec(jnp.asarray(a), v, jnp.float64),
                               a64 @ v, rtol=1e-13)
    np.testing.assert_allclose(linalg.rows_rmatvec(jnp.asarray(a), u, jnp.float64),
                               a64.T @ u, rtol=1e-13)
    assert linalg.rows_rmatvec(jnp.zeros((5, 0)), u, jnp.float64).shape == (0,)


@pytest.mark.parametrize("name", ["rows_product", "rows_matvec", "rows_rmatvec"])
def test_row_products_compile_with_one_column_chunk_widened(name):
  # Found by benchmarks/bench_vit_memory (ViT-S/16, 1,000 images: rows [20,000, 44,564]):
  # the chunks as a Python loop in one program were all widened at once, 34 GB of compiled
  # temporaries, and the update died allocating them after 71 min of Jacobians. Compiled
  # only (nothing allocated): the temporaries must be one chunk per side (+ the carry).
  m, p = 512, 10 * linalg.ROW_PRODUCT_COLUMNS + 100
  j = jax.ShapeDtypeStruct((m, p), jnp.float32)
  fn = getattr(linalg, name)
  other = {"rows_product": j, "rows_matvec": jax.ShapeDtypeStruct((p,), jnp.float32),
           "rows_rmatvec": jax.ShapeDtypeStruct((m,), jnp.float32)}[name]
  with enable_x64():
    compiled = jax.jit(lambda a, b: fn(a, b, jnp.float64)).lower(j, other).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend gives no memory analysis")
  chunk = 8 * m * linalg.ROW_PRODUCT_COLUMNS
  bound = 2 * chunk + 2 * 8 * m * m + 8 * p
  assert analysis.temp_size_in_bytes < bound, (analysis.temp_size_in_bytes, bound)
  assert analysis.temp_size_in_bytes < 8 * m * p / 2  # far below one widened copy of the rows


@pytest.mark.parametrize("n,block", [(10, 3), (12, 4), (9, 1), (7, 7), (40, 16)])
def test_blocked_cholesky_matches_lapack_eagerly_and_jitted(n, block):
  rng = np.random.default_rng(n)
  a = rng.normal(size=(n, n))
  a = a @ a.T + n * np.eye(n)
  want = np.linalg.cholesky(a)
  with enable_x64():
    eager = linalg.cholesky(jnp.asarray(a), block=block)
    jitted = jax.jit(lambda m: linalg.cholesky(m, block=block))(jnp.asarray(a))
  for got in (eager, jitted):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-13 * np.abs(want).max())


def test_blocked_cholesky_of_an_indefinite_matrix_is_all_nan_as_lapack():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(10, 10))
  a = a @ a.T + np.eye(10)
  a[6, 6] = -5.0  # the failure is in the third block of 3: earlier blocks factorise
  with enable_x64():
    got = np.asarray(linalg.cholesky(jnp.asarray(a), block=3))
    whole = np.asarray(jnp.linalg.cholesky(jnp.asarray(a)))
  assert np.isnan(whole[np.tril_indices(10)]).all()
  assert np.isnan(got[np.tril_indices(10)]).all() and (got[np.triu_indices(10, 1)] == 0).all()
  _, estimate = linalg.cholesky_solver(jnp.asarray(a))
  assert np.isnan(float(estimate))


def test_blocked_cholesky_compiles_with_the_memory_of_lapacks_whole():
  # Eagerly, each block update was a new [n, n] array (an order-20,000 factorisation was
  # OOM-killed); compiled (nothing allocated here), the temporaries must be one working copy
  # and the panels, as LAPACK's whole factorisation (one copy), not several copies.
  n, block = 2000, 512
  s = jax.ShapeDtypeStruct((n, n), jnp.float32)
  compiled = linalg._blocked_cholesky.lower(s, block).compile()
  whole = jax.jit(lambda a: jax.lax.linalg.cholesky(a, symmetrize_input=False)).lower(
      s).compile()
  blocked, lapack = compiled.memory_analysis(), whole.memory_analysis()
  if blocked is None or lapack is None:
    pytest.skip("this backend gives no memory analysis")
  matrix = 4 * n * n
  assert blocked.temp_size_in_bytes < 1.2 * matrix, blocked.temp_size_in_bytes / matrix
  assert blocked.temp_size_in_bytes < lapack.temp_size_in_bytes + 0.2 * matrix
  assert blocked.output_size_in_bytes == matrix


@pytest.mark.parametrize("block", [0, -2, True, "3", 3.7])
def test_cholesky_refuses_a_bad_block(block):
  with pytest.raises(ValueError, match="must be a positive int"):
    linalg.cholesky(jnp.eye(5), block=block)


def test_cholesky_refuses_too_many_blocks_and_non_square_input():
  # Review findings: block=1 at order 200 (unrolled loops) exhausted 3 GB compiling; a [6, 8]
  # input came back as a [6, 8] "factor" without a word.
  with pytest.raises(ValueError, match="200 blocks, more than MAX_CHOLESKY_BLOCKS"):
    linalg.cholesky(jnp.eye(200), block=1)
  for shape in [(6, 8), (3,)]:
    with pytest.raises(ValueError, match="square matrices"):
      linalg.cholesky(jnp.ones(shape), block=3)


def test_blocked_cholesky_of_complex_and_batched_matrices_matches_lapack(monkeypatch):
  # Review finding: the blocked path transposed without conjugating (‖L Lᴴ − A‖ = 9.9 on a
  # complex Hermitian 8x8); a stack [b, n, n] skipped the blocked path altogether.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(8, 8)) + 1j * rng.normal(size=(8, 8))
  a = a @ a.conj().T + 8 * np.eye(8)
  stack = rng.normal(size=(3, 9, 9))
  stack = stack @ stack.transpose(0, 2, 1) + 9 * np.eye(9)
  orders, blocked = [], linalg._blocked_cholesky
  monkeypatch.setattr(linalg, "_blocked_cholesky",
                      lambda m, block: orders.append(m.shape) or blocked(m, block))
  with enable_x64():
    got = linalg.cholesky(jnp.asarray(a), block=3)
    got_stack = linalg.cholesky(jnp.asarray(stack), block=4)
  assert orders == [(8, 8), (9, 9)], orders  # the stack's members by blocks too
  np.testing.assert_allclose(np.asarray(got), np.linalg.cholesky(a), atol=1e-13)
  np.testing.assert_allclose(np.asarray(got_stack), np.linalg.cholesky(stack), atol=1e-13)




def test_a_refusal_under_jit_arrives_as_a_jax_runtime_error_naming_it():
  """What the API docstring promises a caller who wraps the update in `jax.jit`."""
  def checked(x):
    linalg.runtime_check(x > 0, linalg.SolveError, "refused: {}", x)
    return x * 2
  assert float(jax.jit(checked)(jnp.float32(1.0))) == 2.0
  with pytest.raises(jax.errors.JaxRuntimeError, match="SolveError: refused: -1.0"):
    jax.block_until_ready(jax.jit(checked)(jnp.float32(-1.0)))
