"""KLoM: a population-level comparison of unlearned models with Retrain (KL of margins).

A single unlearned model can look like one Retrain model by chance; KLoM ("KL divergence of
margins", Georgiev et al. 2024, "Attribute-to-Delete: Machine Unlearning via Datamodel
Matching", arXiv 2410.23232, App. E.1; the metric of the EasyDUB benchmark of Rinberg et al.)
asks whether the *distribution* over training randomness matches. For each example x with
label y and each of N models, the margin is

    m(x) = logit_y(x) - logsumexp_{j != y} logit_j(x),

and KLoM(x) = KL(P ‖ Q), P the histogram of m(x) over the unlearned models and Q over the
Retrain ("oracle") models, computed as the reference does (repository easydub/EasyDUB-code,
easydub/eval.py, `binned_kl_divergence` called by `klom_from_margins` with
p_samples=unlearned, q_samples=oracle; the same binning as RoyRin/data-unlearning-bench,
unlearning_bench/eval.py, `compute_binned_KL_div`):

  1. both samples are clipped to [-100, 100];
  2. 20 equal-width bins span the pooled range [min, max] of the clipped samples (range
     [min, min + 1] when every value is equal);
  3. a sample falls in bin j when edge_j <= m < edge_{j+1} (numpy.digitize); a sample equal
     to the last edge, i.e. the pooled maximum, falls in no bin and is left out of its
     histogram, which is normalised over the samples that remain;
  4. Q is floored at ε = 1e-5 only in the bins where P is non-empty (Q is not renormalised
     after the floor), and KLoM = Σ_{P_j > 0} P_j log(P_j / Q_j).

The headline of EasyDUB is the 95th percentile of KLoM over examples (`summary`'s `p95`).
Its noise floor is KLoM between two disjoint sets of Retrain seeds: a method is
indistinguishable from Retrain when it sits at the floor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["margins", "model_pair", "klom", "summary"]

BINS = 20
CLIP = 100.0
EPS = 1e-5


def margins(logits, labels) -> np.ndarray:
  """m = logit_y - logsumexp_{j≠y} logit_j, per example; float64 [n] from logits [n, C]."""
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels)
  if z.ndim != 2 or y.shape != (z.shape[0],):
    raise ValueError(f"logits must be [n, C] and labels [n]; got {z.shape} and {y.shape}")
  if z.shape[1] < 2:
    raise ValueError("margins need at least 2 classes")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"labels must be integer class ids, got dtype {y.dtype}")
  if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
    # A negative label would silently index from the end (another class's margin).
    raise ValueError(f"labels must lie in [0, {z.shape[1]}), found range "
                     f"[{int(y.min())}, {int(y.max())}]")
  rows = np.arange(z.shape[0])
  true = z[rows, y]
  others = z.copy()
  others[rows, y] = -np.inf
  top = others.max(axis=1, keepdims=True)
  return true - (top[:, 0] + np.log(np.exp(others - top).sum(axis=1)))


def _binned_kl(p_samples: np.ndarray, q_samples: np.ndarray, bins: int, eps: float) -> float:
  """KL(P ‖ Q) of two clipped 1-D samples, binned as the module docstring's steps 2-4."""
  lo = min(p_samples.min(), q_samples.min())
  hi = max(p_samples.max(), q_samples.max())
  if lo >= hi:
    hi = lo + 1.0
  edges = np.linspace(lo, hi, bins + 1)
  # searchsorted(side="right") is numpy.digitize(right=False): index j + 1 for bin j, and
  # bins + 1 for a sample equal to the last edge, which bincount's slice then drops.
  p = np.bincount(np.searchsorted(edges, p_samples, side="right"), minlength=bins + 2)
  q = np.bincount(np.searchsorted(edges, q_samples, side="right"), minlength=bins + 2)
  p, q = p[1:bins + 1], q[1:bins + 1]
  if p.sum() == 0:
    # Every unlearned margin sits on the last edge, which the reference's binning drops:
    # count the last edge in the last bin (both sides) rather than report nothing.
    p[-1] += int(np.sum(p_samples == edges[-1]))
    q[-1] += int(np.sum(q_samples == edges[-1]))
  p = p / p.sum()
  q = q / q.sum() if q.sum() > 0 else np.zeros(bins)
  seen = p > 0
  q = np.maximum(q[seen], eps)
  return float(np.sum(p[seen] * np.log(p[seen] / q)))


