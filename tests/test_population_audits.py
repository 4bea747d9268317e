"""Population audits: the NeurIPS 2023 ε-score (fastntk_jax.epsilon_score) and U-LiRA
(fastntk_jax.ulira), against independent ports, hand-computed cases and limiting cases."""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import log_softmax
from sklearn.metrics import roc_auc_score, roc_curve

from fastntk_jax import epsilon_score as es
from fastntk_jax import ulira

DELTA = 1e-5


# ---------------------------------------------------------------------------------------------
# ε-score


def _port_epsilon(u, r, delta=DELTA):
  """The competition's per-example ε (google-deepmind/unlearning_evaluation, metric.py),
  written as loops over thresholds with broadcast comparisons and Algorithm 1 of the
  organisers' report over the distinct (FPR, FNR) pairs."""
  u, r = np.asarray(u, float), np.asarray(r, float)
  pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
  span_pos, span_neg = pos.max() - pos.min(), neg.max() - neg.min()
  small, large = min(span_pos, span_neg), max(span_pos, span_neg)
  if large > 0 and small / large < 0.01:
    return 50.0
  pairs = set()
  lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
  for t in np.linspace(lo, hi, math.ceil((hi - lo) * 100)):
    pairs.add((np.mean(neg >= t), np.mean(pos < t)))
  peaky, other = (neg, pos) if span_pos >= span_neg else (pos, neg)
  w = small
  r_lo, r_hi = peaky.min() + w - 2.0, peaky.max() + 2.0
  for right in np.linspace(r_lo, r_hi, math.ceil((r_hi - r_lo) * 100)):
    left = np.linspace(right - w - 2.0, right - w + 2.0, 400)[:, None]
    inside_peaky = ((left <= peaky[None]) & (peaky[None] <= right)).mean(axis=1)
    inside_other = ((left <= other[None]) & (other[None] <= right)).mean(axis=1)
    pairs.update(zip(inside_other, 1.0 - inside_peaky))
  per_attack = []
  for fpr, fnr in pairs:
    if fpr == 0 and fnr == 0:
      per_attack.append(math.inf)
    elif fpr == 0 or fnr == 0:
      continue
    else:
      terms = [math.log(1 - delta - fpr) - math.log(fnr) if 1 - delta - fpr > 0 else math.nan,
               math.log(1 - delta - fnr) - math.log(fpr) if 1 - delta - fnr > 0 else math.nan]
      terms = [x for x in terms if not math.isnan(x)]
      if terms:
        per_attack.append(max(max(terms), 0.0))
  return min(max(per_attack), 50.0) if per_attack else 0.0


def _port_points(eps, num_models):
  """The reference's bucket loop: width 0.5, points halving from 1, up to ceil(log(N - 1))."""
  top = math.ceil(math.log(num_models - 1))
  total, start, points = 0.0, 0.0, 1.0
  buckets = []
  while start + 0.5 <= top:
    buckets.append((start, points))
    start, points = start + 0.5, points / 2
  for e in eps:
    total += next((p for s, p in buckets if e < s + 0.5), 0.0)
  return total / len(eps)


def test_epsilon_matches_an_independent_port_on_small_random_data():
  rng = np.random.default_rng(0)
  for trial in range(4):
    n_models = int(rng.integers(4, 12))
    u = rng.normal(size=(n_models, 3)) * rng.uniform(0.3, 1.5) + rng.normal()
    r = rng.normal(size=(n_models, 3)) * rng.uniform(0.3, 1.5)
    if trial == 3:
      u, r = np.round(u, 1), np.round(r, 1)  # ties, values on grid points
    eps = es.per_example_epsilon(u, r)
    want = [_port_epsilon(u[:, i], r[:, i]) for i in range(3)]
    np.testing.assert_allclose(eps, want, rtol=1e-12, atol=1e-12)
    assert es.forgetting_quality(eps, num_models=n_models) == _port_points(want, n_models)


def test_epsilon_reaches_the_ceiling_that_n_models_allow():
  # One model of each side sits among the other side's: the best single threshold misses
  # exactly one of each (FPR = FNR = 1/8), the smallest non-zero rates 8 models allow.
  n = 8
  high = np.r_[5.0 + 0.1 * np.arange(7), 0.5]
  low = np.r_[0.1 * np.arange(7), 5.55]
  ceiling = math.log(n * (1 - DELTA) - 1)
  assert es.epsilon_ceiling(n, n) == pytest.approx(ceiling, rel=1e-15)
  eps = es.per_example_epsilon(low[:, None], high[:, None])
  np.testing.assert_allclose(eps, [ceiling], rtol=1e-12)
  # ε = log 7 = 1.95 lies in [1.5, 2): 2^-3 points; ceil(log 7) = 2 gives 4 buckets.
  out = es.epsilon_score(low[:, None], high[:, None], ra_unlearned=0.9, ra_retrain=0.9,
                         ta_unlearned=0.8, ta_retrain=0.8)
  assert out["forgetting_quality"] == 0.125 and out["score"] == 0.125
  assert (out["max_epsilon"], out["num_buckets"]) == (2.0, 4)
  assert out["epsilon_ceiling"] == pytest.approx(ceiling, rel=1e-15)


