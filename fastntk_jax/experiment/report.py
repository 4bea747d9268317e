"""results.json, results.md (tables shaped like the paper's) and PNG plots."""

from __future__ import annotations

import os
import platform


from typing import Optional

import numpy as np

from fastntk_jax import workdir as wd
from fastntk_jax.experiment import methods as methods_lib
from fastntk_jax.experiment import plots

METRICS = [("acc_retain", "D_r acc"), ("acc_forget", "D_f acc"),
           ("acc_test_retain", "Test acc (retain cls)"), ("acc_test_forget", "Test acc (forget cls)"),
           ("relearn_epochs", "Relearn (epochs)")]
# Distance to the Retrain model (the golden baseline): lower is better, 0 for Retrain.
DISTANCES = [("l2_to_retrain", "‖w − w_retrain‖₂"),
             ("relative_l2_to_retrain", "‖w − w_retrain‖ / ‖w_retrain − w0‖"), ("kl_to_retrain_forget", "KL on D_f"),
             ("kl_to_retrain_test", "KL on hold-out"), ("mia_accuracy", "MIA acc (%)"),
             ("mia_auc", "MIA AUC")]
PROBE_LABELS = {"pretrained": "Pre-Trained", "random_init": "Random-Init", "fastntk": "Fast-NTK"}
# Fields that legitimately differ between identical runs (wall clock, memory, environment).
TIMING_FIELDS = ("seconds",)
# The unlearning field's metrics (SalUn / Unlearn-Sparse): UA = 100 - acc(D_f), RA = acc(D_r),
# TA = acc(test of the retained classes), MIA-Efficacy; Avg. Gap = mean |metric - Retrain's|
# over those four; RTE = the run time of the unlearning step (compilation excluded).
FIELD_METRICS = [("ua", "UA"), ("ra", "RA"), ("ta", "TA"), ("mia_efficacy", "MIA-Efficacy")]
GAP = ("avg_gap", "Avg. Gap")


def _label(name: str) -> str:
  """A method's label in tables and plots (its plug-in's), or its name."""
  try:
    return methods_lib.label(name)
  except ValueError:
    return name


def avg_gap(entry: dict, retrain: dict) -> Optional[float]:
  """Mean |metric - Retrain's| over FIELD_METRICS (None when one is missing)."""
  gaps = [abs(entry[k] - retrain[k]) for k, _ in FIELD_METRICS
          if entry.get(k) is not None and retrain.get(k) is not None]
  return float(np.mean(gaps)) if len(gaps) == len(FIELD_METRICS) else None


def rte_split(run: dict) -> tuple[Optional[float], Optional[float]]:
  """(one-time precompute, per-request) seconds of one method's run: Fast-NTK's Gram
  statistics of D or its served state of D apart from the request; the other methods have no
  precompute (0) and their whole time is the request's. None where the run restored the
  stage from disk and did not time it."""
  d = run.get("diagnostics") or {}
  if d.get("per_request_seconds") is not None:
    return d.get("precompute_seconds"), d["per_request_seconds"]
  if d.get("request_seconds") is not None:  # served (unlearn.serve): the cold state of D
    return d.get("cold_seconds"), d["request_seconds"]
  seconds = run.get("seconds")
  return (None if seconds is None else 0.0), seconds


def _stats(values) -> dict:
  vals = [v for v in values if v is not None]
  if not vals:
    return {"mean": None, "std": None, "per_seed": list(values)}
  return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": list(values)}


