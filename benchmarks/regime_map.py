"""Regime map: how far Fast-NTK lands from Retrain as fine-tuning leaves the linear regime.

On the embedded digits default, one seed per cell, Full / Retrain / Fast-NTK only (relearn
and probes cut to one epoch): Fast-NTK's Avg. Gap to Retrain (mean |Δ| over UA, RA, TA,
MIA-Efficacy, in points) and its relative parameter distance ‖w − w_r‖ / ‖w_r − w0‖, over

  standard fine-tuning: learning rate × loss (mse, ce) × BN mode (frozen, train) × damping,
  linearised fine-tuning (closed form): damping,

for class-level and sample-level forgetting. Writes regime_map.{json,md,png} into --out.
The backbone is pre-trained once (in the first cell's workdir) and loaded by every other
cell; each cell's workdir under --workdir is kept, so an interrupted map resumes.

    python -m benchmarks.regime_map --out benchmarks/results/regime_map
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastntk_jax import config as config_lib  # pylint: disable=wrong-import-position
from fastntk_jax.experiment import run as run_lib  # pylint: disable=wrong-import-position

DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "default.py")


def cell(mode: str, forget: str, lr: float, loss: str, bn: str, damping: float,
         seed: int, workdir: str, pretrained: str = "", edit=None) -> dict:
  """One pipeline run in `workdir` (resumed if it exists), from the backbone checkpoint
  `pretrained` ("" = pre-train here); `edit(cfg)` changes the config further (another
  model). Returns Fast-NTK's gap to Retrain and more. In linearised mode lr/loss/bn are
  unused (closed form, squared loss, pre-trained BN statistics)."""
  arg = "standard" if mode == "standard" else ""
  if forget == "samples":
    arg = ",".join(a for a in (arg, "samples") if a)
  cfg = config_lib.load_config_file(DEFAULT + (f":{arg}" if arg else ""))
  with cfg.unlocked():
    cfg.seeds = (seed,)
    cfg.methods = ("full", "retrain", "fastntk")
    cfg.eval.relearn.epochs = 1
    cfg.eval.probe.epochs = 1
    cfg.eval.population_seeds = 0
    cfg.unlearn.damping = damping
    cfg.unlearn.solve_dtype = "float64"
    if pretrained:
      cfg.pretrain.source = "checkpoint"
      cfg.pretrain.path = pretrained
    if mode == "standard":
      cfg.finetune.learning_rate = lr
      cfg.finetune.loss = loss
      cfg.finetune.bn_mode = bn
    if edit is not None:
      edit(cfg)
  start = time.perf_counter()
  res = run_lib.run(cfg, workdir, show_progress=False)["methods"]
  f, r, full = res["fastntk"], res["retrain"], res["full"]
  return {"mode": mode, "forget": forget, "lr": lr, "loss": loss, "bn": bn, "damping": damping,
          "seed": seed, "avg_gap": f["avg_gap"]["mean"],
          "rel_dist": f["relative_l2_to_retrain"]["mean"],
          "fastntk_ua": f["ua"]["mean"], "retrain_ua": r["ua"]["mean"],
          "full_ua": full["ua"]["mean"], "full_ta": full["ta"]["mean"],
          "fastntk_ta": f["ta"]["mean"],
          "retrain_ta": r["ta"]["mean"], "seconds": time.perf_counter() - start}


def grid(args) -> list[tuple]:
  cells = []
  for forget in args.forget:
    for lr, loss, bn, lam in itertools.product(args.lrs, args.losses, args.bn_modes,
                                               args.dampings):
      cells.append(("standard", forget, lr, loss, bn, lam))
    for lam in args.dampings:
      cells.append(("linearized", forget, 0.0, "mse", "w0", lam))
  return cells


def write(rows: list, out: str, command: str) -> None:
  with open(os.path.join(out, "regime_map.json"), "w") as f:
    json.dump({"command": command, "rows": rows}, f, indent=1)
  lines = ["# Regime map: Fast-NTK's Avg. Gap to Retrain", "", f"Command: `{command}`", "",
           "| forget | fine-tuning | lr | loss | BN | λ | Avg. Gap (points) | "
           "‖w−w_r‖/‖w_r−w0‖ | UA Fast-NTK / Retrain / Full | TA Fast-NTK / Retrain |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['forget']} | {r['mode']} | {r['lr'] or '–'} | {r['loss']} | {r['bn']} "
                 f"| {r['damping']:g} | {r['avg_gap']:.2f} | {r['rel_dist']:.1e} | "
                 f"{r['fastntk_ua']:.1f} / {r['retrain_ua']:.1f} / {r['full_ua']:.1f} | "
                 f"{r['fastntk_ta']:.1f} / {r['retrain_ta']:.1f} |")
  with open(os.path.join(out, "regime_map.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(out, "regime_map.png"))


def plot(rows: list, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  forgets = sorted({r["forget"] for r in rows})
  fig, axes = plt.subplots(1, len(forgets), figsize=(6.5 * len(forgets), 4.2), squeeze=False)
  for ax, forget in zip(axes[0], forgets):
    sub = [r for r in rows if r["forget"] == forget]
    labels = [("linearised" if r["mode"] == "linearized" else
               f"{r['loss']}, lr {r['lr']:g}, BN {r['bn']}") + f", λ {r['damping']:g}"
              for r in sub]
    gaps = [r["avg_gap"] for r in sub]
    colors = ["tab:green" if r["mode"] == "linearized" else "tab:gray" for r in sub]
    ax.barh(range(len(sub)), gaps, color=colors)
    ax.set_yticks(range(len(sub)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Fast-NTK's Avg. Gap to Retrain (points; 0 = Retrain)")
    ax.set_title(f"{forget}-level forgetting (digits, 1 seed)")
    for i, g in enumerate(gaps):
      ax.text(g, i, f" {g:.2f}", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results/regime_map")
  ap.add_argument("--forget", default="class,samples", type=lambda s: s.split(","))
  ap.add_argument("--lrs", default="0.002,0.05", type=lambda s: [float(v) for v in s.split(",")])
  ap.add_argument("--losses", default="mse,ce", type=lambda s: s.split(","))
  ap.add_argument("--bn-modes", default="frozen,train", type=lambda s: s.split(","))
  ap.add_argument("--dampings", default="0.01", type=lambda s: [float(v) for v in s.split(",")])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default="workdir_regime_map",
                  help="one pipeline workdir per cell (kept: a rerun resumes)")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  command = "python -m benchmarks.regime_map " + " ".join(argv if argv else sys.argv[1:])
  rows = []
  cells = grid(args)
  pretrained = ""
  for i, c in enumerate(cells):
    name = "_".join(str(v) for v in c)
    workdir = os.path.join(args.workdir, name)
    rows.append(cell(*c, seed=args.seed, workdir=workdir, pretrained=pretrained))
    pretrained = pretrained or os.path.join(os.path.abspath(workdir), "pretrain")
    r = rows[-1]
    print(f"[{i + 1}/{len(cells)}] {c}: Avg. Gap {r['avg_gap']:.2f}, rel. distance "
          f"{r['rel_dist']:.1e} ({r['seconds']:.0f} s)", flush=True)
    write(rows, args.out, command)


if __name__ == "__main__":
  main()
