"""Reproduce the paper's Tables I-III: the grid, its expected GPU hours, the runs, and the
tables shaped like the paper's with the paper's surviving numbers beside ours.

  python launch/reproduce.py plan                         # the grid, GPU hours per row
  python launch/reproduce.py run --root=repro             # every job here, one by one
  python launch/reproduce.py run --backend=slurm --root=/shared/repro
  python launch/reproduce.py tables repro --out=repro     # -> tables.md, tables.json

`run` is `launch/sweep.py` over the paper's grid (all its flags pass through, e.g.
--config.data.data_dir=/data/tfds, --dry-run): one job per grid point and seed, each in its
own resumable workdir; the CNNs' CIFAR-100 pre-training is trained once per network and
shared through <root>/pretrain_cache. Table III (linear probing) comes from the same
ImageNet-R runs as Table II (every run probes Pre-Trained, Random-Init and Fast-NTK).

The paper's tables did not survive text extraction except Table III's numbers (PAPER_TABLE3,
mean ± std as printed); the CIFAR-10 #IPC values are our assumption (sweep.CIFAR10_IPC).

GPU hours (`plan`): a cost model, not a measurement, except where noted. Every stage's work
is counted in forward passes F of its network (XLA's FLOP count of one image, FORWARD_GFLOP)
from the configs' own epochs, batch and split sizes, and divided by a throughput: by default
RATE_TFLOPS = 34, what one H200 reached on the one GPU run we have (benchmarks/RESULTS.md
§3: ResNet-110's Fast-NTK update on 5,000 CIFAR images, ≈12 F per image, in 0.85 s). The
"high" column divides by a quarter of it, since small-batch training of narrow networks runs
below a batched-Jacobian workload; compilation adds COMPILE_SECONDS per job (estimate).
Give your own throughput with --tflops (measure it on your GPU first).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _load_sweep():
  spec = importlib.util.spec_from_file_location("fastntk_sweep", os.path.join(HERE, "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault(spec.name, module)
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()

# Table III of the paper (arXiv:2312.14923), the only numbers that survived text extraction:
# linear probing (fresh head on D, backbone frozen), accuracy on D_r and D_f in %, mean ± std.
PAPER_TABLE3 = {
    ("vit_s16", 20, 20): {"pretrained": ((60.39, 1.27), (72.50, 9.01)),
                          "random_init": ((35.66, 1.69), (54.53, 2.46)),
                          "fastntk": ((60.25, 3.76), (0.00, 0.00))},
    ("vit_s16", 20, 50): {"pretrained": ((58.24, 1.49), (79.50, 6.22)),
                          "random_init": ((26.40, 1.06), (33.33, 17.00)),
                          "fastntk": ((53.71, 2.45), (0.00, 0.00))},
    ("vit_s16", 50, 20): {"pretrained": ((53.70, 2.36), (66.25, 5.45)),
                          "random_init": ((22.32, 0.60), (43.33, 11.12)),
                          "fastntk": ((47.24, 0.00), (0.00, 0.00))},
    ("vit_b16", 20, 20): {"pretrained": ((99.93, 0.11), (100.00, 0.00)),
                          "random_init": ((32.31, 0.74), (49.40, 4.42)),
                          "fastntk": ((86.58, 2.13), (2.50, 2.50))},
    ("vit_b16", 20, 50): {"pretrained": ((99.32, 0.24), (99.00, 1.00)),
                          "random_init": ((19.30, 0.66), (15.00, 8.16)),
                          "fastntk": ((87.66, 1.01), (0.00, 0.00))},
    ("vit_b16", 50, 20): {"pretrained": ((99.87, 0.08), (98.75, 2.17)),
                          "random_init": ((17.33, 0.69), (17.33, 7.72)),
                          "fastntk": ((87.24, 0.00), (0.00, 0.00))},
}
PROBE_ROWS = (("pretrained", "Pre-Trained"), ("random_init", "Random-Init"),
              ("fastntk", "Fast-NTK"))

# Forward GFLOP per image (XLA's cost analysis of `model.apply` on one image at the configs'
# size, 10 classes for the CNNs, 20 for the ViTs; the head is negligible). Measured on the
# CPU with jax 0.5.3:
#   python -c "import jax, jax.numpy as jnp; from fastntk_jax.models import get_model; ..."
#   (see benchmarks/RESULTS.md §9 for the exact snippet)
FORWARD_GFLOP = {("resnet110", 32): 0.489, ("mobilenetv2", 32): 0.181,
                 ("vit_s16", 224): 9.28, ("vit_b16", 224): 35.3}
RATE_TFLOPS = 34.0  # H200, measured on ResNet-110's Fast-NTK update (see the docstring)
SLOW_FACTOR = 4.0  # the "high" column: a quarter of RATE_TFLOPS
COMPILE_SECONDS = 300.0  # per job: ~20 jitted programs at ~15 s each (estimate)
# The one GPU measurement of a stage: ResNet-110 Fast-NTK, primal, 5,000 images, one H200.
MEASURED_FASTNTK = {"resnet110": (5000, 0.85, "benchmarks/RESULTS.md §3 (1x H200)")}
# Sizes the configs imply but do not state: CIFAR test splits, CIFAR-100 train split.
CIFAR_TEST, CIFAR100_TRAIN, CIFAR100_TEST = 10_000, 50_000, 10_000
METHODS = ("full", "retrain", "fastntk", "max_loss", "random_label")
TABLES = {"I": "cifar10", "II": "imagenet_r", "B": "appendix"}


@dataclasses.dataclass
class Row:
  """One grid point (all its seeds): sizes, its work in TFLOP per stage, and the hours."""
  table: str
  model: str
  dataset: str
  num_classes: int
  ipc: int
  seeds: int
  jobs: int
  stages: dict  # stage -> TFLOP over all seeds
  measured: dict  # stage -> (seconds over all seeds, source)

  def seconds(self, rate_tflops: float) -> float:
    total = self.jobs * COMPILE_SECONDS
    for stage, tflop in self.stages.items():
      if stage in self.measured:
        total += self.measured[stage][0]
      else:
        total += tflop / rate_tflops
    return total


def _cfg(job):
  sys.path.insert(0, REPO)
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config_file(os.path.join(REPO, job.config) + ":" + job.arg)


def job_stages(job) -> tuple[dict, dict, Optional[dict]]:
  """(TFLOP per stage of one seed, measured seconds per stage, the pre-training's TFLOP or
  None) for a sweep.Job, from its config."""
  cfg = _cfg(job)
  size = cfg.data.image_size
  f = FORWARD_GFLOP[(job.model, size)] * 1e9  # FLOP per image, forward
  k, ipc = job.num_classes, job.ipc
  d, d_f = k * ipc, ipc
  d_r = d - d_f
  test = CIFAR_TEST if job.dataset == "cifar10" else k * (cfg.data.holdout_per_class or 25)
  c = k
  tf = 1e-12
  ft = cfg.finetune.epochs
  stages = {
      "full": ft * d * 3 * f * tf,
      "retrain": ft * d_r * 3 * f * tf,
      # a forward (residuals) + a Jacobian (a forward and C backward passes) per image
      "fastntk": d * (c + 2) * f * tf,
      "max_loss": cfg.baselines.max_loss.epochs * d_f * 3 * f * tf,
      "random_label": cfg.baselines.random_label.epochs * d_f * 3 * f * tf,
      # every method: inference on D and the hold-out, then relearning on D_f up to the cap
      # (an upper bound: it stops once the loss is below the threshold)
      "evaluation": len(METHODS) * ((d + test) * f + cfg.eval.relearn.epochs * d_f * 3 * f) * tf,
      # three probes (fresh head on D over a frozen backbone: forward passes)
      "linear_probe": 3 * (cfg.eval.probe.epochs * d + d) * f * tf,
  }
  p = {"vit_s16": 36_864 + 384 * c + c, "vit_b16": 73_728 + 768 * c + c}.get(job.model)
  if p is not None:  # the dual's kernel products, 2 (n·C)² p
    stages["fastntk"] += 2 * (d * c) ** 2 * p * tf
  measured = {}
  if job.model in MEASURED_FASTNTK:
    n_ref, seconds, source = MEASURED_FASTNTK[job.model]
    measured["fastntk"] = (seconds * d / n_ref, source)  # Jacobians: linear in n
  pre = None
  if cfg.pretrain.source == "train" and cfg.pretrain.dataset == "cifar100":
    pre = {"pretrain": (cfg.pretrain.train.epochs * CIFAR100_TRAIN * 3 + CIFAR100_TEST) * f * tf}
  return stages, measured, pre


def plan(groups=sweep.DEFAULT_GROUPS, *, seeds=sweep.SEEDS, cifar_ipc=sweep.CIFAR10_IPC,
         imagenet_r=sweep.IMAGENET_R_SETTINGS) -> tuple[list[Row], list[Row]]:
  """(a Row per grid point, a Row per shared pre-training) of the paper's grid."""
  jobs = sweep.grid(groups, seeds=(0,), cifar_ipc=cifar_ipc, imagenet_r=imagenet_r)
  rows, pretrains = [], {}
  for job in jobs:
    stages, measured, pre = job_stages(job)
    n = len(seeds)
    table = {v: t for t, v in TABLES.items()}[next(g for g, m, ds, cf in sweep.MODELS
                                                   if m == job.model and ds == job.dataset)]
    rows.append(Row(table, job.model, job.dataset, job.num_classes, job.ipc, n, n,
                    {s: v * n for s, v in stages.items()},
                    {s: (v[0] * n, v[1]) for s, v in measured.items()}))
    if pre and job.model not in pretrains:
      pretrains[job.model] = Row(table, job.model, "cifar100", 100, 500, 1, 0, pre, {})
  return rows, list(pretrains.values())