def versions() -> dict:
  """Versions of the packages a run used. neural-tangents counts only when it imports (its
  kernel is then the dual solver's); an installed copy that fails to import on this JAX is
  listed apart, as `neural-tangents (not importable)`."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ntk  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "neural-tangents", "tensorflow-datasets",
              "orbax-checkpoint", "numpy"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  if out["neural-tangents"] is not None and not ntk.neural_tangents_available():
    out["neural-tangents (not importable)"] = out["neural-tangents"]
    out["neural-tangents"] = None
  return out


def machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [str(d.device_kind) for d in jax.devices()]}


def build_results(cfg, data, model, pretrained, per_seed: dict) -> dict:
  """Aggregates per-seed metrics into mean ± std per method (the results.json content)."""
  from fastntk_jax.models import trainable as tr  # pylint: disable=g-import-not-at-top
  seeds = list(per_seed)
  trainable, _ = tr.split(pretrained)
  n_trainable = tr.count_params(trainable)
  n_total = tr.count_params({k: v for k, v in pretrained.items() if k != "batch_stats"})
  methods, timing = {}, {"methods": {}, "fastntk_diagnostics": {}}
  for name in per_seed[seeds[0]]["methods"]:
    runs = [per_seed[s]["methods"][name] for s in seeds]
    entry = {key: _stats([r.get(key) for r in runs])
             for key, _ in METRICS + DISTANCES + FIELD_METRICS}
    entry["avg_gap"] = _stats([avg_gap(per_seed[s]["methods"][name],
                                       per_seed[s]["methods"]["retrain"]) for s in seeds])
    entry["per_seed"] = {str(s): {k: per_seed[s]["methods"][name].get(k)
                                  for k, _ in METRICS + FIELD_METRICS}
                         for s in seeds}  # run times per seed are under "timing"
    entry["label"] = _label(name)
    entry["relearn_protocol"] = runs[0]["relearn_protocol"]
    entry["relearn_curves"] = [r["relearn_curve"] for r in runs]
    entry["relearn_attack_curves"] = [r.get("relearn_attack_curve") or [] for r in runs]
    spreads = [r["mia_efficacy_spread"] for r in runs if r.get("mia_efficacy_spread")]
    if spreads:
      entry["mia_efficacy_spread"] = {
          "min": min(sp["min"] for sp in spreads), "max": max(sp["max"] for sp in spreads),
          "subsamples": len(spreads[0]["values"]),
          "svc_lift": float(np.mean([sp["svc_lift"] for sp in spreads])),
          "at_chance_seeds": [s for s, r in zip(seeds, runs)
                              if (r.get("mia_efficacy_spread") or {}).get("at_chance")]}
    notes = [r.get("bn_recompute") for r in runs]
    if all(notes):  # BN statistics recomputed on the data the method may see (run.py)
      entry["bn_recompute"] = {
          **{k: notes[0][k] for k in ("data", "rows", "batch_size")},
          **{when: {k: _stats([n[when][k] for n in notes]) for k in ("ua", "ra", "ta")}
             for when in ("before", "after")}}
    methods[name] = entry
    timing["methods"][name] = {"seconds": _stats([r.get("seconds") for r in runs])}
    split = [rte_split(r) for r in runs]
    timing["methods"][name]["precompute_seconds"] = _stats([p for p, _ in split])
    timing["methods"][name]["request_seconds"] = _stats([q for _, q in split])
    entry["field_gaps"] = {k: _stats([
        None if per_seed[s]["methods"][name].get(k) is None
        or per_seed[s]["methods"]["retrain"].get(k) is None
        else abs(per_seed[s]["methods"][name][k] - per_seed[s]["methods"]["retrain"][k])
        for s in seeds]) for k, _ in FIELD_METRICS}
    if name == "fastntk":
      diags = [r.get("diagnostics", {}) for r in runs]
      entry["solver"] = diags[0].get("solver")
      entry["kernel"] = diags[0].get("kernel")  # the dual's kernel that ran (None otherwise)
      entry["condition_number"] = _stats([d.get("condition_number") for d in diags])
      entry["update_norm"] = _stats([d.get("update_norm") for d in diags])
      timing["fastntk_diagnostics"] = {str(s): d for s, d in zip(seeds, diags)}
  probes = {}
  for kind in per_seed[seeds[0]]["probes"]:
    runs = [per_seed[s]["probes"][kind] for s in seeds]
    probes[kind] = {k: _stats([r[k] for r in runs]) for k in ("probe_acc_retain", "probe_acc_forget")}
  return {
      "config": wd.config_dict(cfg),
      "data": {"counts": data.counts(), "num_classes": data.num_classes,
               "forget_classes": list(data.forget_classes), "forget_mode": data.forget_mode},
      "model": {"name": cfg.model.name, "trainable_params": n_trainable,
                "total_params": n_total, "trainable_percent": 100.0 * n_trainable / n_total},
      "seeds": seeds,
      "methods": methods,
      "linear_probe": probes,
      "protocol": {"finetune": dict(cfg.finetune), "unlearn": dict(cfg.unlearn)},
      "versions": versions(),
      # Everything below differs between otherwise identical runs.
      "timing": timing,
      "machine": machine(),
  }


def _fmt(stat: dict, digits: int = 1) -> str:
  if stat is None or stat.get("mean") is None:
    return "–"
  if 0 < abs(stat["mean"]) < 10 ** -digits:  # would print as 0: keep the magnitude
    return f"{stat['mean']:.2e} ± {stat['std']:.1e}"
  return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(results: dict) -> str:
  """The paper-shaped tables: methods × metrics, then the linear-probing risk analysis."""
  m = results["model"]
  lines = [
      f"# Fast-NTK unlearning: {m['name']} on {results['config']['data']['name']}",
      "",
      f"Seeds {results['seeds']} (mean ± std). Trainable {m['trainable_params']:,} of "
      f"{m['total_params']:,} parameters ({m['trainable_percent']:.2f}%). "
      f"Data: {results['data']['counts']}; " + _forget_set_text(results) + ".",
      "",
      *pretrain_lines(results),
      "| Method | " + " | ".join(label for _, label in METRICS) + " | Time (s) |",
      "|---|" + "---|" * (len(METRICS) + 1),
  ]
  for name, entry in results["methods"].items():
    secs = results["timing"]["methods"][name]["seconds"]
    row = [_label(name)] + [_fmt(entry[k]) for k, _ in METRICS] + [_fmt(secs, 2)]
    lines.append("| " + " | ".join(row) + " |")
  first = next(iter(results["methods"].values()))
  lines += ["", f"Relearn protocol: {first['relearn_protocol']}; a model that never gets there "
            "counts as the cap, so a relearn time equal to the cap is a lower bound. Time: "
            "fine-tuning for Full/Retrain, the unlearning step for the others (the training "
            "step compiles once per run, in the first seed).", ""]
  lines += bn_recompute_lines(results)
  if "fastntk" in results["methods"]:
    f = results["methods"]["fastntk"]
    comp = [d.get("compile_seconds") for d in results["timing"]["fastntk_diagnostics"].values()]
    comp = [c for c in comp if c is not None]
    kernel = f" (kernel: {f['kernel']})" if f.get("kernel") else ""
    # A served request reports the stream's estimate, gram_scale / (min L_kk)^2 of its
    # factor: a lower bound on κ, not κ itself (unlearn.stream.ForgetState).
    bound = any(d.get("condition_is_lower_bound")
                for d in results["timing"]["fastntk_diagnostics"].values())
    lines += [f"Fast-NTK solver: {f.get('solver')}{kernel}; condition number "
              + ("≥ " if bound else "") + f"{_fmt(f.get('condition_number'), 0)}"
              + (" (a lower bound, estimated from the Cholesky factor's pivots)" if bound
                 else "") + "; damping "
              f"{results['protocol']['unlearn']['damping']}; its time excludes XLA compilation"
              + (f" ({np.mean(comp):.1f} s per seed)" if comp else "") + ".", ""]
    diags = results["timing"]["fastntk_diagnostics"].values()
    # The solve's precision verdict (the precision rule's warning), as the log gave it.
    for seed, d in results["timing"]["fastntk_diagnostics"].items():
      if d.get("precision_warning"):
        lines += [f"**Precision (seed {seed})**: {d['precision_warning']}", ""]
    cold = [d["cold_seconds"] for d in diags if d.get("cold_seconds") is not None]
    cold_compile = [d["cold_compile_seconds"] for d in diags
                    if d.get("cold_compile_seconds") is not None]
    if any("request_seconds" in d for d in diags):
      request = [d["request_seconds"] for d in diags if d.get("request_seconds") is not None]
      cached = [d.get("jacobian_cache") for d in diags]
      lines += ["Served as a request on the state of D (unlearn.serve): building the state "
                + (f"{np.mean(cold):.2f} s per seed (cold, its compilation included"
                   + (f": {np.mean(cold_compile):.2f} s" if cold_compile else "") + ")"
                   if cold else "read back from the workdir")
                + f"; the request {np.mean(request):.3f} s per seed (its latency, the time "
                "above)"
                + ("; Jacobian rows cached" if all(cached) else
                   "; Jacobian rows recomputed per request (unlearn.jacobian_cache_gib)"
                   if not any(cached) else "") + ".", ""]
  diags_by_seed = results["timing"]["fastntk_diagnostics"]
  certs = [d["certificate"] for d in diags_by_seed.values() if d.get("certificate")]
  if certs:
    rel = [c["retrain_relative_bound"] for c in certs]
    lines += ["Certificate of each deletion (`unlearn.certify`): ‖w − w_r‖ ≤ ‖d‖ + "
              "‖∇L_r(w) − H d‖/λ for its witness d (≤ ‖∇L_r(w)‖/λ), "
              + ("w_r the retrain of the linearised model in use" if all(
                  c["linearized"] for c in certs) else
                 "w_r the retrain of the linearised model at w0: standard fine-tuning, so a "
                 "distance measure that certifies nothing about the network")
              + f"; ‖w − w_r‖/‖w_r − w0‖ ≤ {max(rel):.2g} (worst seed), relative to the "
              "pre-trained backbone w0, which may itself have seen the forgotten data. Each "
              "deletion is in the signed, hash-chained log audit/log.jsonl; re-verify it with "
              "`python -m fastntk_jax.audit --workdir=<this workdir>`.", ""]
    refs = [d["reference"] for d in diags_by_seed.values() if d.get("reference")]
    if refs:
      lines += ["Against an independent float64 retrain of the same linearised model (numpy "
                "LU, refined): Fast-NTK within "
                f"{max(r['fastntk_relative'] for r in refs):.2g}, Retrain within "
                f"{max(r['retrain_relative'] for r in refs):.2g} of ‖w_r − w0‖ (worst seed); "
                "each bound is at most "
                f"{max(r['bound_over_distance'] for r in refs):.4g}× Fast-NTK's true distance "
                "(bases: " + ", ".join(sorted({c.get('basis', 'matrix_free') for c in certs}))
                + ").", ""]
    threshold = results["protocol"]["unlearn"].get("certify_threshold")
    certified = [d.get("certified") for d in diags_by_seed.values() if "certified" in d]
    if certified:
      lines += [f"Certified (bound ≤ {threshold:g} of ‖w_r − w0‖): "
                f"{sum(certified)} of {len(certified)} seed(s).", ""]
  costs = {s: d["release_cost"] for s, d in diags_by_seed.items() if d.get("release_cost")}
  if costs:
    epsilons = list(next(iter(costs.values()))["by_epsilon"])
    delta = next(iter(costs.values()))["delta"]
    mean = lambda get: np.mean([get(c) for c in costs.values()])
    lines += [f"### (ε, δ = {delta:g})-certified release of Fast-NTK (Gaussian noise "
              "calibrated to each seed's bound; mean over seeds)", "",
              "| release | σ | UA | RA | TA |", "|---|---|---|---|---|",
              f"| no noise | 0 | {mean(lambda c: c['none']['ua']):.1f} | "
              f"{mean(lambda c: c['none']['ra']):.1f} | {mean(lambda c: c['none']['ta']):.1f} |"]
    for eps in epsilons:
      get = lambda key, eps=eps: mean(lambda c: c["by_epsilon"][eps][key])
      lines.append(f"| ε = {eps} | {get('sigma'):.2g} | {get('ua'):.1f} | {get('ra'):.1f} | "
                   f"{get('ta'):.1f} |")
    released = [d["release"] for d in diags_by_seed.values() if d.get("release")]
    lines += ["", ("The released Fast-NTK model (every table above) is the noised one at "
                   f"ε = {released[0]['epsilon']:g}, δ = {released[0]['delta']:g} "
                   "(unlearn.certified)." if released else
                   "The model evaluated above is the un-noised update; "
                   "--config.unlearn.certified=True releases the noised one."), ""]
  lines += comparison_lines(results)
  lines += tuning_lines(results)
  lines += audit_lines(results)
  lines += mia_spread_lines(results)
  lines += relearn_attack_lines(results)
  lines += ["## Privacy and distance to Retrain", "",
            "| Method | " + " | ".join(label for _, label in DISTANCES) + " |",
            "|---|" + "---|" * len(DISTANCES)]
  for name, entry in results["methods"].items():
    lines.append("| " + " | ".join([_label(name)]
                                   + [_fmt(entry.get(k), 3) for k, _ in DISTANCES]) + " |")
  lines += ["", "KL(Retrain ‖ method) of the predicted class distributions, mean over samples. "
            "MIA: logistic regression on per-example cross-entropy, D_f (members) vs the "
            "hold-out (non-members), balanced, 5-fold CV; the target is Retrain's value, not "
            "50%.", ""]
  if results["data"]["forget_mode"] in ("samples", "subpopulation"):
    lines += ["### Gap to Retrain (method − Retrain, mean over seeds)", "",
              "| Method | " + " | ".join(label for _, label in METRICS[:4] + DISTANCES[3:]) + " |",
              "|---|" + "---|" * (4 + len(DISTANCES[3:]))]
    ref = results["methods"]["retrain"]
    for name, entry in results["methods"].items():
      cells = []
      for key, _ in METRICS[:4] + DISTANCES[3:]:
        a, b = (entry.get(key) or {}).get("mean"), (ref.get(key) or {}).get("mean")
        cells.append("–" if a is None or b is None else f"{a - b:+.2f}")
      lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Linear probing (fresh head on D, backbone frozen)", "",
            "| Backbone | D_r acc | D_f acc |", "|---|---|---|"]
  for kind, entry in results["linear_probe"].items():
    lines.append(f"| {PROBE_LABELS.get(kind, kind)} | {_fmt(entry['probe_acc_retain'])} | "
                 f"{_fmt(entry['probe_acc_forget'])} |")
  mach = results["machine"]
  lines += ["", f"Machine: {mach['cpu']} ({mach['cores']} cores), backend {mach['backend']}; "
            f"jax {results['versions'].get('jax')}, neural-tangents "
            f"{results['versions'].get('neural-tangents') or 'not installed (the kernel by JAX)'}"
            ".", ""]
  return "\n".join(lines)


def bn_recompute_lines(results: dict) -> list[str]:
  """results.md's note on the BN running statistics recomputed for every released model
  (empty when they were not: linearised fine-tuning, BN frozen, no BN)."""
  done = {name: e["bn_recompute"] for name, e in results["methods"].items()
          if e.get("bn_recompute")}
  if not done:
    return []
  first = next(iter(done.values()))
  lines = ["BatchNorm running statistics of every released model (the tables) recomputed on "
           "the data its method may see (D for Full, D_r for the others), one train-mode pass "
           f"in batches of {first['batch_size']}: the row-weighted mean of the per-batch "
           "moments (`batch_stats.recompute_batch_stats`). Before it, Full and Retrain had their "
           "training's running averages and every other method kept Full's, of D = D_r ∪ "
           "D_f. UA / RA / TA before → after (mean over seeds):", "",
           "| Method | statistics from | UA | RA | TA |", "|---|---|---|---|---|"]
  for name, n in done.items():
    cells = [f"{n['before'][k]['mean']:.1f} → {n['after'][k]['mean']:.1f}"
             if n["before"][k]["mean"] is not None and n["after"][k]["mean"] is not None
             else "–" for k in ("ua", "ra", "ta")]
    lines.append(f"| {_label(name)} | {n['data']} ({n['rows']} rows) | " + " | ".join(cells)
                 + " |")
  return lines + [""]


def _forget_set_text(results: dict) -> str:
  """What D_f is: the forget classes, a random sample, or a subpopulation of one class."""
  data = results["data"]
  if data["forget_mode"] == "class":
    return f"forget classes {data['forget_classes']}"
  if data["forget_mode"] == "subpopulation":
    draws = [d.get("subpopulation") for d in (data.get("per_seed") or {}).values()]
    sub = next((d for d in draws if d), None)
    if sub:
      return (f"forget set: a subpopulation of class {sub.get('label')} ({sub.get('size')} "
              f"images: the nearest neighbours of pool image {sub.get('anchor')} in the "
              f"pre-trained network's {sub.get('features')} space)")
    return "forget set: a subpopulation of one class"
  return "forget set: a random sample of D across classes"


def _klom_p95(results: dict, name: str) -> Optional[float]:
  """KLoM's headline (EasyDUB's): the 95th percentile over D_f."""
  k = results.get("klom") or {}
  st = (k.get("per_method") or {}).get(name)
  return None if st is None else st["p95"]


def audit_lines(results: dict) -> list[str]:
  """The population audits: KLoM (P95 and mean), the ε-score and U-LiRA per method, each
  against Retrain of other seeds, Retrain's own row the noise floor."""
  k, a = results.get("klom"), results.get("population_audits")
  if not k or not a:
    return []
  n = k["num_seeds"]
  per = a["per_method"]
  any_eps = next(iter(per.values()))["epsilon"]
  any_u = next(iter(per.values()))["ulira"]
  lines = [f"## The audits over {n} + {n} seeds (population level)", "",
           "| Method (seeds A) vs Retrain (seeds B) | KLoM P95 | KLoM mean | ε-score | F | "
           "median ε | U-LiRA AUC | TPR @ 1% FPR | TPR @ 0.1% FPR |",
           "|---|---|---|---|---|---|---|---|---|"]
  order = [n for n in results["methods"] if n in k["per_method"]]
  for name in order + [n for n in k["per_method"] if n not in order]:
    st, e, u = k["per_method"][name], per[name]["epsilon"], per[name]["ulira"]
    label = _label(name) + (" (noise floor)" if name == k["floor"] else "")
    cells = [f"{st['p95']:.3f}", f"{st['mean']:.3f}", f"{e['score']:.3f}",
             f"{e['forgetting_quality']:.3f}", f"{e['epsilon_median']:.2f}",
             f"{u['auc']:.3f}", f"{u['tpr_at_1pct_fpr']:.3f}", f"{u['tpr_at_0_1pct_fpr']:.3f}"]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  seconds = results["timing"].get("population_seconds") or 0.0
  per_model = seconds / max(1, sum(1 for _ in k["per_method"]) * n + n)
  lines += ["",
            "Each row compares the method's models over seeds A with Retrain's over seeds B; "
            "Retrain over A is the noise floor of every column (a method there is "
            "indistinguishable from Retrain at this N). KLoM (EasyDUB): per forget example, "
            "KL of the margin histograms (20 bins over the pooled range, margins clipped to "
            "±100, Retrain's bin floored at 1e-5 where the method's is non-empty); P95 over "
            "D_f is the headline. ε-score (NeurIPS 2023 unlearning challenge): per example, "
            "ε from the best threshold attacks on the logit-scaled confidence at "
            f"δ = {any_eps['delta']:g}, bucketed into F (1 = indistinguishable), times the RA "
            f"and TA ratios to Retrain; with N = {any_eps['num_models']} models a side, no "
            f"finite ε can exceed {any_eps['epsilon_ceiling']:.2f} and an example the attacks "
            "separate completely scores 0. Two samples of one distribution do not give ε = 0: "
            "read the ε-score against Retrain's row. U-LiRA (Hayes et al. 2024): per example, "
            "Gaussians fitted to the shadow models' margins of the method and of Retrain, the "
            "likelihood ratio scored on held-out target models "
            f"({any_u['num_targets']} a side, {any_u['num_negatives']} negatives: FPR "
            f"resolution {any_u['fpr_resolution']:.2g}"
            + ("" if any_u["resolves_0_1pct_fpr"] else
               "; TPR at " + ("1% and " if not any_u["resolves_1pct_fpr"] else "")
               + "0.1% FPR is the TPR at FPR 0 here") + "); AUC 0.5 is chance. KLoM "
            "cannot exceed log(1e5) = 11.51 (disjoint histograms); at small N even Retrain "
            "against itself sits near it.",
            f"Compute: {n} + {n} seeds, {a['engine']} "
            + ENGINE_TEXT.get(a["engine"], "(seed by seed)")
            + f", {seconds:.0f} s in all, {per_model:.3f} s per model.", ""]
  return lines