def test_perfectly_separated_or_collapsed_examples_get_the_cap_and_no_points():
  rng = np.random.default_rng(1)
  u = rng.normal(size=(16, 5))
  r = rng.normal(size=(16, 5)) + 10.0     # disjoint: some threshold has FPR = FNR = 0
  r[:, 4] = u[:, 4]
  u[:, 3] = 0.3 + 1e-4 * rng.normal(size=16)  # unlearned range < 1% of Retrain's
  eps = es.per_example_epsilon(u, r)
  np.testing.assert_array_equal(eps, [50.0, 50.0, 50.0, 50.0, 0.0])
  out = es.epsilon_score(u, r, ra_unlearned=1.0, ra_retrain=1.0, ta_unlearned=1.0,
                         ta_retrain=1.0)
  assert out["num_capped"] == 4 and out["forgetting_quality"] == pytest.approx(0.2)
  assert out["epsilon_cap"] == 50.0 > out["epsilon_ceiling"]


def test_identical_samples_give_zero_epsilon_and_the_utility_ratios():
  rng = np.random.default_rng(2)
  r = rng.normal(size=(12, 6))
  np.testing.assert_array_equal(es.per_example_epsilon(r, r.copy()), np.zeros(6))
  out = es.epsilon_score(r, r, ra_unlearned=0.95, ra_retrain=1.0, ta_unlearned=0.8,
                         ta_retrain=0.9)
  assert out["forgetting_quality"] == 1.0
  assert out["score"] == pytest.approx(0.95 * 0.8 / 0.9, rel=1e-15)
  assert (out["num_models"], out["num_examples"], out["num_capped"]) == (12, 6, 0)
  # A constant output on both sides: nothing to tell apart.
  assert es.per_example_epsilon(np.ones((3, 1)), np.ones((4, 1)))[0] == 0.0


def test_two_seed_sets_of_one_distribution_sit_far_below_a_shifted_method():
  # Split Retrain is not at ε = 0: tail thresholds with count ratios like 3:1 show
  # ε = log 3 by chance (the metric's noise floor at finite N); a shift is clearly worse.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(128, 40))
  floor = es.per_example_epsilon(x[:64], x[64:])
  shifted = es.per_example_epsilon(x[:64] + 1.5, x[64:])
  assert np.median(floor) < 2.5 < np.median(shifted)
  f_floor = es.forgetting_quality(floor, num_models=64)
  f_shift = es.forgetting_quality(shifted, num_models=64)
  assert f_floor > 2 * f_shift


