"""KLoM: margins and per-example KL of margin histograms, against closed forms and a port of
EasyDUB's binned KL."""

import math

import numpy as np
import pytest

from fastntk_jax import klom


def test_margin_is_true_logit_minus_logsumexp_of_the_others():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
  np.testing.assert_allclose(klom.margins(logits, np.array([0, 1])),
                             [2.0 - np.log(2.0), 1.0 - np.log(1.0 + np.exp(3.0))])


def test_klom_of_identical_samples_is_zero_and_of_disjoint_ones_is_large():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(32, 5))
  assert np.all(klom.klom(a, a) == 0.0)
  far = klom.klom(a, a + 50.0)
  # Disjoint supports: every non-empty unlearned bin has only the floor ε on the Retrain side.
  assert np.all(far > 10.0)


def _port_klom(p_samples, q_samples, bins=20, clip=100.0, eps=1e-5):
  """EasyDUB's binned KL (easydub/EasyDUB-code, easydub/eval.py), one example, in loops."""
  p_samples = [min(max(float(v), -clip), clip) for v in p_samples]
  q_samples = [min(max(float(v), -clip), clip) for v in q_samples]
  lo, hi = min(p_samples + q_samples), max(p_samples + q_samples)
  if lo >= hi:
    hi = lo + 1.0
  edges = np.linspace(lo, hi, bins + 1)

  def histogram(samples):
    counts = [0] * bins
    for v in samples:
      for j in range(bins):
        if edges[j] <= v < edges[j + 1]:
          counts[j] += 1
          break  # a value equal to the last edge is in no bin
    return counts

  p, q = histogram(p_samples), histogram(q_samples)
  total_p, total_q = sum(p), sum(q)
  kl = 0.0
  for pj, qj in zip(p, q):
    if pj:
      prob_q = qj / total_q if total_q else 0.0
      kl += pj / total_p * math.log((pj / total_p) / max(prob_q, eps))
  return kl


def test_klom_matches_an_independent_port_of_the_reference_on_random_data():
  rng = np.random.default_rng(3)
  for trial in range(20):
    n_u, n_r = rng.integers(2, 30, size=2)
    a = rng.normal(size=(n_u, 4)) * rng.uniform(0.1, 40.0) + rng.normal() * 20.0
    b = rng.normal(size=(n_r, 4)) * rng.uniform(0.1, 40.0)
    if trial % 3 == 0:  # ties and values on bin edges
      a, b = np.round(a), np.round(b)
    want = [_port_klom(a[:, i], b[:, i]) for i in range(4)]
    np.testing.assert_allclose(klom.klom(a, b), want, rtol=1e-12, atol=1e-15)


def test_klom_two_bins_by_hand():
  # Pooled range [0, 2], edges (0, 1, 2). Unlearned: 0, 0 in bin 1; 1 in bin 2 → P = (2/3, 1/3).
  # Retrain: 0 in bin 1; both 2s equal the last edge and fall in no bin → Q = (1, 0), floored
  # to 1e-5 in bin 2 where P > 0 (not renormalised).
  a = np.array([[0.0], [0.0], [1.0]])
  b = np.array([[0.0], [2.0], [2.0]])
  want = 2 / 3 * np.log((2 / 3) / 1.0) + 1 / 3 * np.log((1 / 3) / 1e-5)
  np.testing.assert_allclose(klom.klom(a, b, bins=2), [want], rtol=1e-14)
  # Reversed: P = (1, 0) over the one counted Retrain sample, Q = (2/3, 1/3): KL = log(3/2).
  np.testing.assert_allclose(klom.klom(b, a, bins=2), [np.log(1.5)], rtol=1e-14)


def test_klom_is_maximal_where_every_unlearned_margin_is_the_pooled_maximum():
  # The reference drops all of P there and returns 0; a disjoint sample must read as
  # separated (log(1/eps), the value of the reversed direction), never as a match or NaN.
  a = np.full((3, 1), 150.0)          # clipped to 100 = the pooled maximum
  b = np.array([[0.0], [1.0], [2.0]])
  np.testing.assert_allclose(klom.klom(a, b), [np.log(1e5)], rtol=1e-12)
  np.testing.assert_allclose(klom.klom(np.ones((3, 1)), np.zeros((4, 1))),
                             klom.klom(np.zeros((3, 1)), np.ones((4, 1))), rtol=1e-12)
  assert klom.klom(a, a)[0] == 0.0    # every value equal: one bin, identical


def test_summary_reports_the_95th_percentile_headline():
  v = np.arange(101.0)
  s = klom.summary(v)
  assert s["p95"] == 95.0 and s["q99"] == 99.0 and s["median"] == 50.0 and s["q10"] == 10.0
  assert s["mean"] == 50.0 and s["num_examples"] == 101
  assert np.isnan(klom.summary([0.0, np.nan])["p95"])
  with pytest.raises(ValueError, match="at least one"):
    klom.summary([])


def test_klom_refuses_bad_shapes():
  with pytest.raises(ValueError, match="same examples"):
    klom.klom(np.zeros((4, 3)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="at least 2 models"):
    klom.klom(np.zeros((1, 3)), np.zeros((4, 3)))


def test_margins_refuse_labels_outside_the_classes():
  # -1 would index the last class and give another class's margin without a word.
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    klom.margins(np.zeros((2, 3)), np.array([0, -1]))
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    klom.margins(np.zeros((2, 3)), np.array([0, 3]))


def test_klom_of_nan_margins_is_nan_not_a_finite_number():
  # A diverged model (NaN logits) has no margin histogram; the other examples are unaffected.
  a = np.array([[np.nan, 0.0], [1.0, 1.0], [2.0, 2.0]])
  b = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
  out = klom.klom(a, b)
  assert np.isnan(out[0]) and out[1] == 0.0
  assert np.isnan(klom.klom(b, a)[0])