# How each population engine (`experiment.population`) built its models, for results.md.
ENGINE_TEXT = {
    "batched": "(one compiled program per chunk of seeds for Full, Retrain and Fast-NTK; the "
               "other methods per seed on tables from the same features)",
    "batched_sgd": "(Full and Retrain of each chunk of seeds in one vmapped SGD fit each; "
                   "Fast-NTK and the other methods per seed from each seed's Full)",
}


def mia_spread_lines(results: dict) -> list[str]:
  """MIA-Efficacy with its range over member subsamples, and where its SVC is at chance."""
  rows = [(n, e) for n, e in results["methods"].items() if e.get("mia_efficacy_spread")]
  if not rows:
    return []
  sub = rows[0][1]["mia_efficacy_spread"]["subsamples"]
  lines = [f"### MIA-Efficacy across {sub} member subsamples", "",
           "| Method | MIA-Efficacy (subsample 0) | range over subsamples and seeds | "
           "SVC accuracy on its own training data, above the majority share |",
           "|---|---|---|---|"]
  chance = []
  for name, e in rows:
    sp = e["mia_efficacy_spread"]
    lines.append(f"| {_label(name)} | {_fmt(e.get('mia_efficacy'))} | "
                 f"{sp['min']:.1f}–{sp['max']:.1f} | {sp['svc_lift']:+.1f} points |")
    if sp["at_chance_seeds"]:
      chance.append(f"{_label(name)} (seeds {', '.join(map(str, sp['at_chance_seeds']))})")
  lines += ["", "The headline is SalUn's definition (one member subsample); the range is "
            "what other subsamples of the same models give."
            + (" **The SVC is at chance on its own training data** (less than 5 points "
               "above the majority share) for " + "; ".join(chance) + ": there MIA-Efficacy is decided by the "
               "subsample, not by the model." if chance else ""), ""]
  return lines


