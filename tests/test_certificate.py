"""The certificate of forgetting (`unlearn.certify`) against the closed form of a model linear
in its parameters: ‖w − w_r‖ ≤ ‖∇L_r(w)‖/λ holds, and is attained up to the exact factor
(μ + λ)/λ along an eigenvector of J_rᵀJ_r with eigenvalue μ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from x64 import enable_x64

from fastntk_jax import linalg
from fastntk_jax import unlearn
from fastntk_jax.unlearn import certificate
from test_stream import C, problem, ridge


def _setup(lam=0.1, n=30, n_forget=5):
  model, x, y, w0 = problem(n)
  phi = model.features(x)
  keep = np.arange(n_forget, n)
  phi_r = phi.reshape(n, C, -1)[keep].reshape(-1, phi.shape[1])
  w_r = ridge(phi_r, w0, y[keep], lam)
  return model, x[keep], y[keep], w0, w_r, phi_r


def _certify(model, xr, yr, w0, w, lam, **kw):
  return unlearn.certify(model.apply, model.unravel(w0), model.unravel(w), (xr, yr),
                         num_classes=C, damping=lam, batch_size=8, **kw)


def test_gradient_equals_the_closed_form():
  lam = 0.1
  model, xr, yr, w0, w_r, phi_r = _setup(lam)
  w = w_r + 0.05 * np.random.default_rng(3).normal(size=w_r.shape)
  with enable_x64():
    got = certificate.retain_gradient(model.apply, model.unravel(w0), model.unravel(w), (xr, yr),
                                  num_classes=C, damping=lam, batch_size=8)
  want = phi_r.T @ (phi_r @ w - np.eye(C)[yr].reshape(-1)) + lam * (w - w0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


def test_bound_holds_and_is_attained_up_to_the_eigen_factor():
  """The gradient bound alone (no witness)."""
  lam = 0.1
  model, xr, yr, w0, w_r, phi_r = _setup(lam)
  mu, vecs = np.linalg.eigh(phi_r.T @ phi_r)
  _certify_plain = lambda *a: _certify(*a, witness_iterations=0)
  with enable_x64():
    at_optimum = _certify_plain(model, xr, yr, w0, w_r, lam)
    assert at_optimum.distance_bound < 1e-10 * np.linalg.norm(w_r - w0)
    for k in (0, -1):  # smallest and largest eigenvalue: ratio (μ + λ)/λ exactly
      w = w_r + 1e-2 * vecs[:, k]
      cert = _certify_plain(model, xr, yr, w0, w, lam)
      true = np.linalg.norm(w - w_r)
      assert cert.distance_bound == pytest.approx(true * (mu[k] + lam) / lam, rel=1e-8)
    rng = np.random.default_rng(0)
    for _ in range(5):  # any direction: true ≤ bound ≤ (μ_max + λ)/λ · true
      w = w_r + 1e-2 * rng.normal(size=w_r.shape)
      cert = _certify_plain(model, xr, yr, w0, w, lam)
      true = np.linalg.norm(w - w_r)
      assert true <= cert.distance_bound <= true * (mu[-1] + lam) / lam * (1 + 1e-9)
      assert cert.update_norm == pytest.approx(np.linalg.norm(w - w0), rel=1e-12)
      assert cert.relative_bound == pytest.approx(cert.distance_bound / cert.update_norm)
      # the bound on ‖w − w_r‖/‖w_r − w0‖ holds
      assert true / np.linalg.norm(w_r - w0) <= cert.retrain_relative_bound
      assert cert.linearized and "linearised fine-tuning" in cert.statement


def test_logit_bound_covers_every_input():
  lam = 0.1
  model, xr, yr, w0, w_r, _ = _setup(lam)
  w = w_r + 1e-2 * np.random.default_rng(1).normal(size=w_r.shape)
  x_test = np.random.default_rng(2).normal(size=(12, xr.shape[1]))
  with enable_x64():
    cert = _certify(model, xr, yr, w0, w, lam)
    bounds = certificate.logit_bound(model.apply, model.unravel(w0), x_test, cert, batch_size=5)
  phi = model.features(x_test).reshape(12, C, -1)
  true = np.linalg.norm(np.einsum("ncp,p->nc", phi, w - w_r), axis=1)
  spectral = np.linalg.norm(phi, ord=2, axis=(1, 2))
  np.testing.assert_allclose(bounds, spectral * cert.distance_bound, rtol=1e-9)
  assert np.all(true <= bounds)


def test_standard_mode_says_it_certifies_nothing_about_the_network():
  lam = 0.1
  model, xr, yr, w0, w_r, _ = _setup(lam)
  with enable_x64():
    cert = _certify(model, xr, yr, w0, w_r + 1e-3, lam, linearized=False)
  assert not cert.linearized and "certifies nothing about the network" in cert.statement


def test_bad_input_is_refused():
  model, xr, yr, w0, w_r, _ = _setup()
  with enable_x64():
    for lam, err in ((0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                     ("1", TypeError)):
      with pytest.raises(err, match="damping"):
        _certify(model, xr, yr, w0, w_r, lam)
    with pytest.raises(TypeError, match="outside jax.jit"):
      jax.jit(lambda lam: _certify(model, xr, yr, w0, w_r, lam).gradient_norm)(0.1)
    with pytest.raises(ValueError, match="label"):
      _certify(model, xr, yr + C, w0, w_r, 0.1)
    with pytest.raises(ValueError, match="structure"):
      unlearn.certify(model.apply, model.unravel(w0), {"x": jnp.zeros(3)}, (xr, yr),
                      num_classes=C, damping=0.1)


def test_traced_arrays_are_refused_clearly():
  """Not only a traced damping: traced params, w0 or D_r gave a ConcretizationTypeError
  from deep inside."""
  model, xr, yr, w0, w_r, _ = _setup()
  w0_t, w_t = model.unravel(w0.astype(np.float32)), model.unravel(w_r.astype(np.float32))
  xr = xr.astype(np.float32)
  calls = (lambda w: unlearn.certify(model.apply, w0_t, w, (xr, yr), num_classes=C, damping=0.1),
           lambda w: unlearn.certify(model.apply, w, w_t, (xr, yr), num_classes=C, damping=0.1),
           lambda x: unlearn.certify(model.apply, w0_t, w_t, (x, yr), num_classes=C,
                                     damping=0.1))
  for f, arg in zip(calls, (w_t, w0_t, xr)):
    with pytest.raises(TypeError, match="outside jax.jit"):
      jax.jit(lambda a, f=f: f(a).gradient_norm)(arg)


def test_mismatched_num_classes_and_dtype_are_refused_clearly():
  model, xr, yr, w0, w_r, _ = _setup()
  with pytest.raises(ValueError, match="num_classes=4"):
    unlearn.certify(model.apply, model.unravel(w0), model.unravel(w_r), (xr, yr),
                    num_classes=C + 1, damping=0.1)
  with pytest.raises(ValueError, match="dtype must be float32 or float64"):
    _certify(model, xr, yr, w0, w_r, 0.1, dtype=jnp.int32)
  if not jax.config.read("jax_enable_x64"):  # was: a float32 certificate, silently
    with pytest.raises(ValueError, match="64-bit JAX"):
      _certify(model, xr, yr, w0, w_r, 0.1, dtype=jnp.float64)


def test_the_witness_makes_the_bound_tight_and_any_witness_is_safe():
  """With conjugate-gradient steps the bound is ‖d‖ + ‖∇L_r − H d‖/λ ≈ ‖w − w_r‖ (p = 25:
  CG is exact), where the gradient bound alone is off by up to (μ_max + λ)/λ; a random or
  zero witness still gives a bound ≥ the true distance."""
  lam = 0.1
  model, xr, yr, w0, w_r, phi_r = _setup(lam)
  mu = np.linalg.eigvalsh(phi_r.T @ phi_r)
  rng = np.random.default_rng(4)
  w = w_r + 1e-2 * rng.normal(size=w_r.shape)
  true = np.linalg.norm(w - w_r)
  with enable_x64():
    plain = _certify(model, xr, yr, w0, w, lam, witness_iterations=0, basis="matrix_free")
    tight = _certify(model, xr, yr, w0, w, lam, witness_iterations=60, basis="matrix_free")
    np.testing.assert_allclose(tight.witness, w - w_r, rtol=1e-6, atol=1e-12)
    assert true * (1 - 1e-9) <= tight.distance_bound <= true * (1 + 1e-6)
    assert plain.distance_bound > 2 * tight.distance_bound  # the gradient bound is loose here
    assert 0 < tight.witness_iterations <= 60 and "witness" not in tight.as_dict()
    for d in (rng.normal(size=w.size), np.zeros(w.size)):
      other = _certify(model, xr, yr, w0, w, lam, witness=d, basis="matrix_free")
      assert other.distance_bound >= true * (1 - 1e-9) and other.witness_iterations == 0
    again = _certify(model, xr, yr, w0, w, lam, witness=tight.witness,  # a verifier's check
                     basis="matrix_free")
    assert again.distance_bound == pytest.approx(tight.distance_bound, rel=1e-9)
  print(f"true {true:.3g}, witness bound {tight.distance_bound:.3g}, gradient bound "
        f"{plain.distance_bound:.3g} (factor ≤ {(mu[-1] + lam) / lam:.3g})")


def test_bad_witness_options_are_refused():
  model, xr, yr, w0, w_r, _ = _setup()
  with enable_x64():
    with pytest.raises(ValueError, match="witness must be a finite vector"):
      _certify(model, xr, yr, w0, w_r, 0.1, witness=np.zeros(3))
    with pytest.raises(ValueError, match="witness must be a finite vector"):
      _certify(model, xr, yr, w0, w_r, 0.1, witness=np.full(w_r.size, np.nan))
    with pytest.raises(ValueError, match="witness_iterations"):
      _certify(model, xr, yr, w0, w_r, 0.1, witness_iterations=-1)


def test_the_retain_stats_the_caller_holds_give_the_tight_bound():
  """`retain_stats` (G_r, b_r, e.g. from linearised fine-tuning) define the model: the refined
  Cholesky witness makes the bound the true distance; a useless witness (zeros) still gives
  a valid bound; without them the statistics are computed (p is small) and agree."""
  lam = 0.1
  model, xr, yr, w0, w_r, phi_r = _setup(lam)
  w = w_r + 1e-2 * np.random.default_rng(5).normal(size=w_r.shape)
  true = np.linalg.norm(w - w_r)
  stats = (phi_r.T @ phi_r, phi_r.T @ (np.eye(C)[yr].reshape(-1) - phi_r @ w0))
  with enable_x64():
    exact = _certify(model, xr, yr, w0, w, lam, retain_stats=stats)
    useless = _certify(model, xr, yr, w0, w, lam, retain_stats=stats, witness=np.zeros_like(w))
    computed = _certify(model, xr, yr, w0, w, lam)
  assert exact.basis == computed.basis == "gram_statistics"
  assert true * (1 - 1e-9) <= exact.distance_bound <= true * (1 + 1e-8)
  assert useless.distance_bound >= true
  assert computed.distance_bound == pytest.approx(exact.distance_bound, rel=1e-8)


def _exact_ridge(gram, rhs, lam):
  """(G + λI)⁻¹ b in rational arithmetic (Gaussian elimination on Fractions): the retrain
  in exact arithmetic of the model the float64 statistics define."""
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  p = len(rhs)
  m = [[Fraction(float(gram[i, j])) + (Fraction(lam) if i == j else 0) for j in range(p)]
       + [Fraction(float(rhs[i]))] for i in range(p)]
  for k in range(p):
    piv = max(range(k, p), key=lambda i: abs(m[i][k]))
    m[k], m[piv] = m[piv], m[k]
    for i in range(k + 1, p):
      f = m[i][k] / m[k][k]
      if f:
        m[i] = [a - f * b for a, b in zip(m[i], m[k])]
  x = [Fraction(0)] * p
  for i in reversed(range(p)):
    x[i] = (m[i][p] - sum(m[i][j] * x[j] for j in range(i + 1, p))) / m[i][i]
  return x


def _exact_distance(w_minus_w0, x_exact) -> float:
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  return float(sum((Fraction(float(a)) - b) ** 2 for a, b in zip(w_minus_w0, x_exact))) ** 0.5


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 1.0])
@pytest.mark.parametrize("stored", ["float32", "float32-solve"])
def test_the_gram_bound_holds_in_exact_arithmetic_and_is_within_two_of_the_truth(lam, stored):
  """Against the rational-arithmetic retrain of the statistics' model: w is that retrain
  rounded to float32 (what the update stores), or a float32 solve's (larger error); the
  bound is never below the exact distance and at most twice it."""
  rng = np.random.default_rng(int(lam * 1000) + len(stored))
  p, rows = 20, 36
  jac = (rng.normal(size=(rows, p)) * 5).astype(np.float32).astype(np.float64)
  gram, rhs = jac.T @ jac, jac.T @ rng.normal(size=rows)
  x_exact = _exact_ridge(gram, rhs, lam)
  if stored == "float32":
    delta = np.array([float(v) for v in x_exact], np.float32)
  else:
    a32 = (gram + lam * np.eye(p)).astype(np.float32)
    delta = np.linalg.solve(a32, rhs.astype(np.float32)).astype(np.float32)
  true = _exact_distance(delta, x_exact)
  d, bound, _ = certificate.stats_witness(delta, gram, rhs, lam)
  assert true <= bound.bound <= 2 * true, (true, bound.bound)
  # Any witness is safe, the zero witness gives the gradient bound.
  for witness in (np.zeros(p), d + 1e-3 * rng.normal(size=p)):
    assert certificate.stats_bound(delta, gram, rhs, lam, witness).bound >= true


def test_the_gram_bound_at_the_exact_optimum_is_the_rounding_term_alone():
  """w = w_r to the last float64 digit: the bound is tiny but never zero-by-cancellation."""
  rng = np.random.default_rng(7)
  jac = rng.normal(size=(30, 12))
  gram, rhs = jac.T @ jac, jac.T @ rng.normal(size=30)
  x_exact = _exact_ridge(gram, rhs, 0.01)
  delta = np.array([float(v) for v in x_exact])
  true = _exact_distance(delta, x_exact)
  _, bound, _ = certificate.stats_witness(delta, gram, rhs, 0.01)
  assert true <= bound.bound <= 1e-12 * np.linalg.norm(delta)
  assert bound.rounding > 0


def test_the_reference_solution_is_the_exact_retrain_to_float64():
  rng = np.random.default_rng(8)
  jac = rng.normal(size=(25, 15)) * 10
  gram, rhs = jac.T @ jac, jac.T @ rng.normal(size=25)
  x_exact = _exact_ridge(gram, rhs, 1e-3)
  ref = linalg.reference_ridge_solve(gram, rhs, 1e-3)
  assert _exact_distance(ref, x_exact) <= 4e-16 * np.linalg.norm(ref)


def test_statistics_that_are_not_positive_semidefinite_are_refused_or_accounted_for():
  """With an eigenvalue of −λ/2, ‖H⁻¹‖ is 2/λ, not 1/λ: the bound was half the exact
  distance. Round-off-size negative eigenvalues are accounted for; larger ones refused."""
  rng = np.random.default_rng(11)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  lam = 0.01
  eig = np.array([-0.4 * lam, 1e-6, 0.1, 1, 2, 5, 10, 50])
  gram, rhs = (q * eig) @ q.T, rng.normal(size=8)
  x_exact = _exact_ridge(certificate.model_gram(gram), rhs, lam)
  delta = np.array([float(v) for v in x_exact], np.float32)
  true = _exact_distance(delta, x_exact)
  _, bound, _ = certificate.stats_witness(delta, gram, rhs, lam)
  assert true <= bound.bound <= 2 * true
  with pytest.raises(unlearn.SolveError, match="not positive semi-definite"):
    certificate.stats_witness(delta, (q * np.where(eig < 0, -0.6 * lam, eig)) @ q.T, rhs,
                              lam)
  # An asymmetric G is the model of its lower triangle (what the Cholesky solves read).
  skew = np.triu(rng.normal(size=(8, 8)), 1)
  again = certificate.stats_witness(delta, gram + skew, rhs, lam)[1]
  assert again.bound == pytest.approx(bound.bound, rel=1e-12)
