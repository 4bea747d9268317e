"""The README's result tables, printed from a run's results.json (what the README states is
what this prints for the command the README names):

    python benchmarks/readme_tables.py workdir_default/results.json

Prints the field's metrics table (UA, RA, TA, MIA-Efficacy, Avg. Gap, RTE, distance to
Retrain, KLoM), the accuracies-and-relearn table, the linear probes, the certificates, and
the stack and machine the run was measured on.
"""

import json
import sys


def _fmt(stat, digits=1):
  if not stat or stat.get("mean") is None:
    return "–"
  if len(stat.get("per_seed", [])) > 1:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
  return f"{stat['mean']:.{digits}f}"


_LABELS = {}


def _label(name):
  label = _LABELS.get(name, name)
  return f"**{label}**" if name == "fastntk" else label


_ORDER = []


def _ordered(methods: dict) -> list:
  """Full, Retrain, Fast-NTK first (the README's order), then the others in the order of the
  run's config.methods."""
  first = [m for m in ("full", "retrain", "fastntk") if m in methods]
  rest = [m for m in _ORDER if m in methods and m not in first]
  return [(m, methods[m]) for m in first + rest + sorted(set(methods) - set(first) - set(rest))]


def tables(r: dict) -> str:
  out = []
  v, m = r["versions"], r["machine"]
  stack = "nt" if v.get("neural-tangents") else "lean"
  out.append(f"stack {stack} (jax {v['jax']}, flax {v['flax']}, neural-tangents "
             f"{v.get('neural-tangents') or 'not installed'}, Python {v['python']}); "
             f"{m['cpu']}, {m['cores']} cores, backend {m['backend']}; seeds {r['seeds']}")
  out.append("")
  klom = (r.get("klom") or {}).get("per_method", {})
  floor = (r.get("klom") or {}).get("floor")
  _LABELS.update({n: e.get("label", n) for n, e in r["methods"].items()})
  _ORDER[:] = list(r["config"].get("methods", ()))
  out.append("| Method | UA | RA | TA | MIA-Efficacy | Avg. Gap | RTE per request (s) | "
             "precompute (s) | ‖w − w_r‖ / ‖w_r − w0‖ | KLoM (P95) |")
  out.append("|---|---|---|---|---|---|---|---|---|---|")
  for name, e in _ordered(r["methods"]):
    rel = (e.get("relative_l2_to_retrain") or {})
    per = rel.get("per_seed") or []
    if name == "retrain":
      dist = "0"
    elif per and max(per) < 1e-3:
      dist = f"{rel['mean']:.2g} (max {max(per):.2g})"
    else:
      dist = f"{rel['mean']:.2f}" if rel else "–"
    k = klom.get(name)
    kl = "–" if k is None else f"{k['p95']:.3f}" + (" (floor)" if name == floor else "")
    t = r["timing"]["methods"][name]
    gap = "0.00" if name == "retrain" else _fmt(e.get("avg_gap"), 2)
    out.append("| " + " | ".join([_label(name), _fmt(e.get("ua")), _fmt(e.get("ra")),
                                   _fmt(e.get("ta")), _fmt(e.get("mia_efficacy")), gap,
                                   _fmt(t.get("request_seconds", t["seconds"]), 2),
                                   _fmt(t.get("precompute_seconds"), 2), dist, kl]) + " |")
  out.append("")
  for name, search in sorted((r.get("tuning") or {}).items(),
                             key=lambda item: _ORDER.index(item[0]) if item[0] in _ORDER else 0):
    chosen = ", ".join(f"{k}={v:g}" for k, v in search["chosen"].items())
    out.append(f"tuned {_LABELS.get(name, name)}: {chosen} ({len(search['trials'])} points, "
               f"validation seed {search['seed']})")
  out.append("")
  out.append("| Method | D_r acc | D_f acc | Test acc (retain cls) | Test acc (forget cls) | "
             "Relearn (epochs) |")
  out.append("|---|---|---|---|---|---|")
  for name, e in _ordered(r["methods"]):
    out.append("| " + " | ".join([_label(name)] + [_fmt(e.get(k)) for k in (
        "acc_retain", "acc_forget", "acc_test_retain", "acc_test_forget", "relearn_epochs")])
               + " |")
  out.append("")
  out.append("| Backbone | probe acc on D_r | probe acc on D_f |")
  out.append("|---|---|---|")
  for kind, e in r.get("linear_probe", {}).items():
    out.append(f"| {kind} | {_fmt(e['probe_acc_retain'])} | {_fmt(e['probe_acc_forget'])} |")
  out.append("")
  diags = r["timing"].get("fastntk_diagnostics", {})
  certs = {s: d["certificate"] for s, d in diags.items() if d.get("certificate")}
  if certs:
    out.append("certificates, ‖w − w_r‖/‖w_r − w0‖ ≤ (per seed): " + ", ".join(
        f"seed {s}: {c['retrain_relative_bound']:.2g}" for s, c in certs.items()))
    comp = [d.get("compile_seconds") for d in diags.values() if d.get("compile_seconds")]
    if comp:
      out.append(f"Fast-NTK compilation, mean per seed: {sum(comp) / len(comp):.1f} s")
  return "\n".join(out)


if __name__ == "__main__":
  for path in sys.argv[1:]:
    print(f"## {path}\n")
    print(tables(json.load(open(path))))
    print()
