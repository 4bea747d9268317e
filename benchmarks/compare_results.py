"""Every metric two results.json files disagree on (timing and machine aside):

    python benchmarks/compare_results.py before/results.json after/results.json [-v]

Prints the metrics of each method that differ (all of them with -v), the linear probes that
differ, KLoM per method and the certificates' bounds. Used for benchmarks/RESULTS.md §17.
"""
import json, sys, math
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
KEYS = ["ua", "ra", "ta", "mia_efficacy", "avg_gap", "acc_retain", "acc_forget", "acc_test_retain", "acc_test_forget", "relearn_epochs", "relative_l2_to_retrain", "l2_to_retrain", "kl_to_retrain_forget", "mia_accuracy", "mia_auc"]
worst = 0
for m in a["methods"]:
  if m not in b["methods"]: print("missing", m); continue
  for k in KEYS:
    x = (a["methods"][m].get(k) or {}).get("mean"); y = (b["methods"][m].get(k) or {}).get("mean")
    if x is None and y is None: continue
    d = abs((x or 0) - (y or 0)); rel = d / max(abs(x or 0), 1e-30)
    flag = "  <--" if (d > 1e-6 and rel > 1e-3) else ""
    if flag or "-v" in sys.argv: print(f"{m:14s} {k:24s} {x!r:>24} {y!r:>24}{flag}")
for kind in a.get("linear_probe", {}):
  for k in ("probe_acc_retain", "probe_acc_forget"):
    x = a["linear_probe"][kind][k]["mean"]; y = b["linear_probe"][kind][k]["mean"]
    if abs(x - y) > 1e-9: print("probe", kind, k, x, y, " <--")
if a.get("klom"):
  for m, st in a["klom"]["per_method"].items():
    y = b["klom"]["per_method"].get(m, {})
    print(f"klom {m:14s} mean {st['mean']:.4f} vs {y.get('mean', float('nan')):.4f}")
ca = [d.get("certificate", {}).get("retrain_relative_bound") for d in a["timing"]["fastntk_diagnostics"].values()]
cb = [d.get("certificate", {}).get("retrain_relative_bound") for d in b["timing"]["fastntk_diagnostics"].values()]
print("certificate retrain_relative_bound:", ca, cb)
print("solver:", a["methods"]["fastntk"].get("solver"), b["methods"]["fastntk"].get("solver"))