def relearn_attack_lines(results: dict) -> list[str]:
  """The relearning attack: D_f accuracy per epoch of fine-tuning on D_r alone."""
  methods = results["methods"]
  curves = {n: e.get("relearn_attack_curves") or [] for n, e in methods.items()}
  if not any(c and c[0] for c in curves.values()):
    return []
  mean_curve = lambda n: np.mean(np.asarray(curves[n], np.float64), axis=0)
  length = len(mean_curve(next(n for n in curves if curves[n] and curves[n][0])))
  if length < 2:  # eval.relearn_attack.epochs = 0: nothing was attacked
    return []
  shown = sorted({0, 1, 2, 5, length - 1} & set(range(length)))
  ref = mean_curve("retrain") if curves.get("retrain") and curves["retrain"][0] else None
  lines = ["## The relearning attack (fine-tuning on D_r alone; Siddiqui et al. 2025)", "",
           "| Method | " + " | ".join(f"D_f acc @ {e}" for e in shown)
           + " | largest gap to Retrain's curve |", "|---|" + "---|" * (len(shown) + 1)]
  for name in methods:
    if not (curves[name] and curves[name][0]):
      continue
    c = mean_curve(name)
    gap = "–" if ref is None else f"{float(np.max(np.abs(c - ref))):.1f}"
    lines.append(f"| {_label(name)} | " + " | ".join(f"{c[e]:.1f}" for e in shown)
                 + f" | {gap} |")
  spec = results["config"]["eval"]["relearn_attack"]
  lines += ["", f"Epoch 0 is the model as released; then {length - 1} epochs of SGD (lr "
            f"{spec['learning_rate']:g}, batch {spec['batch_size']}, {spec['loss']}) on D_r "
            "only, mean over seeds (relearn_attack.png). A method that hides D_f rather than "
            "forgets it regains D_f accuracy faster than Retrain does.", ""]
  return lines


