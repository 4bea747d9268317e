"""U-LiRA: a per-example likelihood-ratio attack that tells unlearned models from Retrain.

Hayes et al. 2024, "Inexact unlearning needs more careful evaluations to avoid a false sense
of privacy" (arXiv 2403.01218, SaTML 2025): a population attack (one decision rule for every
example) overstates the privacy of inexact unlearning; a *per-example* attack, LiRA (Carlini
et al. 2022, "Membership inference attacks from first principles") adapted to unlearning,
is much stronger. For each forget example x, shadow models give two samples of the model's
output on x, from unlearned models (trained with x, then x unlearned) and from Retrain models
(never trained on x); a Gaussian is fitted to each, and a target model's output s on x is
scored by the log-likelihood ratio

    Λ(s) = log N(s; μ_U, σ_U²) - log N(s; μ_R, σ_R²)      (> 0: "unlearned").

This is LiRA's *online* test (both hypotheses fitted, not the one-sided offline test on the
OUT distribution only) with IN := unlearned and OUT := Retrain. Hayes et al.'s code is not
public; the estimators follow LiRA's reference code, tensorflow/privacy
research/mi_lira_2021/plot.py (`generate_ours`: location = median of the shadow outputs,
scale = their standard deviation (ddof 0), both per example) and score.py (the output is the
logit-scaled confidence, `logit_scaled_confidence`). The scale is floored at `min_std`
(LiRA adds 1e-30) so that shadow outputs that agree to float precision (e.g. saturated
scores) give a finite log-density.

Population setting (this package: one fixed forget set, each model either unlearned or
Retrain, from its own seed): the models of each side are split, seeded, into shadow models
(fit the Gaussians) and `num_targets` held-out target models; every (target model, example)
pair is one attack decision, positive when the target is unlearned. Reported over the
pooled pairs: ROC-AUC (Mann-Whitney, ties half: `fastntk_jax.mia.roc_auc`), TPR at 1% and
0.1% FPR (LiRA's convention: the largest TPR among the ROC's points with FPR strictly below
the level, no interpolation; with at most 1/level negatives the only such point has FPR 0,
i.e. the strictest threshold, which the result flags), the balanced accuracy of the
likelihood-ratio decision Λ > 0 (the Bayes rule for equal priors; Hayes et al. report attack
accuracy on balanced targets), and LiRA's best balanced accuracy max_t 1 - (FPR + FNR)/2
(threshold chosen on the evaluated pairs, optimistic).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from fastntk_jax import klom
from fastntk_jax import mia

__all__ = ["logit_scaled_confidence", "ulira"]

MIN_STD = 1e-6


def logit_scaled_confidence(logits, labels) -> np.ndarray:
  """LiRA's score log(p_y / (1 - p_y)) of the true-class softmax probability p_y.

  Computed without forming p_y: log p_y - log(1 - p_y) = z_y - logsumexp_{j≠y} z_j (both
  logs share the softmax's normaliser), which is KLoM's margin (`klom.margins`), finite for
  any finite logits. The references (tensorflow/privacy research/mi_lira_2021/score.py; the
  NeurIPS 2023 competition's metric.py, `compute_logit_scaled_confidence`) form the
  probabilities and add 1e-45 inside both logs; they agree with this to float64 rounding
  while |score| < ~69 and saturate near ±103.6 beyond.

  Args:
    logits: [n, C] (C >= 2).
    labels: [n] integer class ids in [0, C).

  Returns:
    float64 [n].
  """
  return klom.margins(logits, labels)


def _split(rng: np.random.Generator, count: int, num_targets: int):
  perm = rng.permutation(count)
  return np.sort(perm[:num_targets]), np.sort(perm[num_targets:])


def _fit(shadow: np.ndarray, min_std: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (median, max(std, min_std)) of shadow outputs [k, n]."""
  return np.median(shadow, axis=0), np.maximum(shadow.std(axis=0), min_std)


def _log_normal(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
  return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(FPR, TPR) of "positive iff score >= t" for every distinct t, from (0, 0) to (1, 1)."""
  order = np.argsort(-scores, kind="mergesort")
  s, y = scores[order], labels[order]
  last_of_run = np.r_[s[1:] != s[:-1], True]  # tied scores enter the ROC together
  tp = np.cumsum(y)[last_of_run]
  fp = np.cumsum(~y)[last_of_run]
  return np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()]


def _tpr_below(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
  return float(tpr[fpr < level].max())


def ulira(unlearned, retrain, *, num_targets: Optional[int] = None, seed: int = 0,
          min_std: float = MIN_STD) -> dict:
  """U-LiRA over a population of unlearned and Retrain models (module docstring).

  Args:
    unlearned: per-model outputs [N, n] of unlearned models on the n forget examples
      (logit-scaled confidences or margins).
    retrain: the same [M, n] for Retrain models (seeds of their own).
    num_targets: target models held out from *each* side; the other N - num_targets and
      M - num_targets are shadow models. Default max(1, min(N, M) // 4).
    seed: seeds the split (numpy default_rng: a permutation of the unlearned models, then
      one of the Retrain models; the first num_targets of each are the targets).
    min_std: floor of the fitted standard deviations (1e-6, in units of the outputs).

  Returns:
    {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "balanced_accuracy" (Λ > 0),
     "best_balanced_accuracy", "num_positives", "num_negatives" (pairs: targets × n each),
     "fpr_resolution" (1 / num_negatives), "resolves_1pct_fpr", "resolves_0_1pct_fpr"
     (whether a non-zero FPR below the level exists, i.e. num_negatives > 100 / > 1000;
     if not, the TPR is the one at FPR 0), "num_targets", "num_shadow_unlearned",
     "num_shadow_retrain", "num_examples", "num_nonfinite_examples", "seed", "min_std"}.
    The metrics are NaN when some example has a non-finite output in some model (a
    diverged model): scoring the rest would hide it.

  Raises:
    ValueError: shapes, no examples, num_targets < 1, fewer than 2 shadow models a side,
      or min_std <= 0.
  """
  a, b = klom.model_pair(unlearned, retrain, "U-LiRA")
  if a.shape[1] == 0:
    raise ValueError("U-LiRA needs at least one forget example")
  n_u, n_r, n = a.shape[0], b.shape[0], a.shape[1]
  k = max(1, min(n_u, n_r) // 4) if num_targets is None else num_targets
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"num_targets must be an int >= 1, got {num_targets!r}")
  if min(n_u, n_r) - k < 2:
    raise ValueError(f"U-LiRA needs at least 2 shadow models on each side after holding out "
                     f"{k} target(s) a side; got {n_u} unlearned and {n_r} Retrain models")
  if not min_std > 0:
    raise ValueError(f"min_std must be > 0, got {min_std!r}")
  k = int(k)
  rng = np.random.default_rng(seed)
  target_u, shadow_u = _split(rng, n_u, k)
  target_r, shadow_r = _split(rng, n_r, k)
  nonfinite = ~(np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0))
  out = {"num_positives": k * n, "num_negatives": k * n, "fpr_resolution": 1.0 / (k * n),
         "resolves_1pct_fpr": k * n > 100, "resolves_0_1pct_fpr": k * n > 1000,
         "num_targets": k, "num_shadow_unlearned": int(n_u - k),
         "num_shadow_retrain": int(n_r - k), "num_examples": int(n),
         "num_nonfinite_examples": int(nonfinite.sum()), "seed": int(seed),
         "min_std": float(min_std)}
  metrics = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "balanced_accuracy",
             "best_balanced_accuracy")
  if out["num_nonfinite_examples"]:
    return {**{m: math.nan for m in metrics}, **out}
  mu_u, sd_u = _fit(a[shadow_u], min_std)
  mu_r, sd_r = _fit(b[shadow_r], min_std)
  score = lambda x: _log_normal(x, mu_u, sd_u) - _log_normal(x, mu_r, sd_r)
  with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below
    pos, neg = score(a[target_u]).reshape(-1), score(b[target_r]).reshape(-1)
  labels = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
  scores = np.r_[pos, neg]
  if not np.isfinite(scores).all():  # the likelihood ratio overflowed (e.g. inf - inf)
    return {**{m: math.nan for m in metrics}, **out,
            "num_nonfinite_scores": int((~np.isfinite(scores)).sum())}
  fpr, tpr = _roc(labels, scores)
  return {"auc": mia.roc_auc(labels, scores),
          "tpr_at_1pct_fpr": _tpr_below(fpr, tpr, 1e-2),
          "tpr_at_0_1pct_fpr": _tpr_below(fpr, tpr, 1e-3),
          "balanced_accuracy": 0.5 * (float(np.mean(pos > 0)) + float(np.mean(neg <= 0))),
          "best_balanced_accuracy": float(np.max(1 - (fpr + 1 - tpr) / 2)),
          **out}
