"""Membership-inference attack (MIA) on per-example losses: a privacy metric for unlearning.

The standard loss-based attack of the unlearning literature (e.g. SCRUB, and the NeurIPS 2023
machine-unlearning challenge's evaluation): an attacker who sees the model's per-example
loss (or confidence) tries to tell the forget set D_f ("members": the model was trained on
them before unlearning) from a hold-out set that was never trained on ("non-members").

    result = membership_inference_attack(member_losses, nonmember_losses, num_folds=5, seed=0)
    result = mia_from_logits(logits_f, y_f, logits_test, y_test, loss="cross_entropy")

Protocol: the larger of the two sets is subsampled (without replacement, seeded) to the
size of the smaller, so chance level is exactly 0.5; a logistic regression (scikit-learn,
on standardised features, the scaler fitted inside each fold) is evaluated with stratified
k-fold cross-validation. Reported: the mean and standard deviation of the per-fold test
accuracies, and the ROC-AUC of the pooled out-of-fold membership scores (computed here with
the Mann-Whitney rank statistic, ties counted half).

Reading it: after perfect unlearning the forget set looks like data the model never saw,
so the attack should do no better on the unlearned model than on Retrain (the model trained
on D_r only), which is the reference to compare every method with. On Full (no unlearning)
the attack accuracy is typically well above the Retrain value, the more so the more the
model overfits D_f. An accuracy *below* Retrain's can also leak (the "Streisand effect":
a forget set with unusually high loss is recognisable too), so report the gap |acc - acc_Retrain|.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

__all__ = [
    "MIAResult",
    "LOSS_KINDS",
    "per_example_loss",
    "roc_auc",
    "membership_inference_attack",
    "mia_from_logits",
    "mia_efficacy",
    "mia_efficacy_spread",
]

LOSS_KINDS = ("cross_entropy", "squared", "confidence")


@dataclasses.dataclass(frozen=True)
class MIAResult:
  """What `membership_inference_attack` measured.

  Attributes:
    accuracy: mean over folds of the attack's test accuracy (chance = 0.5).
    accuracy_std: standard deviation of the per-fold accuracies.
    fold_accuracies: the per-fold test accuracies.
    auc: ROC-AUC of the pooled out-of-fold membership scores (chance = 0.5).
    num_members, num_nonmembers: samples of each set used (after balancing; equal when
      balanced).
    num_members_total, num_nonmembers_total: samples of each set given.
    num_folds: k of the stratified k-fold cross-validation.
    seed: seed of the subsampling and of the fold split.
    scores: out-of-fold P(member) [num_members + num_nonmembers] (members first).
    labels: 1 = member, 0 = non-member, aligned with `scores`.
  """
  accuracy: float
  accuracy_std: float
  fold_accuracies: tuple
  auc: float
  num_members: int
  num_nonmembers: int
  num_members_total: int
  num_nonmembers_total: int
  num_folds: int
  seed: int
  scores: np.ndarray = dataclasses.field(repr=False)
  labels: np.ndarray = dataclasses.field(repr=False)

  def as_dict(self) -> dict:
    """JSON-friendly summary (without the per-sample arrays)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in ("scores", "labels")}
    d["fold_accuracies"] = list(d["fold_accuracies"])
    return d


def _as_features(name: str, a) -> np.ndarray:
  """[n] or [n, d] finite floats -> [n, d] float64; clear errors otherwise."""
  a = np.asarray(a)
  if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
    raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
  a = a.astype(np.float64)
  if a.ndim == 1:
    a = a[:, None]
  if a.ndim != 2:
    raise ValueError(f"{name} must be [n] (one score per sample) or [n, d] (d features per "
                     f"sample), got shape {a.shape}")
  if a.shape[0] == 0:
    raise ValueError(f"{name} is empty: the attack needs samples of both members and "
                     "non-members")
  if a.shape[1] == 0:
    raise ValueError(f"{name} has no features (shape {a.shape})")
  bad = ~np.isfinite(a).all(axis=1)
  if bad.any():
    raise ValueError(f"{name} contains non-finite values (NaN/inf) in {int(bad.sum())} "
                     f"sample(s), first at index {int(np.flatnonzero(bad)[0])}")
  return a


