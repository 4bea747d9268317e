"""The BatchNorm running statistics of a released model, recomputed from the data its method
may see (SWA's "bn_update"): `recompute_batch_stats`, which `experiment.finetune.released_frozen`
applies to every released model in standard fine-tuning with train-mode BatchNorm, so that
no statistic of D_f stays in Retrain's or an unlearning method's model."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax.data import batches as batches_lib

PyTree = Any


def _own_batch_stats(module) -> dict:
  """The running statistics a bound module holds itself ({name: array}), not its children's."""
  from fastntk_jax.models.layers import BATCH_STATS  # pylint: disable=g-import-not-at-top
  if module.scope is None:
    return {}
  stats = module.variables.get(BATCH_STATS, {})
  return {k: v for k, v in stats.items() if hasattr(v, "shape")}


@functools.partial(jax.jit, static_argnums=0)
def _summed_calls(model, variables, x, start):
  """One train-mode pass on the batch `x` (nothing trained) in which every call of a module
  holding running statistics starts from `start` (a scalar per leaf, a tree like
  `variables["batch_stats"]`) and adds what it updated them to onto what its earlier calls
  added: each leaf ends as Σ_calls (m·start + (1 - m)·b_call) for a BatchNorm updating
  r <- m·r + (1 - m)·b. Returns (that tree, {module path: its number of calls})."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models.layers import BATCH_STATS  # pylint: disable=g-import-not-at-top
  counts, active = {}, set()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    own = _own_batch_stats(module) if context.method_name != "setup" else {}
    if not own or id(module) in active or not module.is_mutable_collection(BATCH_STATS):
      return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    base = functools.reduce(lambda t, k: t[k], path, start)
    active.add(id(module))
    try:
      for k, v in own.items():
        module.put_variable(BATCH_STATS, k, jnp.full(v.shape, base[k], v.dtype))
      out = next_fun(*args, **kwargs)
      after = _own_batch_stats(module)
      for k, v in own.items():
        module.put_variable(BATCH_STATS, k, v + after[k])
    finally:
      active.discard(id(module))
    counts[path] = counts.get(path, 0) + 1
    return out

  zeros = jax.tree_util.tree_map(jnp.zeros_like, variables[BATCH_STATS])
  with nn.intercept_methods(interceptor):
    _, state = model.apply({**variables, BATCH_STATS: zeros}, x, train=True,
                           mutable=[BATCH_STATS])
  return state[BATCH_STATS], {"/".join(p): jnp.asarray(c, jnp.int32) for p, c in counts.items()}


def _batch_moments(model, variables, x):
  """The moments (mean, biased variance) each train-mode BatchNorm normalised the batch `x`
  with, a tree like `variables["batch_stats"]` (float64), for any BatchNorm whose running
  statistics follow r <- m·r + (1 - m)·b (Flax's, PyTorch's, ours; m its momentum); for a
  layer called k times in one pass, the mean of its k calls' moments.

  Two train-mode passes (train-mode activations do not depend on the running statistics),
  each call of a layer started from a set value s and its updates summed over the calls
  (`_summed_calls`): from s = 0 they sum to R = (1 - m)·Σ b, from s = S (a scalar per leaf,
  the largest |R|) to k·m·S + R; hence m per channel, and the mean Σ b / k = R / (k·(1 - m)),
  with relative round-off only, whatever m is and whichever BatchNorm module it is. A batch
  of one row (a BatchNorm without spatial axes: variance 0) is a batch like any other.

  Raises:
    ValueError: a layer whose update is not of that form (its m differs across channels),
      whose m is 1 or that no train-mode call reaches (its statistics never move), or whose
      moments are not finite (a diverged model), named.
  """
  import flax  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models.layers import BATCH_STATS  # pylint: disable=g-import-not-at-top
  f64 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)
  scalars = lambda tree, f: jax.tree_util.tree_map(lambda a: jnp.asarray(f(a), a.dtype), tree)
  stats = flax.core.unfreeze(variables[BATCH_STATS])  # plain dicts, as the passes return
  total, counts = _summed_calls(model, variables, x, scalars(stats, lambda a: 0.0))
  total = f64(total)
  scale = jax.tree_util.tree_map(lambda r: float(np.max(np.abs(r), initial=0.0)) or 1.0, total)
  shifted = f64(_summed_calls(model, variables, x, jax.tree_util.tree_map(
      lambda a, s: jnp.asarray(s, a.dtype), stats, scale))[0])

  def moment(path, r, b, s):
    name = jax.tree_util.keystr(path)
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(b))):
      raise ValueError(f"recompute_batch_stats: non-finite batch moments at {name} (NaN/inf "
                       "activations: a diverged model, or non-finite inputs)")
    k = int(counts.get("/".join(str(getattr(p, "key", p)) for p in path[:-1]), 0))
    m = (b - r) / (k * s) if k else np.ones_like(r)
    if not np.all(np.isfinite(m)) or (m.size and np.max(m) - np.min(m) > 1e-3):
      raise ValueError(f"recompute_batch_stats: the running statistics {name} are not "
                       "updated as m·r + (1 - m)·batch (their m differs across channels)")
    keep = 1.0 - float(np.median(m)) if m.size else 1.0
    if keep <= 1e-6:
      raise ValueError(f"recompute_batch_stats: the running statistics {name} never moved "
                       "in a train-mode pass (a layer the pass does not reach in train "
                       "mode, or momentum 1): there is nothing to recompute them from")
    return r / (k * keep)

  return jax.tree_util.tree_map_with_path(moment, total, shifted, scale)


def recompute_batch_stats(model, trainable: PyTree, frozen: dict, x: np.ndarray, *,
                          batch_size: int, seed: int = 0) -> PyTree:
  """The BatchNorm running statistics of a model, recomputed from `x` alone.

  One forward pass over `x` in train mode (BatchNorm normalising each batch with its own
  statistics, as in training), in batches of `batch_size` rows shuffled by `seed` (the last
  batch of its real rows only, no padding); for every BatchNorm layer l

      mean_l = Σ_k n_k · m_lk / Σ_k n_k,      var_l = Σ_k n_k · v_lk / Σ_k n_k,

  m_lk and v_lk the mean and biased variance (over the batch and spatial positions) layer l
  normalised batch k of n_k rows with. This is the cumulative average of SWA's bn_update
  (Izmailov et al. 2018: momentum n_k / (n_seen + n_k)): with batches of one size, the plain
  mean of the per-batch moments; a last partial batch counts n_k / batch_size of a full one.

  Invariant: the result depends on the trainable and frozen weights and on the rows of `x`
  (and `seed`, `batch_size`) only; not on `frozen["batch_stats"]`, whose values are replaced
  (only its structure and dtypes are kept), nor on `BatchNorm.momentum` (0.9, whose EMA in
  training weights the last batches most and keeps 0.9^K of the statistics it started from).
  So a model's statistics hold no trace of data outside `x`. Each batch's moments are read
  off the layer's own running-statistics update (`_batch_moments`, two train-mode passes per
  batch: any BatchNorm updating r <- m·r + (1 - m)·batch, ours or Flax's; for a layer called
  several times in a pass, the mean of its calls' moments); they are averaged in float64.

  Args:
    model: a Flax model whose BatchNorm layers keep running statistics in `batch_stats`.
    trainable: its trainable collection (BN scale/bias shape the later layers' inputs).
    frozen: its other collections, with `batch_stats` (from `models.trainable.split`).
    x: [n, ...] inputs, n ≥ 1 (the data the model may see; no augmentation is applied).
    batch_size: rows per batch (the fine-tuning's, so the moments are those of training).
    seed: seeds the shuffle of the rows into batches.

  Returns:
    A tree like `frozen["batch_stats"]` ({layer path: {"mean": [C], "var": [C]}}, its
    dtypes), numpy arrays.

  Raises:
    ValueError: no `batch_stats` in `frozen`, no rows in `x`, a layer with running
      statistics that no train-mode pass moves, or non-finite moments (a diverged model)
      (named; `_batch_moments`).
  """
  from fastntk_jax.models.layers import BATCH_STATS  # pylint: disable=g-import-not-at-top
  stats = frozen.get(BATCH_STATS)
  if stats is None:
    raise ValueError("recompute_batch_stats: the model has no BatchNorm running statistics "
                     f"(no {BATCH_STATS!r} collection among {sorted(frozen)})")
  x = np.asarray(x)
  if x.shape[0] == 0:
    raise ValueError("recompute_batch_stats: no rows to compute the statistics from")
  variables = {**frozen, "trainable": trainable}
  sums, rows = {}, 0
  for b in batches_lib.iterate_batches((x, np.zeros(x.shape[0], np.int32)), batch_size,
                                       seed=seed, remainder="partial"):
    n_k = b.x.shape[0]
    for path, value in jax.tree_util.tree_flatten_with_path(
        _batch_moments(model, variables, b.x))[0]:
      key = jax.tree_util.keystr(path)
      sums[key] = sums.get(key, 0.0) + n_k * value
    rows += n_k
  return jax.tree_util.tree_map_with_path(
      lambda p, old: (sums[jax.tree_util.keystr(p)] / rows).astype(np.asarray(old).dtype),
      stats)
