"""The ε-score of the NeurIPS 2023 Machine Unlearning Challenge (forgetting quality × utility).

Triantafillou et al. 2024, "Are we making progress in unlearning? Findings from the first
NeurIPS unlearning competition" (arXiv 2406.09073), and the organisers' technical report
"Evaluation for the NeurIPS Machine Unlearning Competition" (unlearning-challenge.github.io,
assets/data/Machine_Unlearning_Metric.pdf, §4-5). Re-implemented here from the scoring code
the competition used, google-deepmind/unlearning_evaluation, metric.py
(`compute_forget_score_from_confs`, `_get_epsilons`, `_get_single_threshold_rates`,
`_get_double_threshold_rates`) and main.py (the final score).

Definition. For each forget example s, N unlearned and N Retrain models each give one scalar
output (the competition: the logit-scaled confidence log p_y - log(1 - p_y) of the true class,
`fastntk_jax.ulira.logit_scaled_confidence`). A family of decision rules ("attacks") tells the
two samples apart, each with a false-positive and a false-negative rate, and

    ε(attack) = max(log(1 - δ - FPR) - log FNR, log(1 - δ - FNR) - log FPR),  δ = 1e-5,

clipped below at 0; an attack with FPR = FNR = 0 (perfect separation) has ε = ∞, and one
with exactly one of FPR, FNR zero is discarded (the report: an artefact of few models). The
example's ε_s is the largest over the attacks, clipped to [0, 50]. Before any attack, an
example where one sample's range (max - min) is below 1% of the other's gets ε_s = 50 (the
reference's guard against a collapsed, "peaky" unlearned distribution).

The attacks, exactly as the reference builds them (100 thresholds per unit of the output):
  * positive class: the side (unlearned or Retrain) with the larger median output;
  * single threshold: predict positive when output >= t, for t on an evenly spaced grid of
    ceil(100 (max - min)) points over the pooled [min, max];
  * double threshold: the side with the smaller range ("peaky", width w = its range) is
    predicted for outputs in [l, r]; r on a grid of ceil(100 · span) points over
    [min_peaky + w - 2, max_peaky + 2], and for each r, l on a grid of 400 points over
    [r - w - 2, r - w + 2].

Score. Per-example points H(s) = 2^-k for ε_s in [k/2, (k+1)/2), k = 0, 1, ..., B - 1 (the
paper's h = 2 / 2^n for bin n = k + 1), and 0 for ε_s >= B/2, where B/2 = ceil(log(N - 1)),
the reference's "back-of-the-envelope" largest ε that N models can show (B = 14 for
N = 512; the report says 13 bins over [0, 6.5), the code uses ceil, 7). Forgetting quality
F = mean_s H(s); final score = F · (RA_U / RA_R) · (TA_U / TA_R), the retain and test
accuracies averaged over the unlearned (U) and Retrain (R) models.

Resolution. With N models a side every non-zero rate is at least 1/N, so a finite ε can
never exceed `epsilon_ceiling` = log(1 - δ - 1/N) + log N = log(N(1 - δ) - 1) (6.24 for
N = 512, 2.71 for N = 16): beyond it, only the cap (50, zero points) remains. A score from
few models cannot resolve small differences in privacy: compare methods at equal N.

Noise floor. The largest of many empirical ε is biased upwards: two disjoint sets of
Retrain seeds (one distribution) do not score ε = 0, F = 1. Tail thresholds that catch, e.g.,
3 models of one side and 1 of the other show ε = log 3 by chance; on Gaussian outputs the
median ε_s of split Retrain was 1.6-1.8 for N = 16 to 256 (F = 0.13-0.18). Identical samples
give ε = 0. Read a method's score against Retrain's own (Retrain seeds A vs B).

Deviations from the reference (numerical, documented where they act): rates and ε are
float64 (the reference takes means in float32, ε differing by ~1e-7); the single-threshold
grid is numpy.linspace (the reference's torch.linspace can differ in the last bit of a grid
point); where every attack is discarded (e.g. both samples one and the same constant) ε_s is
0 (the reference fails an assertion there); an example with a non-finite output gets ε_s =
NaN, and F and the score are then NaN.
"""

from __future__ import annotations

import math

import numpy as np

from fastntk_jax import klom

__all__ = ["DELTA", "EPSILON_CAP", "per_example_epsilon", "epsilon_ceiling",
           "forgetting_quality", "epsilon_score"]

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
BUFFER = 2.0
BUCKET_WIDTH = 0.5
PEAKY_RATIO = 0.01
MAX_RANGE = 1e4  # outputs spanning more units would need > 1e6 single thresholds


def _pair(unlearned, retrain) -> tuple[np.ndarray, np.ndarray]:
  """[N, n] and [M, n] float64 outputs; ValueError on shapes or fewer than 2 models."""
  a, b = klom.model_pair(unlearned, retrain, "the ε-score")
  return a, b


