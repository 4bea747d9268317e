"""What the harness measures of one model: accuracies on every split, the unlearning field's
metrics (UA, RA, TA, MIA-Efficacy; SalUn / Unlearn-Sparse), relearning time, linear probes,
distances to Retrain, and the margins KLoM compares across a population."""

from __future__ import annotations

from typing import Callable

import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import klom
from fastntk_jax import mia
from fastntk_jax import train as train_lib


def evaluate_method(model, trainable, frozen, data, cfg, seed: int, name: str,
                    fit: Callable, train_streams: Callable) -> dict:
  """Accuracies on every split, UA/RA/TA/MIA-Efficacy with its spread over member
  subsamples, the relearn time and the relearning attack of one method's params.
  `fit(model, params, frozen, split, spec, *, seed, tag, stop_below)` trains (the
  relearning): `train.fit` with the run's progress and mesh; `train_streams` trains the
  relearning attack (`relearning_attack`)."""
  metrics, logits = _accuracies(model, trainable, frozen, data, cfg.eval.batch_size)
  metrics["mia_efficacy"] = (mia.mia_efficacy(
      logits["retain"], data.retain.y, logits["test_retain"], data.test_retain.y,
      logits["forget"], data.forget.y, seed=seed) if data.test_retain.size else None)
  spec = train_lib.TrainSpec.from_config(cfg.eval.relearn)
  _, _, history = fit(model, trainable, frozen, data.forget, spec, seed=seed + 7,
                      tag=f"seed{seed}/relearn/{name}", stop_below=cfg.eval.relearn_threshold)
  reached = history[-1] < cfg.eval.relearn_threshold
  metrics["relearn_epochs"] = len(history) if reached else spec.epochs
  metrics["relearn_curve"] = history
  metrics["relearn_protocol"] = (f"{spec.describe()}, until D_f loss < "
                                 f"{cfg.eval.relearn_threshold:g}, cap {spec.epochs}")
  if data.test_retain.size:
    metrics["mia_efficacy_spread"] = mia.mia_efficacy_spread(
        logits["retain"], data.retain.y, logits["test_retain"], data.test_retain.y,
        logits["forget"], data.forget.y, subsamples=int(cfg.eval.mia_subsamples))
  metrics["relearn_attack_curve"] = relearning_attack(model, trainable, frozen, data, cfg,
                                                      seed, train_streams)
  return metrics


def relearning_attack(model, trainable, frozen, data, cfg, seed: int,
                      train_streams: Callable) -> list:
  """D_f accuracy (%) before and after each epoch of fine-tuning on D_r alone
  (`eval.relearn_attack`): the relearning attack of Siddiqui et al. (2025), under which a
  method that suppresses D_f rather than forgets it regains D_f's accuracy faster than
  Retrain does. A linearised model trains tabulated on D_r's and D_f's rows.

  Args:
    train_streams: `(net, params, frozen, streams, spec, *, seed, on_epoch, tag)`, plain
      training on the streams (`objectives.fit_objective` with `objectives.lead_loss`).

  Returns:
    [epochs + 1] accuracies, the first of the model as given; [] without a forget set.
  """
  from fastntk_jax.unlearn import linear  # pylint: disable=g-import-not-at-top
  if not data.forget.size:
    return []
  spec = train_lib.TrainSpec.from_config(cfg.eval.relearn_attack)
  net, net_frozen = model, frozen
  retain_in, forget_in = data.retain.x, data.forget.x
  table = linear.tabulate(model, frozen, [data.retain.x, data.forget.x])
  if table is not None:
    net, net_frozen, (rows_r, rows_f) = table
    retain_in, forget_in = np.asarray(rows_r), np.asarray(rows_f)
  accuracy = lambda params: train_lib.accuracy(
      train_lib.predict(net, params, net_frozen, forget_in, batch_size=cfg.eval.batch_size),
      data.forget.y)
  curve = [accuracy(trainable)]
  if spec.epochs:
    train_streams(net, trainable, net_frozen, {"retain": (retain_in, data.retain.y)}, spec,
                  seed=seed + 11, on_epoch=lambda epoch, params: curve.append(accuracy(params)),
                  tag=f"seed{seed}/relearn_attack")
  return curve


def _accuracies(model, trainable, frozen, data, batch_size: int) -> tuple[dict, dict]:
  predict = lambda split: train_lib.predict(model, trainable, frozen, split.x,
                                            batch_size=batch_size)
  logits = {name: predict(getattr(data, name))
            for name in ("retain", "forget", "test_retain", "test_forget")}
  metrics = {f"acc_{name}": train_lib.accuracy(z, getattr(data, name).y)
             for name, z in logits.items()}
  # The unlearning field's metrics (SalUn / Unlearn-Sparse): UA, RA, TA (test without the
  # forgotten classes).
  metrics.update(ua=100.0 - metrics["acc_forget"], ra=metrics["acc_retain"],
                 ta=metrics["acc_test_retain"])
  return metrics, logits