def test_epsilon_score_refuses_or_propagates_bad_input():
  with pytest.raises(ValueError, match="same examples"):
    es.per_example_epsilon(np.zeros((4, 3)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="at least 2 models"):
    es.per_example_epsilon(np.zeros((1, 3)), np.zeros((4, 3)))
  with pytest.raises(ValueError, match="> 0"):
    es.epsilon_score(np.zeros((4, 3)), np.ones((4, 3)), ra_unlearned=1, ra_retrain=0,
                     ta_unlearned=1, ta_retrain=1)
  u = np.random.default_rng(4).normal(size=(6, 2))
  u[2, 1] = np.nan
  eps = es.per_example_epsilon(u, u + 0.1)
  assert np.isnan(eps[1]) and np.isfinite(eps[0])
  out = es.epsilon_score(u, u + 0.1, ra_unlearned=1, ra_retrain=1, ta_unlearned=1,
                         ta_retrain=1)
  assert math.isnan(out["score"]) and out["num_nonfinite"] == 1
  # Two models a side: ceil(log 1) = 0 leaves no bucket, so F = 0 whatever ε is.
  assert es.forgetting_quality([0.0], num_models=2) == 0.0


# ---------------------------------------------------------------------------------------------
# U-LiRA


def _port_ulira(u, r, num_targets, seed, min_std=1e-6):
  """Per example: LiRA's online test with scipy's normal; ROC from sklearn."""
  rng = np.random.default_rng(seed)
  perm_u, perm_r = rng.permutation(len(u)), rng.permutation(len(r))
  t_u, s_u = perm_u[:num_targets], perm_u[num_targets:]
  t_r, s_r = perm_r[:num_targets], perm_r[num_targets:]
  scores, labels = [], []
  for i in range(u.shape[1]):
    fit_u = (np.median(u[s_u, i]), max(np.std(u[s_u, i]), min_std))
    fit_r = (np.median(r[s_r, i]), max(np.std(r[s_r, i]), min_std))
    for target, label in [(u[t_u, i], 1), (r[t_r, i], 0)]:
      for s in target:
        scores.append(stats.norm.logpdf(s, *fit_u) - stats.norm.logpdf(s, *fit_r))
        labels.append(label)
  scores, labels = np.array(scores), np.array(labels)
  fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
  return {"auc": roc_auc_score(labels, scores),
          "tpr_at_1pct_fpr": tpr[np.where(fpr < 0.01)[0][-1]],
          "tpr_at_0_1pct_fpr": tpr[np.where(fpr < 0.001)[0][-1]],
          "balanced_accuracy": (np.mean(scores[labels == 1] > 0)
                                + np.mean(scores[labels == 0] <= 0)) / 2,
          "best_balanced_accuracy": np.max(1 - (fpr + 1 - tpr) / 2)}


def test_ulira_matches_an_independent_port():
  rng = np.random.default_rng(5)
  u = rng.normal(0.3, 1.0, size=(20, 30)) + rng.normal(size=30)
  r = rng.normal(0.0, 1.3, size=(18, 30)) + rng.normal(size=30)
  u[:, 0] = np.round(u[:, 0])  # ties
  got = ulira.ulira(u, r, num_targets=5, seed=7)
  want = _port_ulira(u, r, 5, 7)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
  assert (got["num_positives"], got["num_negatives"]) == (150, 150)
  assert (got["num_shadow_unlearned"], got["num_shadow_retrain"]) == (15, 13)
  assert got["resolves_1pct_fpr"] and not got["resolves_0_1pct_fpr"]


def test_ulira_is_at_chance_on_one_distribution_and_perfect_on_separated_ones():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(64, 200)) + 3.0 * rng.normal(size=200)
  same = ulira.ulira(x[:32], x[32:], num_targets=8, seed=0)
  # 1600 positive and 1600 negative pairs: AUC's standard error is ~0.01 (pairs of one
  # example share its fit, so allow 0.05).
  assert abs(same["auc"] - 0.5) < 0.05 and abs(same["balanced_accuracy"] - 0.5) < 0.05
  far = ulira.ulira(x[:32] + 20.0, x[32:], num_targets=8, seed=0)
  assert far["auc"] == 1.0 and far["tpr_at_1pct_fpr"] == 1.0
  assert far["tpr_at_0_1pct_fpr"] == 1.0 and far["balanced_accuracy"] == 1.0


def test_ulira_flags_unresolvable_low_fpr_and_refuses_bad_input():
  rng = np.random.default_rng(7)
  out = ulira.ulira(rng.normal(size=(8, 10)), rng.normal(size=(8, 10)))
  assert out["num_targets"] == 2 and out["num_negatives"] == 20  # default min(N, M) // 4
  assert not out["resolves_1pct_fpr"] and out["fpr_resolution"] == 0.05
  with pytest.raises(ValueError, match="2 shadow models"):
    ulira.ulira(np.zeros((3, 4)), np.zeros((8, 4)), num_targets=2)
  with pytest.raises(ValueError, match="same examples"):
    ulira.ulira(np.zeros((8, 4)), np.zeros((8, 3)))
  u = rng.normal(size=(8, 5))
  u[0, 2] = np.inf
  bad = ulira.ulira(u, rng.normal(size=(8, 5)))
  assert math.isnan(bad["auc"]) and bad["num_nonfinite_examples"] == 1


def test_logit_scaled_confidence_is_log_odds_of_the_true_class():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(50, 7)) * 3
  labels = rng.integers(0, 7, size=50)
  p = np.exp(log_softmax(logits, axis=1))[np.arange(50), labels]
  np.testing.assert_allclose(ulira.logit_scaled_confidence(logits, labels),
                             np.log(p) - np.log1p(-p), rtol=1e-10, atol=1e-10)
  # Stable where p is 1 or 0 to float64: two classes give exactly z_y - z_other.
  big = np.array([[800.0, -800.0], [800.0, -800.0]])
  np.testing.assert_array_equal(ulira.logit_scaled_confidence(big, np.array([0, 1])),
                                [1600.0, -1600.0])


def test_ulira_refuses_an_overflowing_likelihood_ratio_as_nan():
  # Finite margins whose squares overflow: Λ = inf - inf is no "perfect attack".
  rng = np.random.default_rng(3)
  out = ulira.ulira(rng.normal(size=(8, 5)) * 1e200, rng.normal(size=(8, 5)) * 1e200)
  assert np.isnan(out["auc"]) and np.isnan(out["tpr_at_1pct_fpr"])
  assert out["num_nonfinite_scores"] > 0