def comparison_lines(results: dict) -> list[str]:
  """The comparison of every method with the field's metrics (UA, RA, TA, MIA-Efficacy,
  Avg. Gap), the run time split into one-time precompute and per request, KLoM and the
  distance to Retrain; then Fast-NTK against the best-tuned competitor, naming every metric
  on which a competitor is closer to Retrain than Fast-NTK."""
  timing = results["timing"]["methods"]
  lines = ["## The comparison (the unlearning field's metrics; SalUn / Unlearn-Sparse)", "",
           "| Method | " + " | ".join(label for _, label in FIELD_METRICS + [GAP])
           + " | RTE per request (s) | precompute (s) | KLoM (P95) | ‖w − w_r‖/‖w_r − w0‖ |",
           "|---|" + "---|" * (len(FIELD_METRICS) + 5)]
  for name, entry in results["methods"].items():
    t = timing[name]
    klom_p95 = _klom_p95(results, name)
    lines.append("| " + " | ".join(
        [_label(name)] + [_fmt(entry.get(k)) for k, _ in FIELD_METRICS + [GAP]]
        + [_fmt(t.get("request_seconds", t["seconds"]), 2),
           _fmt(t.get("precompute_seconds"), 2),
           "–" if klom_p95 is None else f"{klom_p95:.3f}",
           _fmt(entry.get("relative_l2_to_retrain"), 3)]) + " |")
  lines += ["", "UA = 100 − D_f acc; RA = D_r acc; TA = test acc of the retained classes; "
            "MIA-Efficacy = share of D_f an SVC on the true-class confidence (retain = "
            "member, test = non-member) calls non-member; Avg. Gap = mean |metric − "
            "Retrain's| over those four (per seed, then mean ± std). RTE: the unlearning "
            "step (fine-tuning for Full/Retrain), split into what is computed once for D "
            "(Fast-NTK's Gram statistics of D, which Full's fine-tuning needs too, or its "
            "served state of D) and what each deletion request costs; the other methods "
            "have no precompute. Fast-NTK's excludes XLA compilation (reported apart); the "
            "others' include what the tuning did not compile in this process (their first "
            "seed, or every stage of a resumed run). KLoM: P95 over D_f (the audits "
            "section), Retrain's is the noise floor.", ""]
  lines += standing_lines(results)
  return lines