def accuracies(model, trainable, frozen, data, *, batch_size: int) -> dict:
  """Accuracy on every split (`acc_<split>`) and UA, RA, TA of one model's params."""
  return _accuracies(model, trainable, frozen, data, batch_size)[0]


def linear_probe(model, start, frozen, data, cfg, seed: int, tag: str, fit: Callable) -> dict:
  """Probe: freeze everything but a fresh head, train it on D, report D_r / D_f accuracy.

  High probe accuracy on D_f means the features still separate the forgotten data.

  Args:
    start: the backbone's trainable collection with a fresh head (`finetune.fresh_head`).
    fit: as for `evaluate_method`.
  """
  spec = train_lib.TrainSpec.from_config(cfg.eval.probe, head_only=True)
  probed, _, _ = fit(model, start, frozen, data.train, spec, seed=seed + 3,
                     tag=f"seed{seed}/probe/{tag}")
  acc = lambda split: train_lib.accuracy(
      train_lib.predict(model, probed, frozen, split.x, batch_size=cfg.eval.batch_size), split.y)
  return {"probe_acc_retain": acc(data.retain), "probe_acc_forget": acc(data.forget)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def distances_to_retrain(model, methods: dict, data, cfg, w0) -> dict:
  """Per method: ||w - w_retrain||₂ over the trainable collection (also relative to
  ||w_retrain - w0||, the size of what fine-tuning on D_r learned), and the mean
  KL(Retrain ‖ method) of the predicted class distributions on D_f and on the hold-out.

  Also the membership-inference attack of `fastntk_jax.mia` (logistic regression on
  per-example cross-entropy, D_f = members vs hold-out of the same classes = non-members,
  5-fold CV): attack accuracy and AUC, to be read against Retrain's (the reference).

  Returns:
    {method: {"l2_to_retrain", "relative_l2_to_retrain", "kl_to_retrain_forget",
              "kl_to_retrain_test", "mia_accuracy", "mia_auc"}}.
  """
  # The loss attack's non-members: in class forgetting, the forgotten classes' hold-out (the
  # same classes as D_f, never trained on), else the whole hold-out; another class's hold-out
  # would let the attack tell classes apart, not members (95% for Retrain too).
  holdout = (data.test_forget if data.forget_mode == "class" and data.test_forget.size >= 2
             else data.test)  # the attack's cross-validation needs 2 of each
  def logp(params, frozen, x):
    if len(x) == 0:
      return None
    return _log_softmax(train_lib.predict(model, params, frozen, x,
                                          batch_size=cfg.eval.batch_size).astype(np.float64))
  ref_params, ref_frozen = methods["retrain"]
  ref_flat = np.asarray(ravel_pytree(ref_params)[0], np.float64)
  learned = np.linalg.norm(ref_flat - np.asarray(ravel_pytree(w0)[0], np.float64))
  ref = {"forget": logp(ref_params, ref_frozen, data.forget.x),
         "test": logp(ref_params, ref_frozen, holdout.x)}
  out = {}
  for name, (params, frozen) in methods.items():
    l2 = float(np.linalg.norm(np.asarray(ravel_pytree(params)[0], np.float64) - ref_flat))
    entry = {"l2_to_retrain": l2, "relative_l2_to_retrain": l2 / max(learned, 1e-300)}
    mine = {}
    for split, x in (("forget", data.forget.x), ("test", holdout.x)):
      mine[split] = logp(params, frozen, x)
      entry[f"kl_to_retrain_{split}"] = (None if mine[split] is None else float(np.mean(
          np.sum(np.exp(ref[split]) * (ref[split] - mine[split]), axis=-1))))
    # The attack's cross-validation needs 2 samples on each side (a tiny D_f may have 1).
    entry["mia_accuracy"] = entry["mia_auc"] = None
    if mine["forget"] is not None and mine["test"] is not None and min(
        data.forget.size, holdout.size) >= 2:
      attack = mia.mia_from_logits(mine["forget"], data.forget.y, mine["test"], holdout.y,
                                   num_folds=min(5, data.forget.size, holdout.size), seed=0)
      entry["mia_accuracy"] = 100.0 * attack.accuracy
      entry["mia_auc"] = attack.auc
    out[name] = entry
  return out


def forget_margins(model, params, frozen, data, batch_size: int) -> list:
  """KLoM's margins (`klom.margins`) of every forget example under one model."""
  logits = train_lib.predict(model, params, frozen, data.forget.x, batch_size=batch_size)
  return klom.margins(logits, data.forget.y).tolist()