def model_pair(unlearned, retrain, what: str) -> tuple[np.ndarray, np.ndarray]:
  """The two sides of a population audit as float64 [N, n] and [M, n] (models × examples);
  ValueError naming `what` for other shapes or fewer than 2 models on a side."""
  a = np.asarray(unlearned, np.float64)
  b = np.asarray(retrain, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"{what}: outputs must be [models, examples] with the same examples; "
                     f"got {a.shape} and {b.shape}")
  if min(a.shape[0], b.shape[0]) < 2:
    raise ValueError(f"{what} needs at least 2 models on each side, got {a.shape[0]} "
                     f"unlearned and {b.shape[0]} Retrain")
  return a, b


def klom(unlearned, retrain, *, bins: int = BINS, clip: float = CLIP,
         eps: float = EPS) -> np.ndarray:
  """Per-example KL(unlearned ‖ retrain) of margin histograms, as EasyDUB computes it.

  Args:
    unlearned: margins [N, n] (N models, n examples), the distribution P.
    retrain: margins [M, n] of Retrain models (another set of seeds), the distribution Q.
    bins: number of equal-width bins over the pooled range of the clipped margins (20).
    clip: margins are clipped to [-clip, clip] first (100).
    eps: floor of Q's probability in the bins where P is non-empty (1e-5).

  Returns:
    float64 [n], >= 0. NaN for an example whose margin is NaN in some model (e.g. NaN
    logits of a diverged model: binning the NaN would give a finite, meaningless value).
    Where every unlearned margin equals the pooled maximum, the reference's binning leaves
    all of P out and returns 0 (a disjoint distribution reported as a perfect match); here
    the last edge then counts in the last bin, giving the separated value log(1/eps).

  Raises:
    ValueError: inputs that are not [models, examples] with the same examples, fewer than
      2 models on a side, bins < 1, or clip/eps not positive.
  """
  a, b = model_pair(unlearned, retrain, "KLoM")
  if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
    raise ValueError(f"bins must be an int >= 1, got {bins!r}")
  if not (clip > 0 and eps > 0):
    raise ValueError(f"clip and eps must be positive, got clip={clip!r}, eps={eps!r}")
  a, b = np.clip(a, -clip, clip), np.clip(b, -clip, clip)
  out = np.empty(a.shape[1])
  for i in range(a.shape[1]):
    if np.isnan(a[:, i]).any() or np.isnan(b[:, i]).any():
      out[i] = np.nan
    else:
      out[i] = _binned_kl(a[:, i], b[:, i], int(bins), float(eps))
  return out


def summary(values) -> dict:
  """Mean and quantiles of per-example KLoM values; `p95` is EasyDUB's headline.

  Args:
    values: per-example KLoM [n], n >= 1.

  Returns:
    {"mean", "median", "q10", "q90", "p95", "q99", "num_examples"}; quantiles by linear
    interpolation (numpy's default, as the reference's np.percentile). Every statistic is
    NaN when some value is NaN.
  """
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    raise ValueError("summary needs at least one KLoM value")
  q = np.quantile(v, [0.1, 0.5, 0.9, 0.95, 0.99])
  return {"mean": float(v.mean()), "median": float(q[1]), "q10": float(q[0]),
          "q90": float(q[2]), "p95": float(q[3]), "q99": float(q[4]),
          "num_examples": int(v.size)}