def standing_lines(results: dict) -> list[str]:
  """Fast-NTK's Avg. Gap beside the best competitor's, and every metric on which some
  competitor is closer to Retrain than Fast-NTK (mean over seeds of |metric − Retrain's|;
  KLoM and the distance to Retrain as they are)."""
  methods = results["methods"]
  rivals = [n for n in methods if n not in ("fastntk", "full", "retrain")]
  if "fastntk" not in methods or not rivals:
    return []
  gap = lambda n: (methods[n].get("avg_gap") or {}).get("mean")
  ranked = sorted((n for n in rivals if gap(n) is not None), key=gap)
  if gap("fastntk") is None or not ranked:
    return ["**Standing**: no Avg. Gap to compare (a metric of the four is undefined here, "
            "e.g. MIA-Efficacy without a hold-out of the retained classes).", ""]
  best = ranked[0]
  tuned = set(results.get("tuning") or {})
  lines = [f"**Standing**: Fast-NTK's Avg. Gap is {gap('fastntk'):.2f}; the best "
           + ("tuned " if best in tuned else "(untuned) ")
           + f"competitor's is {_label(best)}'s, {gap(best):.2f}"
           + (f" ({', '.join(_label(n) for n in rivals if gap(n) is None)}: Avg. Gap "
              "undefined)" if len(ranked) < len(rivals) else "") + ".", ""]
  closer = []
  tol = 1e-9
  for name in rivals:
    metrics = []
    for key, label in FIELD_METRICS:
      mine = (methods["fastntk"]["field_gaps"].get(key) or {}).get("mean")
      theirs = (methods[name]["field_gaps"].get(key) or {}).get("mean")
      if mine is not None and theirs is not None and theirs < mine - tol:
        metrics.append(f"{label} (|gap| {theirs:.2f} vs {mine:.2f})")
    for value, label, digits in (
        (lambda n: _klom_p95(results, n), "KLoM P95", 3),
        (lambda n: (methods[n].get("relative_l2_to_retrain") or {}).get("mean"),
         "distance to Retrain", 3)):
      mine, theirs = value("fastntk"), value(name)
      if mine is not None and theirs is not None and theirs < mine - tol:
        metrics.append(f"{label} ({theirs:.{digits}g} vs {mine:.{digits}g})")
    if metrics:
      closer.append(f"{_label(name)}: " + ", ".join(metrics))
  lines += (["Closer to Retrain than Fast-NTK: " + "; ".join(closer) + ".", ""] if closer
            else ["No competitor is closer to Retrain than Fast-NTK on any of these metrics.",
                  ""])
  return lines