def per_example_loss(logits, labels, kind: str = "cross_entropy") -> np.ndarray:
  """Per-example attack score from logits.

  Args:
    logits: [n, C] (numpy or JAX array).
    labels: [n] int class ids in [0, C).
    kind: "cross_entropy" (-log softmax(logits)[y], the usual attack feature),
      "squared" (||one_hot(y) - logits||², the loss the Fast-NTK update is derived for) or
      "confidence" (softmax(logits)[y]).

  Returns:
    float64 [n].
  """
  if kind not in LOSS_KINDS:
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {list(LOSS_KINDS)}")
  z = np.asarray(logits, dtype=np.float64)
  y = np.asarray(labels)
  if z.ndim != 2:
    raise ValueError(f"logits must be [n, C], got shape {z.shape}")
  if y.ndim != 1 or y.shape[0] != z.shape[0]:
    raise ValueError(f"labels must be [n] with n = {z.shape[0]} (logits' rows), got shape "
                     f"{y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"labels must be integers (class ids), got dtype {y.dtype}")
  if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
    raise ValueError(f"labels must lie in [0, {z.shape[1]}), found range "
                     f"[{int(y.min())}, {int(y.max())}]")
  if not np.isfinite(z).all():
    raise ValueError("logits contain non-finite values (NaN/inf)")
  rows = np.arange(z.shape[0])
  if kind == "squared":
    onehot = np.eye(z.shape[1])[y]
    return ((onehot - z) ** 2).sum(axis=1)
  # log-softmax, shifted by the row max (no overflow for large logits).
  shifted = z - z.max(axis=1, keepdims=True)
  log_p = shifted[rows, y] - np.log(np.exp(shifted).sum(axis=1))
  return -log_p if kind == "cross_entropy" else np.exp(log_p)


def roc_auc(labels, scores) -> float:
  """ROC-AUC = P(score of a random positive > score of a random negative), ties count 1/2.

  The Mann-Whitney U statistic with average ranks; O(n log n).

  Args:
    labels: [n] in {0, 1} (1 = positive), both classes present.
    scores: [n] real.
  """
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, dtype=np.float64)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError("roc_auc needs both positive and negative samples")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average rank (1-based) of each run of tied scores.
  _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = start + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def membership_inference_attack(member_scores, nonmember_scores, *, num_folds: int = 5,
                                seed: int = 0, balance: bool = True,
                                regularization: float = 1.0) -> MIAResult:
  """Logistic-regression membership-inference attack with stratified k-fold CV.

  Args:
    member_scores: per-example losses (or [n, d] features, e.g. loss and confidence) of the
      members, typically the forget set D_f.
    nonmember_scores: the same for non-members, typically a hold-out (test) set.
    num_folds: k of the stratified k-fold cross-validation (>= 2).
    seed: seeds the balancing subsample and the fold shuffle (results are deterministic).
    balance: subsample the larger set to the size of the smaller (chance level 0.5).
    regularization: inverse L2 strength `C` of scikit-learn's LogisticRegression.

  Returns:
    `MIAResult` (accuracy, AUC, sample counts, out-of-fold scores).

  Raises:
    ValueError / TypeError: empty sets, non-finite values, mismatched feature counts, or
      fewer samples per class than folds.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import StratifiedKFold  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) \
      or num_folds < 2:
    raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
  members = _as_features("member_scores", member_scores)
  nonmembers = _as_features("nonmember_scores", nonmember_scores)
  if members.shape[1] != nonmembers.shape[1]:
    raise ValueError(f"members have {members.shape[1]} feature(s) per sample but "
                     f"non-members have {nonmembers.shape[1]}")
  total_m, total_n = members.shape[0], nonmembers.shape[0]
  rng = np.random.default_rng(seed)
  if balance:
    k = min(total_m, total_n)
    if total_m > k:
      members = members[np.sort(rng.choice(total_m, k, replace=False))]
    if total_n > k:
      nonmembers = nonmembers[np.sort(rng.choice(total_n, k, replace=False))]
  if min(members.shape[0], nonmembers.shape[0]) < num_folds:
    raise ValueError(f"too few samples for {num_folds}-fold cross-validation: "
                     f"{members.shape[0]} member(s), {nonmembers.shape[0]} non-member(s) "
                     f"(each needs >= {num_folds}); lower num_folds or add samples")
  x = np.concatenate([members, nonmembers])
  y = np.concatenate([np.ones(len(members), np.int64), np.zeros(len(nonmembers), np.int64)])
  scores = np.empty(len(y), np.float64)
  fold_acc = []
  folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  for train, test in folds.split(x, y):
    attack = make_pipeline(StandardScaler(),
                           LogisticRegression(C=regularization, max_iter=1000))
    attack.fit(x[train], y[train])
    prob = attack.predict_proba(x[test])[:, list(attack.classes_).index(1)]
    scores[test] = prob
    # Accuracy of the attack's own decision (threshold 0.5 of its probability).
    fold_acc.append(float(np.mean((prob > 0.5) == (y[test] == 1))))
  return MIAResult(
      accuracy=float(np.mean(fold_acc)), accuracy_std=float(np.std(fold_acc)),
      fold_accuracies=tuple(fold_acc), auc=roc_auc(y, scores),
      num_members=int(len(members)), num_nonmembers=int(len(nonmembers)),
      num_members_total=int(total_m), num_nonmembers_total=int(total_n),
      num_folds=int(num_folds), seed=int(seed), scores=scores, labels=y)


def mia_from_logits(member_logits, member_labels, nonmember_logits, nonmember_labels, *,
                    loss: str | Sequence[str] = "cross_entropy", num_folds: int = 5,
                    seed: int = 0, balance: bool = True) -> MIAResult:
  """`membership_inference_attack` on per-example losses computed from logits.

  Args:
    member_logits, member_labels: [n_m, C] logits and [n_m] labels of the members (D_f).
    nonmember_logits, nonmember_labels: the same for the non-members (hold-out set).
    loss: a `per_example_loss` kind, or a sequence of kinds used together as features
      (e.g. ("cross_entropy", "confidence")).
    num_folds, seed, balance: as for `membership_inference_attack`.

  Returns:
    `MIAResult`.
  """
  kinds = (loss,) if isinstance(loss, str) else tuple(loss)
  if not kinds:
    raise ValueError("loss must name at least one per_example_loss kind")
  feats = lambda z, y: np.stack([per_example_loss(z, y, k) for k in kinds], axis=1)
  return membership_inference_attack(feats(member_logits, member_labels),
                                     feats(nonmember_logits, nonmember_labels),
                                     num_folds=num_folds, seed=seed, balance=balance)


def _svc_efficacy(members, nonmembers, target, seed: int) -> tuple[float, float]:
  """(MIA-Efficacy in %, the SVC's accuracy on its own training data in %) of one member
  subsample: the retain set subsampled (seeded) to the test set's size."""
  from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  if len(members) > len(nonmembers):
    members = members[rng.choice(len(members), len(nonmembers), replace=False)]
  x = np.concatenate([members, nonmembers])
  y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
  svc = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
  # Above the majority share only is the SVC better than a constant guess.
  lift = 100.0 * (float(np.mean(svc.predict(x) == y)) - max(np.mean(y), 1 - np.mean(y)))
  return 100.0 * float(np.mean(svc.predict(target) == 0)), lift


def _confidences(retain_logits, retain_labels, test_logits, test_labels, forget_logits,
                 forget_labels):
  conf = lambda z, y: per_example_loss(z, y, "confidence")[:, None]
  members, nonmembers = conf(retain_logits, retain_labels), conf(test_logits, test_labels)
  target = conf(forget_logits, forget_labels)
  if not (len(members) and len(nonmembers) and len(target)):
    raise ValueError("mia_efficacy needs non-empty retain, test and forget sets")
  return members, nonmembers, target


def mia_efficacy(retain_logits, retain_labels, test_logits, test_labels, forget_logits,
                 forget_labels, *, seed: int = 0) -> float:
  """MIA-Efficacy as SalUn / Unlearn-Sparse define it, in %.

  An SVC (RBF kernel, C=3, gamma="auto", as their code) on the true-class softmax confidence
  is trained with retain samples as members (1) and test samples as non-members (0), the
  retain set subsampled (seeded) to the test set's size; MIA-Efficacy is the share of D_f it
  predicts non-member. Retrain's value is the target, not 100 or 50.

  Args:
    retain_logits, retain_labels: D_r logits [n_r, C] and labels.
    test_logits, test_labels: hold-out logits [n_t, C] and labels (never trained on).
    forget_logits, forget_labels: D_f logits [n_f, C] and labels.
    seed: seeds the subsampling.

  Returns:
    100 · (fraction of D_f predicted non-member).
  """
  sets = _confidences(retain_logits, retain_labels, test_logits, test_labels, forget_logits,
                      forget_labels)
  return _svc_efficacy(*sets, seed)[0]


# The SVC is "at chance on its own training data" when its accuracy there beats the
# majority share (50% when balanced) by less than this many points: its verdict on D_f is
# then a coin the member subsample flips.
SVC_CHANCE_MARGIN = 5.0


def mia_efficacy_spread(retain_logits, retain_labels, test_logits, test_labels, forget_logits,
                        forget_labels, *, subsamples: int = 20) -> dict:
  """MIA-Efficacy (`mia_efficacy`) over member subsamples seeded 0..subsamples-1.

  Returns:
    {"values": [subsamples] %, "min", "max", "mean", "svc_lift": the mean over subsamples
    of the SVC's accuracy on its own training data minus the majority share (points),
    "at_chance": whether that lift is below SVC_CHANCE_MARGIN (the value then flips with
    the subsample)}.
  """
  if isinstance(subsamples, bool) or not isinstance(subsamples, (int, np.integer)) or (
      subsamples < 1):
    raise ValueError(f"subsamples must be an int >= 1, got {subsamples!r}")
  sets = _confidences(retain_logits, retain_labels, test_logits, test_labels, forget_logits,
                      forget_labels)
  runs = [_svc_efficacy(*sets, k) for k in range(int(subsamples))]
  values = [r[0] for r in runs]
  lift = float(np.mean([r[1] for r in runs]))
  return {"values": values, "min": float(np.min(values)), "max": float(np.max(values)),
          "mean": float(np.mean(values)), "svc_lift": lift,
          "at_chance": bool(lift < SVC_CHANCE_MARGIN)}
