"""Full and Retrain: the fine-tuning every method starts from and is measured against.

`finetune.mode="standard"` fine-tunes the network's trainable collection by SGD (the paper's
protocol). `"linearized"` fine-tunes the network linearised at w0 (docs/derivation.md §5) to
its ridge minimiser (squared loss, penalty ½λ‖w − w0‖², λ the update's): in closed form
(`linearized_solver="closed_form"`: from the Gram statistics at w0, one Jacobian pass, which
the Fast-NTK update then reuses; memory p²), from the kernel over the set's n·C outputs
(`"dual"`: memory (n·C)², for collections whose p² does not fit) or by conjugate gradients
(`"cg"`: matrix-free, memory ~ p + n·C, where neither fits).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from fastntk_jax import batch_stats
from fastntk_jax import train as train_lib
from fastntk_jax.experiment import stages
from fastntk_jax.models.layers import LINEARIZATION_POINT
from fastntk_jax.unlearn import linear

PyTree = Any


class FineTuner:
  """Full (on D) and Retrain (on D_r) of one seed from w0.

  Attributes:
    linearized: whether every method is f_lin (docs/derivation.md §5).
    net: what methods are trained and evaluated as: the model, or `unlearn.linear.Linearized`.
    frozen_net: its frozen collections (with w0 under LINEARIZATION_POINT when linearised).
    closed_form: Full and Retrain are the linearised model's ridge minimisers, solved from
      the Gram statistics at w0 (`gram`), which the Fast-NTK update may then reuse.
    dual: the same minimisers solved from the kernel statistics of D at w0 (`kernel`),
      which the Fast-NTK update may then reuse.
  """

  def __init__(self, cfg, model, frozen_pre: dict, w0: PyTree, data, seed: int, *,
               forgetter, fit: Callable, mesh=None):
    """
    Args:
      cfg: the run's config (finetune, unlearn.damping).
      model: the Flax model. frozen_pre: its pre-trained frozen collections.
      w0: the trainable parameters before fine-tuning.
      data: the seed's `UnlearningData`.
      forgetter: the run's `unlearn.Forgetter` (its Gram statistics: `accumulate`).
      fit: `(net, params, frozen, split, spec, *, seed, tag, checkpoint_path) ->
        (params, batch_stats, history)`: `train.fit` with the run's progress and mesh.
    """
    self.cfg, self.model, self.w0, self.data, self.seed = cfg, model, w0, data, seed
    self.forgetter, self._fit, self.mesh = forgetter, fit, mesh
    ft = cfg.finetune
    self.linearized = ft.mode == "linearized"
    self.closed_form = self.linearized and ft.linearized_solver == "closed_form"
    self.dual = self.linearized and ft.linearized_solver == "dual"
    self.net = linear.Linearized(model) if self.linearized else model
    self.frozen_net = ({**frozen_pre, LINEARIZATION_POINT: w0} if self.linearized
                       else frozen_pre)
    self._grams = {}
    self._kernel = None
    self.compile_seconds = 0.0  # spent compiling the Gram statistics' computation

  def gram(self, part: str):
    """((G, b) at w0 of "retain" (D_r) or "forget" (D_f), seconds they took with compilation
    apart); each computed once (`Forgetter.accumulate` in one chunk, compiled once a shape)."""
    if part not in self._grams:
      split = getattr(self.data, part)
      start = time.perf_counter()
      state, compiled = self.forgetter.accumulate(self.w0, split.x, split.y,
                                                  chunk_rows=split.size, mesh=self.mesh)
      self.compile_seconds += compiled
      self._grams[part] = ((state["g"], state["b"]), time.perf_counter() - start - compiled)
    return self._grams[part]

  def shared_grams(self):
    """What the Fast-NTK update reuses in closed form (`methods.Context.grams`)."""
    (retain, seconds_r), (forget, seconds_f) = self.gram("retain"), self.gram("forget")
    return (retain, forget), (seconds_r, seconds_f), self.compile_seconds

  def kernel(self):
    """(the kernel statistics of D at w0, D_r's samples first, and the seconds they took),
    computed once (`Forgetter.kernel_stats`: D's Jacobian rows kept, n·C·p numbers in the
    network's dtype, and Θ over D): Full, Retrain and the Fast-NTK update are then solved
    from the same numbers, so they define one linearised model to the solve's precision
    (separate passes would each carry the network's round-off, which κ(Θ_rr + λI)
    amplifies)."""
    if self._kernel is None:
      data = self.data
      start = time.perf_counter()
      stats = jax.block_until_ready(self.forgetter.kernel_stats(
          self.w0, jnp.concatenate([jnp.asarray(data.retain.x), jnp.asarray(data.forget.x)]),
          jnp.concatenate([jnp.asarray(data.retain.y), jnp.asarray(data.forget.y)])))
      self._kernel = (stats, time.perf_counter() - start)
    return self._kernel

  def shared_kernel(self):
    """What the Fast-NTK update reuses in the dual (`methods.Context.kernel`): (the
    kernel statistics of D with D_r first, #samples of D_r, seconds they took)."""
    stats, seconds = self.kernel()
    return stats, self.data.retain.size, seconds

  def release_shared(self):
    """Frees the statistics shared with the Fast-NTK update (the Grams, p² each, or D's
    Jacobian rows and kernel, n·C·p and (n·C)²) once every method has run; asked again,
    they are recomputed (the same numbers)."""
    self._grams, self._kernel = {}, None

  def fit(self, split, tag: str, checkpoint_path: Optional[str] = None) -> tuple[dict, float]:
    """Fine-tunes on `split` (a `data.Split`: D for tag "full", D_r for "retrain"); returns
    ({"trainable"[, "batch_stats"]}, seconds). In the dual, Full's seconds count D's kernel
    statistics and Retrain's their share for D_r's rows (n_r / n), each plus its solve."""
    cfg, data = self.cfg, self.data
    start = time.perf_counter()
    if self.closed_form:
      parts = [self.gram("retain")] + ([self.gram("forget")] if tag == "full" else [])
      solve_start = time.perf_counter()
      params = linear.ridge_solution(self.w0, [g for g, _ in parts],
                                     jnp.asarray(cfg.unlearn.damping, parts[0][0][0].dtype))
      return {"trainable": params}, sum(t for _, t in parts) + time.perf_counter() - solve_start
    if self.dual:  # from D's kernel statistics: all of them (Full), D_r's rows (Retrain)
      stats, seconds = self.kernel()
      n_r, n = data.retain.size, data.retain.size + data.forget.size
      solve_start = time.perf_counter()
      params = self.forgetter.ridge_from_kernel_stats(
          self.w0, stats, num_samples=None if tag == "full" else n_r)
      params = jax.block_until_ready(params)
      # Retrain's share of the statistics: D_r's rows (their Jacobians dominate the cost).
      share = 1.0 if tag == "full" else n_r / n
      return {"trainable": params}, share * seconds + time.perf_counter() - solve_start
    if self.linearized:  # the minimiser by cg
      parts = [(data.retain.x, data.retain.y)] + (
          [(data.forget.x, data.forget.y)] if tag == "full" else [])
      params, _ = self.forgetter.ridge_solution(self.w0, parts,
                                                solver=cfg.finetune.linearized_solver)
      return {"trainable": params}, time.perf_counter() - start
    spec = train_lib.TrainSpec.from_config(cfg.finetune)
    name = f"seed{self.seed}/{tag}"
    params, stats, _ = self._fit(self.net, self.w0, self.frozen_net, split, spec,
                                 seed=self.seed, tag=name, checkpoint_path=checkpoint_path)
    out = {"trainable": params}
    if stats is not None and not self.linearized:
      out["batch_stats"] = stats
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# The released models' BatchNorm statistics: from the data each method may see.
# ------------------------------------------------------------------------------------------


def seen_data(name: str, data) -> tuple[str, Any]:
  """The data the released model of `name` may see: ("D", D's images) for Full, the model
  trained on D; ("D_r", D_r's images) for Retrain and every unlearning method, whose
  released model must hold nothing of D_f."""
  return ("D", data.train.x) if name == "full" else ("D_r", data.retain.x)


def recomputes_bn(tuner) -> bool:
  """Whether released models get their BN running statistics recomputed
  (`released_frozen`): standard fine-tuning with BN in train mode, where Full's statistics
  are an average over batches of D. In linearised fine-tuning f_lin keeps the pre-trained
  statistics, and with BN frozen every model keeps them: no data of D is in them."""
  return (not tuner.linearized and tuner.cfg.finetune.bn_mode == "train"
          and "batch_stats" in tuner.frozen_net)


def released_frozen(tuner, data, name: str, params, frozen: dict, seed: int) -> dict:
  """The frozen side of method `name`'s released model with `params`: `frozen`, its BN
  running statistics recomputed on the data the method may see (`seen_data`) by one
  train-mode pass in the fine-tuning's batch size (`batch_stats.recompute_batch_stats`), when
  `recomputes_bn`; `frozen` as it is otherwise.

  Invariant: the released statistics of Retrain and of every unlearning method are a
  function of their params and D_r alone, so D_f leaves no trace in them (Full's statistics
  of D, where methods start, stay Full's)."""
  if not recomputes_bn(tuner):
    return frozen
  _, x = seen_data(name, data)
  try:
    stats = batch_stats.recompute_batch_stats(tuner.net, params, frozen, x,
                                            batch_size=int(tuner.cfg.finetune.batch_size),
                                            seed=seed)
  except ValueError as e:  # which model: e.g. a method whose parameters diverged
    raise ValueError(f"{name}'s released model (seed {seed}): {e}") from e
  return {**frozen, "batch_stats": stats}


def release_bn_stats(tuner, data, seed: int, sdir: str, models_of: dict, *,
                     measure: Callable) -> dict:
  """Replaces, in `models_of` ({name: (params, frozen)}), every model's BN running
  statistics by those recomputed on the data its method may see (`released_frozen`), each
  kept as a stage; returns {name: {"data", "rows", "batch_size", "seconds", "before":
  UA/RA/TA with the statistics it had}} ({} when `recomputes_bn` is False).
  `measure(params, frozen) -> {"ua", "ra", "ta", ...}` evaluates a model
  (`evaluate.accuracies`)."""
  if not recomputes_bn(tuner):
    return {}
  cfg, notes = tuner.cfg, {}
  for name, (params, frozen) in list(models_of.items()):
    label, x = seen_data(name, data)
    seconds = {}

    def compute(name=name, params=params, frozen=frozen):
      start = time.perf_counter()
      out = released_frozen(tuner, data, name, params, frozen, seed)["batch_stats"]
      seconds["value"] = time.perf_counter() - start
      return out

    stats = stages.array_stage(os.path.join(sdir, f"{name}_bn_stats"), frozen["batch_stats"],
                               compute)

    def before(params=params, frozen=frozen, label=label, x=x):
      acc = measure(params, frozen)
      return {"data": label, "rows": int(x.shape[0]),
              "batch_size": int(cfg.finetune.batch_size), "seconds": seconds.get("value"),
              "before": {k: acc[k] for k in ("ua", "ra", "ta")}}

    notes[name] = stages.json_stage(os.path.join(sdir, f"{name}_bn.json"), before)
    models_of[name] = (params, {**frozen, "batch_stats": stats})
  return notes