def _value(v) -> str:
  """A grid value as the tables print it: numbers by :g, anything else as it is."""
  return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def tuning_lines(results: dict) -> list[str]:
  """The fair tuning: per method its grid, the chosen point and its Avg. Gap on the
  validation seed, the trials that failed and the search's seconds."""
  searches = results.get("tuning") or {}
  if not searches:
    return []
  first = next(iter(searches.values()))
  same_data = not results["config"]["data"].get("draw_per_seed")
  lines = [f"## Fair tuning (validation seed {first['seed']}; its models are never reported)",
           "", f"Every method: its grid (≤ {results['config']['tuning']['max_trials']} "
           f"points), chosen by {first['criterion']}; MIA-Efficacy over "
           f"{results['config']['tuning']['mia_subsamples']} member subsamples."
           + (" The validation seed has the report's data (data.draw_per_seed=False): another "
              "head init and batch order, the same D_r, D_f and hold-out, so the choice is not "
              "independent of the hold-out whose TA and MIA-Efficacy are reported." if same_data
              else ""), "",
           "| Method | grid | points | chosen | validation Avg. Gap | failed | seconds |",
           "|---|---|---|---|---|---|---|"]
  for name, search in searches.items():
    trials = search["trials"]
    chosen = trials[search["chosen_index"]]
    fields = search.get("fields") or list(search["space"])  # the grid's own order
    grid = "; ".join(f"{k} ∈ {{{', '.join(_value(v) for v in search['space'][k])}}}"
                     for k in fields)
    failed = sum(1 for t in trials if t.get("error"))
    lines.append(f"| {_label(name)} | {grid} | {len(trials)} | "
                 + ", ".join(f"{k}={_value(search['chosen'][k])}" for k in fields)
                 + f" | {chosen['avg_gap']:.2f} | {failed} | "
                 f"{sum(t['seconds'] for t in trials):.1f} |")
  lines += ["", "Every trial's metrics are in results.json under \"tuning\".", ""]
  return lines