def _h(seconds: float) -> str:
  return f"{seconds / 3600:.2f}"


def plan_markdown(rows: Sequence[Row], pretrains: Sequence[Row], rate: float) -> str:
  slow = rate / SLOW_FACTOR
  lines = ["# Reproducing Tables I-III: the grid and its GPU hours (one GPU)", "",
           f"Estimated from the work of every stage (forward passes of each network, XLA's "
           f"FLOP count) at {rate:g} TFLOP/s (low) and {slow:g} TFLOP/s (high), plus "
           f"{COMPILE_SECONDS:g} s of compilation per job; **measured** where marked. "
           "Table III needs no runs of its own: it is the linear probes of the Table II runs.",
           "", "| Table | Network | Data | #Classes/#IPC | Seeds | GPU h (low–high) | "
           "largest stages (TFLOP, all seeds) | basis |", "|---|---|---|---|---|---|---|---|"]
  total_lo = total_hi = 0.0
  for r in list(pretrains) + list(rows):
    lo, hi = r.seconds(rate), r.seconds(slow)
    total_lo += lo
    total_hi += hi
    top = sorted(r.stages.items(), key=lambda kv: -kv[1])[:3]
    basis = ("estimate; Fast-NTK measured (" + r.measured["fastntk"][1] + ", scaled to n)"
             if r.measured else "estimate")
    label = sweep.MODEL_LABELS.get(r.model, r.model)
    if r.jobs == 0:
      what, setting, seeds = "pre-training, CIFAR-100 (shared)", "100/500", "–"
    else:
      what = sweep.DATASET_LABELS.get(r.dataset, r.dataset)
      setting, seeds = f"{r.num_classes}/{r.ipc}", str(r.seeds)
    lines.append(f"| {r.table} | {label} | {what} | {setting} | {seeds} | {_h(lo)}–{_h(hi)} | "
                 + ", ".join(f"{s} {v:,.0f}" for s, v in top) + f" | {basis} |")
  lines += [f"| | **total** | | | | **{_h(total_lo)}–{_h(total_hi)}** | | |", "",
            "Evaluation counts relearning to its cap of 100 epochs for every method (an upper "
            "bound). The ViTs' Fast-NTK adds the dual solver's kernel products 2(n·C)²p at the "
            "same rate (they run in float64). Override the throughput with --tflops.", ""]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Tables shaped like the paper's.
