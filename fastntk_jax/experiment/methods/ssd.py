"""SSD (selective synaptic dampening): no training; the entries far more important to D_f than
to D are shrunk towards 0.

Reference: Foster et al., "Fast Machine Unlearning Without Retraining Through Selective
Synaptic Dampening" (AAAI 2024), github.com/if-loops/selective-synaptic-dampening
(`src/ssd.py`, `calc_importance`, `modify_weight`).

Importance of each entry: the mean over minibatches of the squared gradient of the batch-mean
CE (a diagonal Fisher), []_D over D = D_r ∪ D_f and []_f over D_f, the model in inference
mode. Where []_f > α·[]_D the entry θ becomes β·θ with β = min(λ·[]_D/[]_f, 1) (exponent 1,
lower bound 1, as the reference); the others are unchanged. Applied to the trainable
collection every method acts on (the reference dampens every parameter, BatchNorm included).
Defaults (the reference's): α (`selection_weighting`) = 10, λ (`dampening_constant`) = 1,
batches of 64 (its full-class setting). Config block: `baselines.ssd`.
"""

import time

import numpy as np

from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj


def importances(grads: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
  """Mean over the minibatches of a seeded shuffle of the rows of `grads` [n, p] (per-example
  gradients) of the squared batch-mean gradient: [p] float64."""
  n = grads.shape[0]
  if n == 0:
    raise ValueError("ssd: no rows to take importances over (an empty split)")
  order = np.random.default_rng([seed, 0x55D]).permutation(n)
  total = np.zeros(grads.shape[1], np.float64)
  batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
  for rows in batches:
    total += np.square(grads[rows].astype(np.float64).mean(axis=0))
  return total / len(batches)


def dampen(theta: np.ndarray, imp_all: np.ndarray, imp_forget: np.ndarray, *, alpha: float,
           lam: float) -> np.ndarray:
  """SSD's dampening of the flat parameters `theta` [p] from the two importances [p]."""
  selected = imp_forget > alpha * imp_all
  beta = np.minimum(lam * imp_all / np.where(selected, imp_forget, 1.0), 1.0)
  return np.where(selected, beta * theta, theta)


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  start = time.perf_counter()
  batch = int(block.batch_size)
  grads = lambda split: obj.per_example_gradients(ctx, ctx.full, split)
  imp_all = importances(grads(data.train), batch, ctx.seed)
  imp_forget = importances(grads(data.forget), batch, ctx.seed + 1)
  theta = obj.flat_params(ctx.full)
  new = dampen(theta, imp_all, imp_forget, alpha=float(block.alpha), lam=float(block.lam))
  selected = int(np.sum(imp_forget > float(block.alpha) * imp_all))
  return methods.Result(obj.unflatten_like(ctx.full, new), time.perf_counter() - start,
                        {"dampened_entries": selected})


def validate(block) -> None:
  obj.check_number(block, "baselines.ssd", "alpha", low=0.0, low_open=True)
  obj.check_number(block, "baselines.ssd", "lam", low=0.0, low_open=True)
  obj.check_number(block, "baselines.ssd", "batch_size", low=1, integer=True)


METHOD = methods.Method(
    name="ssd", label="SSD", run=run, config_group="baselines.ssd",
    reference="Foster et al. AAAI 2024 (if-loops/selective-synaptic-dampening)",
    validate=validate,
    search_space=lambda cfg: {"alpha": (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0),
                              "lam": (0.1, 1.0)})
