"""Fair tuning: every method's hyper-parameters chosen by the same rule, budget and data.

Each plug-in declares a grid (`Method.search_space`, the reference's defaults in it). On a
validation seed (`tuning.seed`) that is neither a report seed nor a population seed, every
point of the grid runs from that seed's Full and is scored by the criterion of the field's
comparisons: the Avg. Gap to that seed's Retrain over UA, RA, TA and MIA-Efficacy, with
MIA-Efficacy (SalUn / Unlearn-Sparse) the mean over `tuning.mia_subsamples` member
subsamples for the method and for Retrain alike (on these small models a single subsample
can flip it between 0 and 100). The point with the smallest gap wins (ties: the earlier
point of the grid); a point whose run fails (a diverging ascent, a refused option) scores
infinity and says why. Unless `data.draw_per_seed`, the validation seed has the report's
data (D_r, D_f and the hold-out): it differs in the head's init and the batch order, so the
choice is not independent of the hold-out whose TA and MIA-Efficacy are reported (the
digits default has no images left for a separate validation split); results.md says so. The report seeds then run each method with its winner. A grid
larger than `tuning.max_trials` is refused before any work (`experiment.prepare`).

Each method's search is a resumable stage (`tuning/<name>.json`) holding the grid, every
trial's metrics and seconds, and the winner; results.json repeats them under "tuning".
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import time
import numpy as np

from fastntk_jax import mia
from fastntk_jax import train as train_lib
from fastntk_jax.experiment import methods as methods_lib
from fastntk_jax.experiment import report
from fastntk_jax.experiment import stages

log = logging.getLogger(__name__)

CRITERION = ("Avg. Gap to Retrain over UA, RA, TA and MIA-Efficacy (MIA-Efficacy averaged "
             "over member subsamples), on the validation seed")


def grid(space: dict) -> list[dict]:
  """The points of a search space {field: values}, in the order of `itertools.product`."""
  fields = list(space)
  return [dict(zip(fields, values)) for values in itertools.product(*space.values())]


def with_overrides(cfg, method, overrides: dict):
  """A copy of `cfg` whose block of `method` has `overrides` ({field: value}) set."""
  out = copy.deepcopy(cfg)
  block = methods_lib.block(out, method)
  with block.unlocked():
    for field, value in overrides.items():
      if isinstance(block[field], int) and not isinstance(block[field], bool):
        if not float(value).is_integer():
          raise ValueError(f"config.{method.config_group}.{field} is an int; the search "
                           f"space gives {value!r}")
        value = int(value)
      elif isinstance(block[field], float):
        value = float(value)
      block[field] = value
  return out


def field_metrics(net, params, frozen, data, *, batch_size: int, subsamples: int) -> dict:
  """UA, RA, TA and MIA-Efficacy (the mean over `subsamples` member subsamples, with their
  range) of one model: what the tuning scores."""
  logits = {name: train_lib.predict(net, params, frozen, getattr(data, name).x,
                                    batch_size=batch_size)
            for name in ("retain", "forget", "test_retain")}
  acc = {name: train_lib.accuracy(z, getattr(data, name).y) for name, z in logits.items()}
  out = {"ua": 100.0 - acc["forget"], "ra": acc["retain"], "ta": acc["test_retain"],
         "mia_efficacy": None, "mia_efficacy_range": None}
  if data.test_retain.size:
    spread = mia.mia_efficacy_spread(logits["retain"], data.retain.y, logits["test_retain"],
                                     data.test_retain.y, logits["forget"], data.forget.y,
                                     subsamples=subsamples)
    out["mia_efficacy"] = spread["mean"]
    out["mia_efficacy_range"] = [spread["min"], spread["max"]]
  return out


def _finite(params) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return all(bool(np.all(np.isfinite(np.asarray(leaf))))
             for leaf in jax.tree_util.tree_leaves(params))


def search(cfg, method, space: dict, *, run_trial, measure, retrain: dict) -> dict:
  """The grid search of one method.

  Args:
    cfg: the run's config. method: the plug-in. space: its search space.
    run_trial: `(trial_cfg) -> methods.Result`, the method on the validation seed.
    measure: `(params) -> field_metrics`.
    retrain: Retrain's `field_metrics` on the validation seed.

  Returns:
    {"space", "trials": [{"params", "metrics", "avg_gap", "seconds", "error"}], "chosen",
     "chosen_index", "criterion", "seed"}.
  """
  trials = []
  for index, point in enumerate(grid(space)):
    trial_cfg = with_overrides(cfg, method, point)
    entry = {"params": point, "metrics": None, "avg_gap": math.inf, "seconds": None,
             "error": None}
    start = time.perf_counter()
    try:
      if method.validate is not None:
        method.validate(methods_lib.block(trial_cfg, method))
      result = run_trial(trial_cfg)
      if not _finite(result.params):
        raise FloatingPointError("the parameters are not finite")
      entry["metrics"] = measure(result.params)
      gap = report.avg_gap(entry["metrics"], retrain)
      if gap is None:
        missing = [k for k, _ in report.FIELD_METRICS
                   if entry["metrics"].get(k) is None or retrain.get(k) is None]
        raise ValueError(f"Avg. Gap undefined: no {', '.join(missing)} (e.g. an empty "
                         "hold-out)")
      entry["avg_gap"] = gap
    except Exception as e:  # pylint: disable=broad-except  # a failed point scores infinity
      entry["error"] = f"{type(e).__name__}: {e}"
    entry["seconds"] = time.perf_counter() - start
    log.info("tuning %s: trial %d/%d %s: Avg. Gap %s%s", method.name, index + 1,
             len(grid(space)), point, f"{entry['avg_gap']:.2f}",
             f" ({entry['error']})" if entry["error"] else "")
    trials.append(entry)
  best = min(range(len(trials)), key=lambda i: (trials[i]["avg_gap"], i))
  if not math.isfinite(trials[best]["avg_gap"]):
    errors = sorted({t["error"] for t in trials})
    raise ValueError(f"tuning {method.name}: every point of its search space failed: "
                     + "; ".join(errors[:3]) + (f" (and {len(errors) - 3} other errors)"
                                                if len(errors) > 3 else "")
                     + f"; fix config.{method.config_group} or its search space")
  return {"fields": list(space), "space": {k: list(v) for k, v in space.items()}, "trials": [
      {**t, "avg_gap": t["avg_gap"] if math.isfinite(t["avg_gap"]) else None} for t in trials],
          "chosen": trials[best]["params"], "chosen_index": best, "criterion": CRITERION,
          "seed": int(cfg.tuning.seed)}


def tuned_config(cfg, plugins, chosen: dict):
  """`cfg` with each method's block set to its chosen point ({name: {field: value}})."""
  out = cfg
  for method in plugins:
    if chosen.get(method.name):
      out = with_overrides(out, method, chosen[method.name])
  return out


def stage_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "tuning", f"{name}.json")


def run_stage(workdir: str, method, compute) -> dict:
  """One method's search as a resumable stage (`tuning/<name>.json`)."""
  os.makedirs(os.path.join(workdir, "tuning"), exist_ok=True)
  return stages.json_stage(stage_path(workdir, method.name), compute)
