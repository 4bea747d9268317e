"""(ε, δ)-certified release (`unlearn.release`): σ of the classic and the analytic Gaussian
mechanisms against closed forms and an independent numerical integral of the privacy
profile, and the release itself (reproducible noise, dtypes kept, refusals)."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fastntk_jax.unlearn import release


def _hockey_stick(sigma, sensitivity, epsilon):
  """δ(ε) of N(0, σ²) against N(Δ, σ²) by quadrature: ∫ max(0, p(x) − e^ε q(x)) dx, an
  integral computed independently of Balle & Wang's closed form."""
  shift = sensitivity / sigma  # in units of σ: N(0, 1) against N(Δ/σ, 1)
  p = stats.norm.pdf
  q = lambda t: stats.norm.pdf(t, shift, 1.0)
  # p > e^ε q left of the crossing point t* = Δ/2σ − εσ/Δ.
  cross = shift / 2 - epsilon / shift
  value, _ = integrate.quad(lambda t: p(t) - math.exp(epsilon) * q(t), -np.inf, cross,
                            epsabs=1e-14, epsrel=1e-10)
  return value


def test_classic_sigma_is_dwork_and_roths_closed_form():
  assert release.classic_sigma(2.0, 0.5, 1e-5) == pytest.approx(
      2.0 * math.sqrt(2 * math.log(125000.0)) / 0.5, rel=1e-15)
  with pytest.raises(ValueError, match="epsilon < 1 only"):
    release.classic_sigma(1.0, 1.0, 1e-5)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("sensitivity", [1e-7, 1.0])
def test_analytic_sigma_is_the_smallest_noise_meeting_delta(epsilon, sensitivity):
  delta = 1e-5
  sigma = release.analytic_sigma(sensitivity, epsilon, delta)
  # The closed form and the integral agree, and δ is met with no slack worth having.
  assert release.analytic_delta(sigma, sensitivity, epsilon) == pytest.approx(
      _hockey_stick(sigma, sensitivity, epsilon), rel=1e-6, abs=1e-13)
  assert _hockey_stick(sigma, sensitivity, epsilon) <= delta * (1 + 1e-6)
  assert _hockey_stick(sigma * 0.999, sensitivity, epsilon) > delta
  # Linear in the sensitivity; never above the classic σ where that one holds.
  assert sigma / sensitivity == pytest.approx(
      release.analytic_sigma(1.0, epsilon, delta), rel=1e-9)
  if epsilon < 1:
    assert sigma <= release.classic_sigma(sensitivity, epsilon, delta)


def test_the_analytic_sigma_never_undershoots_delta_at_the_edges():
  """The closed form cancels at small ε and δ: the σ returned must still meet δ."""
  for epsilon, delta in ((1e-3, 1e-50), (1e-3, 1e-5), (100.0, 1e-12), (0.01, 1e-30)):
    sigma = release.analytic_sigma(1.0, epsilon, delta)
    assert release.analytic_delta(sigma, 1.0, epsilon) <= delta


def test_known_value_of_the_analytic_mechanism():
  """Balle & Wang's calibration at ε = 1, δ = 1e-5, Δ = 1: σ ≈ 3.73 (their Figure 2)."""
  assert release.analytic_sigma(1.0, 1.0, 1e-5) == pytest.approx(3.7306, abs=5e-4)


def test_a_release_is_reproducible_from_its_seed_and_keeps_dtypes():
  params = {"a": np.ones((300, 40), np.float32), "b": np.zeros(7, np.float64)}
  released, rel = release.certified_release(params, 0.5, epsilon=1.0, delta=1e-5,
                                            noise_seed=3)
  again, _ = release.noised(params, rel.sigma, 3)
  for key in params:
    assert released[key].dtype == params[key].dtype
    np.testing.assert_array_equal(released[key], again[key])
  z = (released["a"].astype(np.float64) - 1.0).ravel()
  assert np.std(z) == pytest.approx(rel.sigma, rel=0.02)  # 12,000 draws
  assert rel.noise_norm == pytest.approx(np.sqrt(np.sum(z ** 2) + np.sum(
      released["b"] ** 2)), rel=1e-3)
  assert rel.sensitivity == 0.5 and rel.mechanism == "analytic" and "ε = 1" in rel.statement
  # The seed is secret: the record keeps its commitment, never the seed.
  assert "noise_seed" not in rel.as_dict() and rel.noise_commitment == release.commitment(3)
  drawn, drawn_rel = release.certified_release(params, 0.5, epsilon=1.0, delta=1e-5)
  assert drawn_rel.noise_seed.bit_length() > 64 and not np.array_equal(drawn["a"],
                                                                        released["a"])
  other, _ = release.certified_release(params, 0.5, epsilon=1.0, delta=1e-5, noise_seed=4)
  assert not np.array_equal(other["a"], released["a"])


@pytest.mark.parametrize("kwargs, match", [
    ({"epsilon": 0.0}, "epsilon"), ({"epsilon": math.inf}, "epsilon"),
    ({"delta": 1.0}, "delta"), ({"delta": 0.0}, "delta"),
    ({"noise_seed": -1}, "noise_seed"), ({"noise_seed": 1.5}, "noise_seed"),
    ({"mechanism": "classic", "epsilon": 2.0}, "epsilon < 1 only"),
    ({"mechanism": "laplace"}, "laplace"),
])
def test_bad_release_options_are_refused(kwargs, match):
  options = {"epsilon": 1.0, "delta": 1e-5, "noise_seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    release.certified_release({"a": np.zeros(3)}, 1.0, **options)


@pytest.mark.parametrize("bound", [math.inf, 0.0, -1.0, math.nan])
def test_a_bound_that_certifies_nothing_cannot_be_released(bound):
  with pytest.raises(ValueError, match="sensitivity"):
    release.certified_release({"a": np.zeros(3)}, bound, epsilon=1.0, delta=1e-5,
                              noise_seed=0)