def _count_at_least(sorted_x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """#{x >= t} for each t."""
  return sorted_x.size - np.searchsorted(sorted_x, t, side="left")


def _count_between(sorted_x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """#{lo <= x <= hi} for each (lo, hi); 0 where lo > hi."""
  n = np.searchsorted(sorted_x, hi, side="right") - np.searchsorted(sorted_x, lo, side="left")
  return np.maximum(n, 0)


def _single_threshold_rates(pos: np.ndarray, neg: np.ndarray):
  """(FPR, FNR) of "positive iff output >= t" over the reference's grid of t."""
  lo = min(pos.min(), neg.min())
  hi = max(pos.max(), neg.max())
  t = np.linspace(lo, hi, int(np.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
  tp = _count_at_least(np.sort(pos), t)
  fp = _count_at_least(np.sort(neg), t)
  return fp / neg.size, (pos.size - tp) / pos.size


def _double_threshold_rates(pos: np.ndarray, neg: np.ndarray):
  """(FPR, FNR) of "peaky side iff l <= output <= r" over the reference's (l, r) grid."""
  peaky, other = (neg, pos) if np.ptp(pos) >= np.ptp(neg) else (pos, neg)
  width = peaky.max() - peaky.min()
  lo = peaky.min() + width - BUFFER
  hi = peaky.max() + BUFFER
  right = np.linspace(lo, hi, int(np.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
  left = np.linspace(right - width - BUFFER, right - width + BUFFER,
                     int(np.ceil(2 * BUFFER * THRESHOLDS_PER_UNIT)), axis=1)
  right = np.broadcast_to(right[:, None], left.shape)
  tp = _count_between(np.sort(peaky), left, right).reshape(-1)
  fp = _count_between(np.sort(other), left, right).reshape(-1)
  return fp / other.size, (peaky.size - tp) / peaky.size


def _best_attack_epsilon(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> float:
  """Largest ε over attacks (∞ for perfect separation); 0 when every attack is discarded."""
  if np.any((fpr == 0) & (fnr == 0)):
    return math.inf
  keep = (fpr > 0) & (fnr > 0)
  if not keep.any():
    return 0.0
  f, g = fpr[keep], fnr[keep]
  with np.errstate(invalid="ignore", divide="ignore"):
    # log of 1 - δ - rate < 0 (a rate of 1) is NaN; fmax keeps the other term, and an
    # attack with both NaN (FPR = FNR = 1) is discarded, as the reference's nan-max does.
    e = np.fmax(np.log(1 - delta - f) - np.log(g), np.log(1 - delta - g) - np.log(f))
  e = e[~np.isnan(e)]
  return float(max(e.max(), 0.0)) if e.size else 0.0


def _example_epsilon(u: np.ndarray, r: np.ndarray, delta: float) -> float:
  """ε_s of one example from its unlearned outputs u [N] and Retrain outputs r [M]."""
  if not (np.isfinite(u).all() and np.isfinite(r).all()):
    return math.nan
  pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
  spans = sorted([np.ptp(pos), np.ptp(neg)])
  if spans[1] == 0 and pos[0] == neg[0]:
    return 0.0  # one constant output on both sides: nothing to tell apart
  if spans[1] > 0 and spans[0] / spans[1] < PEAKY_RATIO:
    return EPSILON_CAP
  if max(pos.max(), neg.max()) - min(pos.min(), neg.min()) > MAX_RANGE:
    raise ValueError(f"outputs span more than {MAX_RANGE:g} units; the threshold grids "
                     f"({THRESHOLDS_PER_UNIT} per unit) are made for logit-scaled scores")
  rates = [_single_threshold_rates(pos, neg), _double_threshold_rates(pos, neg)]
  fpr = np.concatenate([f for f, _ in rates])
  fnr = np.concatenate([g for _, g in rates])
  return min(_best_attack_epsilon(fpr, fnr, delta), EPSILON_CAP)


def per_example_epsilon(unlearned, retrain, *, delta: float = DELTA) -> np.ndarray:
  """ε_s of every forget example, as the competition's `_get_epsilons`.

  Args:
    unlearned: per-model outputs [N, n] (N unlearned models, n forget examples), e.g.
      logit-scaled confidences.
    retrain: the same [M, n] for M Retrain models.
    delta: δ of the (ε, δ) estimate (1e-5).

  Returns:
    float64 [n] in [0, EPSILON_CAP]; NaN for an example with a non-finite output.

  Raises:
    ValueError: shapes, fewer than 2 models a side, δ outside (0, 1), or outputs spanning
      more than 1e4 units (the grids assume logit-scaled scores).
  """
  a, b = _pair(unlearned, retrain)
  if not 0 < delta < 1:
    raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
  return np.array([_example_epsilon(a[:, i], b[:, i], float(delta))
                   for i in range(a.shape[1])], np.float64)


def epsilon_ceiling(num_unlearned: int, num_retrain: int, *, delta: float = DELTA) -> float:
  """The largest finite ε that N unlearned and M Retrain models can show.

  Every kept attack has FPR >= 1/n_neg and FNR >= 1/n_pos, so
  ε <= max(log(1 - δ - 1/M) + log N, log(1 - δ - 1/N) + log M), = log(N(1 - δ) - 1) for
  N = M; clipped below at 0. Beyond it only the cap of a separated example remains.
  """
  if min(num_unlearned, num_retrain) < 2:
    raise ValueError("epsilon_ceiling needs at least 2 models on each side")
  n, m = int(num_unlearned), int(num_retrain)
  return max(math.log(1 - delta - 1 / m) + math.log(n),
             math.log(1 - delta - 1 / n) + math.log(m), 0.0)


def _bucket_count(num_models: int) -> int:
  """B: buckets of width 1/2 over [0, ceil(log(N - 1)))."""
  return int(round(math.ceil(math.log(num_models - 1)) / BUCKET_WIDTH))


def forgetting_quality(eps, *, num_models: int) -> float:
  """F = mean over examples of H(s) = 2^-floor(2 ε_s), 0 past the last bucket.

  Args:
    eps: per-example ε_s [n] (`per_example_epsilon`), n >= 1.
    num_models: N, models per side; the buckets cover [0, ceil(log(N - 1))), so with N = 2
      there is none and F = 0.

  Returns:
    F in [0, 1]; NaN when some ε_s is NaN.
  """
  e = np.asarray(eps, np.float64).reshape(-1)
  if e.size == 0:
    raise ValueError("forgetting_quality needs at least one example")
  if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) \
      or num_models < 2:
    raise ValueError(f"num_models must be an int >= 2, got {num_models!r}")
  if (e < 0).any():
    raise ValueError("ε values must be >= 0")
  if np.isnan(e).any():
    return math.nan
  k = np.floor(e / BUCKET_WIDTH)
  points = np.where(k < _bucket_count(int(num_models)), 0.5 ** k, 0.0)
  return float(points.mean())


def _accuracy(name: str, value) -> float:
  v = float(value)
  if not (math.isfinite(v) and v >= 0):
    raise ValueError(f"{name} must be a finite accuracy >= 0, got {value!r}")
  return v


def epsilon_score(unlearned, retrain, *, ra_unlearned, ra_retrain, ta_unlearned, ta_retrain,
                  delta: float = DELTA) -> dict:
  """The competition's final score F · (RA_U / RA_R) · (TA_U / TA_R), with its parts.

  Args:
    unlearned: per-model outputs [N, n] of the unlearned models on the forget examples.
    retrain: the same [M, n] for Retrain models (other seeds).
    ra_unlearned, ra_retrain: retain accuracy averaged over the unlearned / Retrain models.
    ta_unlearned, ta_retrain: test accuracy, likewise (any one scale for all four).
    delta: δ (1e-5).

  Returns:
    {"score", "forgetting_quality", "retain_accuracy_ratio", "test_accuracy_ratio",
     "epsilon_mean", "epsilon_median", "num_models" (N of the buckets: min(N, M); the
     reference has N = M), "num_unlearned", "num_retrain", "num_examples", "delta",
     "epsilon_ceiling" (largest finite ε these counts allow), "max_epsilon" (end of the
     scored range, ceil(log(num_models - 1))), "num_buckets", "epsilon_cap" (ε of a
     separated or collapsed example, 0 points), "num_capped", "num_nonfinite"}.
    NaN score, F and ε statistics when some example has a non-finite output.
  """
  a, b = _pair(unlearned, retrain)
  if a.shape[1] == 0:
    raise ValueError("epsilon_score needs at least one forget example")
  ra_u, ra_r = _accuracy("ra_unlearned", ra_unlearned), _accuracy("ra_retrain", ra_retrain)
  ta_u, ta_r = _accuracy("ta_unlearned", ta_unlearned), _accuracy("ta_retrain", ta_retrain)
  if ra_r == 0 or ta_r == 0:
    raise ValueError("Retrain's retain and test accuracies must be > 0 (they divide)")
  eps = per_example_epsilon(a, b, delta=delta)
  n_models = min(a.shape[0], b.shape[0])
  f = forgetting_quality(eps, num_models=n_models)
  finite = ~np.isnan(eps)
  return {
      "score": f * (ra_u / ra_r) * (ta_u / ta_r),
      "forgetting_quality": f,
      "retain_accuracy_ratio": ra_u / ra_r,
      "test_accuracy_ratio": ta_u / ta_r,
      "epsilon_mean": float(np.mean(eps)),  # NaN propagates, as into F
      "epsilon_median": float(np.median(eps)),
      "num_models": n_models,
      "num_unlearned": int(a.shape[0]),
      "num_retrain": int(b.shape[0]),
      "num_examples": int(a.shape[1]),
      "delta": float(delta),
      "epsilon_ceiling": epsilon_ceiling(a.shape[0], b.shape[0], delta=delta),
      "max_epsilon": float(math.ceil(math.log(n_models - 1))),
      "num_buckets": _bucket_count(n_models),
      "epsilon_cap": EPSILON_CAP,
      "num_capped": int(np.sum(eps[finite] >= EPSILON_CAP)),
      "num_nonfinite": int(np.sum(~finite)),
  }
