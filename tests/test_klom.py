"""KLoM: margins and per-example KL of margin histograms, against closed forms."""

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
  # Disjoint supports: every unlearned model's bin has only ε on the Retrain side.
  assert np.all(far > 10.0)


def test_klom_matches_a_hand_computed_histogram_kl():
  a = np.array([[0.0], [0.0], [1.0], [1.0]])   # half in the first bin, half in the last
  b = np.array([[0.0], [0.0], [0.0], [1.0]])   # three quarters / one quarter
  p = np.array([2.0] + [0.0] * 18 + [2.0]) + 1e-5
  q = np.array([3.0] + [0.0] * 18 + [1.0]) + 1e-5
  p, q = p / p.sum(), q / q.sum()
  np.testing.assert_allclose(klom.klom(a, b), [np.sum(p * np.log(p / q))], rtol=1e-12)


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