# What `pretrain.pretrain_info` records that differs between identical runs.
_PRETRAIN_TIMING = ("seconds", "cache_entry", "cache_hit")


def add_pretrain(results: dict, info: dict) -> dict:
  """Adds the backbone's record (`pretrain.pretrain_info`): `results["pretrain"]` (source,
  dataset, recipe, test accuracy on the pre-training dataset's test split, cache key) and,
  under `timing.pretrain`, what differs between identical runs (seconds, cache entry, hit)."""
  results["pretrain"] = {k: v for k, v in info.items() if k not in _PRETRAIN_TIMING}
  results.setdefault("timing", {})["pretrain"] = {k: info[k] for k in _PRETRAIN_TIMING
                                                  if k in info}
  return results


def pretrain_lines(results: dict) -> list[str]:
  """results.md's paragraph on the backbone (empty when results.json has no record)."""
  p = results.get("pretrain")
  if not p:
    return []
  if p.get("test_accuracy") is not None:
    text = (f"Pre-trained backbone: {p.get('dataset')} ({p.get('train_images'):,} images, "
            f"{p.get('epochs')} epochs, {p.get('recipe')}); **test accuracy "
            f"{p['test_accuracy']:.2f}%** on {p.get('test_split')} ({p.get('test_images'):,} "
            "images).")
  elif p.get("source") in ("npz", "state_dict", "checkpoint"):
    text = f"Pre-trained backbone: loaded ({p['source']}) from {p.get('path')}."
  else:
    text = f"Backbone: {p.get('source')} (not pre-trained)."
  return [text, ""]


def write_all(results: dict, workdir: str) -> None:
  """results.json and results.md (atomic), accuracy.png and relearn.png; the methods in the
  order of config.methods (results.json read back has them sorted)."""
  order = [n for n in results["config"].get("methods", ()) if n in results["methods"]]
  results = {**results, "methods": {n: results["methods"][n] for n in order + sorted(
      set(results["methods"]) - set(order))}}
  wd.atomic_write_json(os.path.join(workdir, "results.json"), results)
  wd.atomic_write_text(os.path.join(workdir, "results.md"), markdown(results))
  plots.plot_accuracy(results, os.path.join(workdir, "accuracy.png"),
                      [(k, l) for k, l in METRICS if k.startswith("acc")])
  plots.plot_relearn(results, os.path.join(workdir, "relearn.png"))
  plots.plot_relearn_attack(results, os.path.join(workdir, "relearn_attack.png"))
