"""The README's table "Digits at the paper's architectures" from the runs' results.json:

    python benchmarks/results/issue25/digits_table.py benchmarks/results/issue25/r110_std.json \
        benchmarks/results/issue25/r110_lin.json ...

One row per run (network x mode): Full's TA, Retrain's and Fast-NTK's UA / RA / TA /
MIA-Efficacy (mean ± std over seeds, as results.md), Fast-NTK's Avg. Gap to Retrain and its
relative distance ‖w − w_r‖ / ‖w_r − w0‖ (mean, and max over seeds), the certificate's time.
"""

import json
import sys

LABELS = {"resnet110": "ResNet-110", "mobilenetv2": "MobileNetV2",
          "vit_ti16": "prompted ViT (2 blocks, width 32)"}


def fmt(stat, digits=1):
  if not stat or stat.get("mean") is None:
    return "–"
  return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def four(entry):
  return " / ".join(f"{entry[k]['mean']:.1f}" for k in ("ua", "ra", "ta", "mia_efficacy"))


def row(r):
  m = r["methods"]
  mode = r["config"]["finetune"]["mode"]
  fast = m["fastntk"]
  rel = fast["relative_l2_to_retrain"]
  diags = r["timing"].get("fastntk_diagnostics", {}).values()
  cert = [d.get("certificate_seconds") for d in diags if d.get("certificate_seconds")]
  return ("| " + " | ".join([
      LABELS.get(r["model"]["name"], r["model"]["name"]),
      "linearised" if mode == "linearized" else "standard",
      fmt(m["full"]["ta"]), four(m["retrain"]), four(fast), fmt(fast["avg_gap"], 2),
      f"{rel['mean']:.2g} (max {max(rel['per_seed']):.2g})",
      f"{sum(cert) / len(cert):.0f}" if cert else "–"]) + " |")


if __name__ == "__main__":
  print("| Network | Mode | Full TA | Retrain UA / RA / TA / MIA-Eff. | Fast-NTK UA / RA / TA / "
        "MIA-Eff. | Fast-NTK Avg. Gap | ‖w − w_r‖ / ‖w_r − w0‖ | certificate s / seed |")
  print("|---|---|---|---|---|---|---|---|")
  for path in sys.argv[1:]:
    print(row(json.load(open(path))))
