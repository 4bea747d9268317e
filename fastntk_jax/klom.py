"""KLoM: a population-level comparison of unlearned models with Retrain (KL of margins).

A single unlearned model can look like one Retrain model by chance; KLoM ("KL divergence of
margins", as in the unlearning evaluations that compare distributions over many seeds) asks
whether the *distribution* over training randomness matches. For each forget example x with
label y and each of N models, the margin is

    m(x) = logit_y(x) - logsumexp_{j != y} logit_j(x),

and KLoM(x) = KL(histogram of m(x) over N unlearned models ‖ histogram over N Retrain
models), with 20 bins over the pooled range of both samples, margins clipped to ±100, and
ε = 1e-5 added to every bin before normalising. Its noise floor is KLoM between two disjoint
sets of Retrain seeds: a method is indistinguishable from Retrain when it sits at the floor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["margins", "klom", "summary"]

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


def klom(unlearned, retrain, *, bins: int = BINS, clip: float = CLIP,
         eps: float = EPS) -> np.ndarray:
  """Per-example KL(unlearned ‖ retrain) of margin histograms.

  Args:
    unlearned: margins [N, n] (N models, n forget examples).
    retrain: margins [M, n] of Retrain models (another set of seeds).
    bins, clip, eps: histogram bins over the pooled range, clipping of the margins, and the
      smoothing added to every bin.

  Returns:
    float64 [n], >= 0; NaN for an example whose margin is NaN in some model (e.g. NaN
    logits of a diverged model): its histogram is undefined, and binning the NaN would give
    a finite, meaningless value.
  """
  a = np.clip(np.asarray(unlearned, np.float64), -clip, clip)
  b = np.clip(np.asarray(retrain, np.float64), -clip, clip)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"margins must be [models, examples] with the same examples; got "
                     f"{a.shape} and {b.shape}")
  if min(a.shape[0], b.shape[0]) < 2:
    raise ValueError("KLoM needs at least 2 models on each side")
  out = np.empty(a.shape[1])
  for i in range(a.shape[1]):
    if np.isnan(a[:, i]).any() or np.isnan(b[:, i]).any():
      out[i] = np.nan
      continue
    lo, hi = min(a[:, i].min(), b[:, i].min()), max(a[:, i].max(), b[:, i].max())
    if hi <= lo:  # every model gives the same margin: identical distributions
      out[i] = 0.0
      continue
    edges = np.linspace(lo, hi, bins + 1)
    p = np.histogram(a[:, i], edges)[0] + eps
    q = np.histogram(b[:, i], edges)[0] + eps
    p, q = p / p.sum(), q / q.sum()
    out[i] = float(np.sum(p * np.log(p / q)))
  return out


def summary(values) -> dict:
  """Mean and quantiles (10/50/90/99%) of per-example KLoM values."""
  v = np.asarray(values, np.float64)
  q = np.quantile(v, [0.1, 0.5, 0.9, 0.99])
  return {"mean": float(v.mean()), "q10": float(q[0]), "median": float(q[1]),
          "q90": float(q[2]), "q99": float(q[3]), "num_examples": int(v.size)}