# --------------------------------------------------------------------------------------


def _fmt(stat: Optional[dict]) -> str:
  if not stat or stat.get("mean") is None:
    return "–"
  return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _paper(pair) -> str:
  return f"{pair[0]:.2f} ± {pair[1]:.2f}"


TABLE_METRICS = (("acc_retain", "Acc on D_r"), ("acc_forget", "Acc on D_f"),
                 ("acc_test_retain", "Acc on test (retain classes)"),
                 ("acc_test_forget", "Acc on test (forget class)"),
                 ("relearn_epochs", "Relearn time (epochs)"))


def _columns(points, dataset, models):
  cols = []
  for model in models:
    for p in sorted((p for p in points if p["model"] == model and p["dataset"] == dataset),
                    key=lambda p: (p["num_classes"], p["ipc"])):
      cols.append(p)
  return cols


def _header(cols, first="") -> list[str]:
  names = [f"{sweep.MODEL_LABELS.get(p['model'], p['model'])} {p['num_classes']}/{p['ipc']}"
           for p in cols]
  return [f"| {first} | | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(cols)]


def results_table(title: str, points, dataset: str, models: Sequence[str]) -> list[str]:
  """A Table I/II: row groups per metric, a row per method, a column per network × setting
  (the layout of the paper's surviving Table III). The paper's values did not survive."""
  cols = _columns(points, dataset, models)
  if not cols:
    return [f"## {title}", "", "No results for this table yet.", ""]
  lines = [f"## {title}", "", *_header(cols, "Metric")]
  for key, label in TABLE_METRICS:
    for m in METHODS:
      cells = [_fmt(p["methods"].get(m, {}).get(key)) for p in cols]
      name = next((p["labels"][m] for p in cols if m in p.get("labels", {})), m)
      lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
  params = [(f"{p['params']['trainable_params']:,} ({p['params']['trainable_percent']:.2f}%)"
             if p.get("params", {}).get("trainable_params") else "–") for p in cols]
  lines.append("| #Params (trainable) | | " + " | ".join(params) + " |")
  pre = [(f"{p['pretrain']['test_accuracy']:.2f}" if p.get("pretrain") else "–") for p in cols]
  if any(x != "–" for x in pre):
    lines.append("| Pre-training test acc (CIFAR-100) | | " + " | ".join(pre) + " |")
  seeds = [",".join(str(s) for s in sorted(p["seeds"])) for p in cols]
  lines += ["| Seeds | | " + " | ".join(seeds) + " |", "",
            "Mean ± std over seeds (%; relearn in epochs, capped at 100). The paper's values "
            "for this table did not survive text extraction.", ""]
  return lines


def table3(points) -> list[str]:
  """Table III: linear probing on the ImageNet-R runs, ours with the paper's beside it."""
  cols = _columns(points, "imagenet_r", ("vit_s16", "vit_b16"))
  keys = [(p["model"], p["num_classes"], p["ipc"]) for p in cols]
  for key in PAPER_TABLE3:  # the paper's columns even where we have no run yet
    if key not in keys:
      keys.append(key)
  keys.sort(key=lambda k: (k[0] != "vit_s16", k[1], k[2]))
  by_key = {(p["model"], p["num_classes"], p["ipc"]): p for p in cols}
  names = [f"{sweep.MODEL_LABELS[m]} {k}/{n}" for m, k, n in keys]
  lines = ["## Table III: linear probing (fresh head on D, backbone frozen)", "",
           "| Acc on | Backbone | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
  for index, (metric, label) in enumerate((("probe_acc_retain", "D_r"),
                                           ("probe_acc_forget", "D_f"))):
    for kind, kind_label in PROBE_ROWS:
      cells = []
      for key in keys:
        ours = _fmt((by_key.get(key) or {}).get("probes", {}).get(kind, {}).get(metric))
        paper = PAPER_TABLE3.get(key, {}).get(kind)
        cells.append(f"{ours} (paper {_paper(paper[index])})" if paper else ours)
      lines.append(f"| {label} | {kind_label} | " + " | ".join(cells) + " |")
  lines += ["", "Ours: mean ± std over seeds; in parentheses the paper's Table III.", ""]
  return lines


def tables_markdown(merged: dict) -> str:
  points = merged["points"]
  out = ["# Fast-NTK: the paper's tables from our runs", ""]
  out += results_table("Table I: CNNs on CIFAR-10 (BN scale/bias + head), class 0 forgotten",
                       points, "cifar10", ("resnet110", "mobilenetv2"))
  out += results_table("Table II: ViTs on ImageNet-R (K/V prompts + head), one random class "
                       "forgotten", points, "imagenet_r", ("vit_s16", "vit_b16"))
  out += table3(points)
  appendix = [p for p in points if p["dataset"] == "cifar10" and p["model"].startswith("vit")]
  if appendix:
    out += results_table("Appendix B: ViT-B/16 on CIFAR-10", points, "cifar10", ("vit_b16",))
  return "\n".join(out)


def write_tables(paths: Sequence[str], out_dir: str) -> str:
  merged = sweep.merge(paths)
  merged["paper_table3"] = {f"{m}_{k}_{n}": v for (m, k, n), v in PAPER_TABLE3.items()}
  os.makedirs(out_dir, exist_ok=True)
  md_path = os.path.join(out_dir, "tables.md")
  for path, text in ((md_path, tables_markdown(merged)),
                     (os.path.join(out_dir, "tables.json"), json.dumps(merged, indent=1))):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  return md_path


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
  sub = ap.add_subparsers(dest="command", required=True)
  p_plan = sub.add_parser("plan", help="the grid and its GPU hours per row")
  p_plan.add_argument("--tflops", type=float, default=RATE_TFLOPS,
                      help="achieved TFLOP/s of your GPU (default: the H200's measured rate)")
  p_plan.add_argument("--groups", default=",".join(sweep.DEFAULT_GROUPS))
  p_plan.add_argument("--seeds", type=sweep._ints, default=sweep.SEEDS)  # pylint: disable=protected-access
  p_plan.add_argument("--cifar-ipc", type=sweep._ints, default=sweep.CIFAR10_IPC)  # pylint: disable=protected-access
  p_plan.add_argument("--json", action="store_true", help="print the rows as JSON")
  sub.add_parser("run", help="run the grid: launch/sweep.py's flags", add_help=False)
  p_tab = sub.add_parser("tables", help="merge results.json files into the paper's tables")
  p_tab.add_argument("paths", nargs="+")
  p_tab.add_argument("--out", default=".")
  if argv and argv[0] == "run":
    return sweep.main(argv[1:])
  args = ap.parse_args(argv)
  if args.command == "plan":
    rows, pre = plan([g for g in args.groups.split(",") if g], seeds=args.seeds,
                     cifar_ipc=args.cifar_ipc)
    if args.json:
      print(json.dumps([dataclasses.asdict(r) | {"hours_low": r.seconds(args.tflops) / 3600,
                                                 "hours_high": r.seconds(
                                                     args.tflops / SLOW_FACTOR) / 3600}
                        for r in pre + rows], indent=1))
    else:
      print(plan_markdown(rows, pre, args.tflops))
    return 0
  try:
    path = write_tables(args.paths, args.out)
  except ValueError as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  print(open(path).read(), end="")
  print(f"Wrote {path} and {os.path.join(os.path.dirname(path), 'tables.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
