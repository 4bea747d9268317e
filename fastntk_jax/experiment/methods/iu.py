"""IU (influence unlearning with a WoodFisher inverse Fisher): one Newton-like step, no training.

Reference: Izzo et al., "Approximate Data Deletion from Machine Learning Models" (AISTATS
2021); Koh & Liang (2017); as run by Jia et al., "Model Sparsity Can Simplify Machine
Unlearning" (NeurIPS 2023), github.com/OPTML-Group/Unlearn-Sparse (`unlearn/Wfisher.py`).

With n = N_f + N_r and per-example CE gradients g at Full (inference mode):
  v = (1/n)·Σ_{D_f} g − (N_f/(n·N_r))·Σ_{D_r} g,
then the reference's WoodFisher recursion over the first N + 1 retain examples in dataset
order (N = `fisher_samples`, both the sample count and the damping of the recursion): k = v,
o = g₁; for each later g: t = o·g, k ← k − (k·g)/(N + t)·o, o ← o − t/(N + t)·o; and
θ ← θ + α·k. On the trainable collection every method acts on. Defaults (the reference's):
α = 0.2, N = 1000. Config block: `baselines.iu`.
"""

import time

import numpy as np

from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def woodfisher_direction(forget_grads: np.ndarray, retain_grads: np.ndarray,
                         fisher_samples: int) -> np.ndarray:
  """The reference's perturbation direction k [p] (float64) from per-example gradients
  [N_f, p] and [N_r, p] (see the module docstring)."""
  n_f, n_r = len(forget_grads), len(retain_grads)
  if not n_f or not n_r:
    raise ValueError(f"iu: needs examples of D_f and D_r, got {n_f} and {n_r}")
  n = n_f + n_r
  g_f = forget_grads.astype(np.float64)
  g_r = retain_grads.astype(np.float64)
  k = g_f.sum(axis=0) / n - (n_f / (n * n_r)) * g_r.sum(axis=0)
  big_n = float(fisher_samples)
  o = g_r[0].copy()
  for g in g_r[1:fisher_samples + 1]:
    t = float(o @ g)
    k = k - (float(k @ g) / (big_n + t)) * o
    o = o - (t / (big_n + t)) * o
  return k


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  start = time.perf_counter()
  grads = lambda split: obj.per_example_gradients(ctx, ctx.full, split)
  k = woodfisher_direction(grads(data.forget), grads(data.retain), int(block.fisher_samples))
  new = obj.flat_params(ctx.full) + float(block.alpha) * k
  if not np.all(np.isfinite(new)):
    raise FloatingPointError("iu: the WoodFisher step is not finite; lower baselines.iu.alpha "
                             "or raise baselines.iu.fisher_samples")
  return methods.Result(obj.unflatten_like(ctx.full, new), time.perf_counter() - start,
                        {"step_norm": float(float(block.alpha) * np.linalg.norm(k))})


def validate(block) -> None:
  obj.check_number(block, "baselines.iu", "alpha", low=0.0, low_open=True)
  obj.check_number(block, "baselines.iu", "fisher_samples", low=1, integer=True)


METHOD = methods.Method(
    name="iu", label="IU", run=run, config_group="baselines.iu",
    reference="Izzo et al. AISTATS 2021; Unlearn-Sparse `wfisher` (Jia et al. NeurIPS 2023)",
    validate=validate,
    search_space=lambda cfg: {"alpha": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
                                        100.0, 200.0)})
