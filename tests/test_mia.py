"""Membership-inference attack (fastntk_jax.mia): power, chance level, AUC, balancing, refusals."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fastntk_jax import mia


def test_attack_detects_members_with_clearly_lower_loss():
  rng = np.random.default_rng(0)
  members = rng.exponential(0.05, size=400)      # trained on: near-zero loss
  nonmembers = rng.exponential(2.0, size=600)    # never seen: much larger loss
  r = mia.membership_inference_attack(members, nonmembers, num_folds=5, seed=0)
  assert r.accuracy > 0.9 and r.auc > 0.95, r
  assert len(r.fold_accuracies) == 5
  assert r.num_members == r.num_nonmembers == 400
  assert (r.num_members_total, r.num_nonmembers_total) == (400, 600)


def test_attack_is_at_chance_on_identically_distributed_losses():
  rng = np.random.default_rng(1)
  n = 1500
  r = mia.membership_inference_attack(rng.gamma(2.0, 0.5, size=n), rng.gamma(2.0, 0.5, size=n),
                                      num_folds=5, seed=0)
  # Standard error of an accuracy over 2n = 3000 balanced samples is ~0.009; 0.05 is > 5σ.
  assert abs(r.accuracy - 0.5) < 0.05, r
  assert abs(r.auc - 0.5) < 0.05, r


def test_auc_equals_sklearn_on_the_out_of_fold_scores():
  rng = np.random.default_rng(2)
  r = mia.membership_inference_attack(rng.normal(0.0, 1.0, size=(120, 2)),
                                      rng.normal(0.4, 1.0, size=(150, 2)), num_folds=4, seed=3)
  assert r.scores.shape == r.labels.shape == (240,)
  assert r.labels.sum() == 120
  assert abs(r.auc - roc_auc_score(r.labels, r.scores)) < 1e-12
  assert 0.55 < r.auc < 0.85  # a weak but real signal
  # The rank formula itself, with many ties.
  labels = rng.integers(0, 2, size=500)
  scores = rng.integers(0, 7, size=500).astype(float)
  assert abs(mia.roc_auc(labels, scores) - roc_auc_score(labels, scores)) < 1e-12


def test_balancing_is_seeded_and_results_deterministic():
  rng = np.random.default_rng(4)
  members, nonmembers = rng.normal(size=30), rng.normal(0.5, size=300)
  a = mia.membership_inference_attack(members, nonmembers, seed=7)
  b = mia.membership_inference_attack(members, nonmembers, seed=7)
  c = mia.membership_inference_attack(members, nonmembers, seed=8)
  assert a.num_members == a.num_nonmembers == 30
  assert a.accuracy == b.accuracy and np.array_equal(a.scores, b.scores)
  assert not np.array_equal(a.scores, c.scores)
  unbalanced = mia.membership_inference_attack(members, nonmembers, balance=False)
  assert (unbalanced.num_members, unbalanced.num_nonmembers) == (30, 300)
  d = a.as_dict()
  assert "scores" not in d and d["num_members"] == 30 and isinstance(d["fold_accuracies"], list)


def test_per_example_loss_and_mia_from_logits():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(6, 4)) * 30  # large logits: the log-softmax must not overflow
  y = rng.integers(0, 4, size=6)
  log_p = logits - logits.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
  np.testing.assert_allclose(mia.per_example_loss(logits, y), -log_p[np.arange(6), y])
  np.testing.assert_allclose(mia.per_example_loss(logits, y, "confidence"),
                             np.exp(log_p[np.arange(6), y]))
  np.testing.assert_allclose(mia.per_example_loss(logits, y, "squared"),
                             ((np.eye(4)[y] - logits) ** 2).sum(1))

  n, c = 300, 10
  y_m, y_h = rng.integers(0, c, size=n), rng.integers(0, c, size=n)
  z_m = rng.normal(size=(n, c)) + 6 * np.eye(c)[y_m]   # members: confidently right
  z_h = rng.normal(size=(n, c)) + 1 * np.eye(c)[y_h]   # hold-out: unsure
  r = mia.mia_from_logits(z_m, y_m, z_h, y_h)
  assert r.accuracy > 0.9
  r2 = mia.mia_from_logits(z_m, y_m, z_h, y_h, loss=("cross_entropy", "confidence"))
  assert r2.accuracy > 0.9


def test_bad_input_is_refused():
  ok = np.linspace(0, 1, 20)
  with pytest.raises(ValueError, match="empty"):
    mia.membership_inference_attack([], ok)
  with pytest.raises(ValueError, match="empty"):
    mia.membership_inference_attack(ok, np.zeros((0,)))
  with pytest.raises(ValueError, match="non-finite"):
    mia.membership_inference_attack(np.r_[ok, np.nan], ok)
  with pytest.raises(ValueError, match="non-finite"):
    mia.membership_inference_attack(ok, np.r_[ok, np.inf])
  with pytest.raises(ValueError, match="feature"):
    mia.membership_inference_attack(np.ones((20, 2)), ok)
  with pytest.raises(ValueError, match="too few"):
    mia.membership_inference_attack(ok[:3], ok, num_folds=5)
  with pytest.raises(ValueError, match="num_folds"):
    mia.membership_inference_attack(ok, ok, num_folds=1)
  with pytest.raises(ValueError, match="shape"):
    mia.membership_inference_attack(np.ones((20, 2, 2)), ok)
  with pytest.raises(TypeError, match="numeric"):
    mia.membership_inference_attack(["a"] * 20, ok)
  z = np.zeros((5, 3))
  with pytest.raises(ValueError, match="range"):
    mia.per_example_loss(z, np.array([0, 1, 2, 3, 0]))
  with pytest.raises(ValueError, match="labels must be"):
    mia.per_example_loss(z, np.array([0, 1]))
  with pytest.raises(ValueError, match="non-finite"):
    mia.per_example_loss(z * np.nan, np.zeros(5, int))
  with pytest.raises(ValueError, match="unknown loss"):
    mia.per_example_loss(z, np.zeros(5, int), "hinge")
  with pytest.raises(ValueError, match="both"):
    mia.roc_auc([1, 1], [0.1, 0.2])


def _logits_with_confidence(conf, num_classes=3):
  """Logits whose softmax gives label 0 exactly the confidence `conf` (the rest split evenly)."""
  conf = np.asarray(conf, np.float64)
  rest = (1.0 - conf) / (num_classes - 1)
  return np.log(np.stack([conf] + [rest] * (num_classes - 1), axis=1))


def test_mia_efficacy_is_the_share_of_forget_samples_called_non_member():
  rng = np.random.default_rng(0)
  retain = _logits_with_confidence(rng.uniform(0.9, 0.99, 200))   # members: confident
  test = _logits_with_confidence(rng.uniform(0.4, 0.6, 80))       # non-members: unsure
  zeros = lambda n: np.zeros(n, np.int64)
  remembered = _logits_with_confidence(rng.uniform(0.9, 0.99, 30))
  forgotten = _logits_with_confidence(rng.uniform(0.4, 0.6, 30))
  half = np.concatenate([remembered[:15], forgotten[:15]])
  eff = lambda f: mia.mia_efficacy(retain, zeros(200), test, zeros(80), f, zeros(len(f)))
  assert eff(remembered) == 0.0
  assert eff(forgotten) == 100.0
  assert eff(half) == 50.0


def test_avg_gap_is_the_mean_absolute_difference_to_retrain():
  from fastntk_jax.experiment import report
  retrain = {"ua": 100.0, "ra": 98.0, "ta": 97.0, "mia_efficacy": 100.0}
  method = {"ua": 90.0, "ra": 99.0, "ta": 95.0, "mia_efficacy": 97.0}
  assert report.avg_gap(method, retrain) == (10 + 1 + 2 + 3) / 4
  assert report.avg_gap({**method, "ta": None}, retrain) is None
