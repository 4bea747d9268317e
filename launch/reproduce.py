"""Reproduce the paper's Tables I-III: the grid, its expected GPU hours, the runs, and the
tables shaped like the paper's with the paper's surviving numbers beside ours, in both
fine-tuning modes.

  python launch/reproduce.py plan                         # the grid, GPU hours per row and mode
  python launch/reproduce.py plan --modes=linearized      # one mode
  python launch/reproduce.py run --root=repro             # every job here, one by one
  python launch/reproduce.py run --backend=slurm --root=/shared/repro
  python launch/reproduce.py tables repro --out=repro     # -> tables.md, tables.json

Modes (`--modes`, for plan, run and tables; default both): "standard" is the paper's
protocol (Full and Retrain fine-tuned by SGD; Eq. (1) is then exact only as far as that
stays linear), "linearized" the exact mode (the configs' `linearized` argument: Full and
Retrain are the network linearised at w0 trained to its ridge minimiser, where Fast-NTK
equals Retrain up to round-off; configs/common.py `linearized`). Both by default: the paper's
numbers come from the first, the guarantee holds for the second, and what linearity costs
in accuracy at these architectures is only known from running both. A bad value is one
line naming the modes, exit code 2.

`run` is `launch/sweep.py` over the paper's grid (all its flags pass through, e.g.
--config.data.data_dir=/data/tfds, --dry-run): one job per grid point, mode and seed, each in
its own resumable workdir named by its mode; the CNNs' CIFAR-100 pre-training is trained
once per network (for both modes) and shared through <root>/pretrain_cache. Table III
(linear probing) comes from the same ImageNet-R runs as Table II (every run probes
Pre-Trained, Random-Init and Fast-NTK). `tables` puts the modes of each grid point side by
side, in columns, with the paper's numbers beside each.

The paper's tables did not survive text extraction except Table III's numbers (PAPER_TABLE3,
mean ± std as printed); the CIFAR-10 #IPC values are our assumption (sweep.CIFAR10_IPC).

GPU hours (`plan`): a cost model, labelled per row "estimated" with the stages that are
"measured" named. Every stage of a job is counted (STAGES: Full, Retrain, Fast-NTK, the
certificate of the deletion and its release's cost, the baselines, evaluation with
relearning and the relearning attack, the probes, and the CIFAR-100 pre-training with its
host-side augmentation): in forward passes F of its network (XLA's FLOP count of one
image, FORWARD_GFLOP) from the configs' own epochs, batch and split sizes and mode, divided
by a throughput: by default RATE_TFLOPS = 34, what one H200 reached on the one GPU run we
have (benchmarks/RESULTS.md §3: ResNet-110's Fast-NTK update on 5,000 CIFAR images, ≈12 F
per image, in 0.85 s). The "high" column divides by a quarter of it, since small-batch
training of narrow networks runs below a batched-Jacobian workload; compilation adds
COMPILE_SECONDS per job (estimate). Measured instead: ResNet-110's standard Fast-NTK update
(that H200), and the host-side stages, which no GPU speeds up (this project's 2-core CPU,
benchmarks/RESULTS.md §22): pre-training's crop + flip, and the closed form's certificate
(its exact bound in 80-bit precision with eigenvalue decompositions of the p x p Gram).
Linearised jobs by cg count cg's iteration cap (an upper bound; --cg-iterations for a
measured count). Give your own throughput with --tflops (measure it on your GPU first).
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
# Trainable parameters p of C classes (BN scale/bias or prompts, plus the C-way head): the
# configs' docstrings, checked by tests/test_reproduce.py against the models.
TRAINABLE = {"resnet110": lambda c: 8_096 + 65 * c, "mobilenetv2": lambda c: 34_112 + 1_281 * c,
             "vit_s16": lambda c: 36_864 + 385 * c, "vit_b16": lambda c: 73_728 + 769 * c}
RATE_TFLOPS = 34.0  # H200, measured on ResNet-110's Fast-NTK update (see the docstring)
SLOW_FACTOR = 4.0  # the "high" column: a quarter of RATE_TFLOPS
COMPILE_SECONDS = 300.0  # per job: ~20 jitted programs at ~15 s each (estimate)
# The one GPU measurement of a stage: ResNet-110 Fast-NTK, primal, 5,000 images, one H200.
MEASURED_FASTNTK = {"resnet110": (5000, 0.85, "benchmarks/RESULTS.md §3 (1x H200)")}
# Host-side work, which no GPU speeds up, measured on this project's 2-core AMD EPYC CPU
# while other jobs ran (benchmarks/RESULTS.md §22; a faster host shortens them):
# * pre-training's augmentation, `data.batches.random_crop_flip` of 32x32x3 images in
#   batches of 128 (`train._epoch_batches` runs it on the host before every step);
AUGMENT_SECONDS_PER_IMAGE = 5.7e-5
AUGMENT_SOURCE = "host augmentation measured, benchmarks/RESULTS.md §22 (2-core CPU)"
# * the certificate in the closed form (unlearn/certificate.py, Gram basis): the witness and
#   its exact bound on the host in float64/80-bit (`certificate.stats_witness`: eigenvalue
#   decompositions and extended-precision products of the p x p Gram) and the independent
#   reference retrain (`linalg.reference_ridge_solve`), per seed, at p = 8,746; other p
#   scale as p³.
#   Measured 1,224 s at p = 8,746 (stats_witness 1,178 s: 4 eigenvalue decompositions of
#   193 s each and 80-bit products; the reference 46 s), load average 8-10 on the 2 cores.
CERTIFICATE_HOST = (8_746, 1224.0, "host certificate measured at p = 8,746, benchmarks/"
                    "RESULTS.md §22 (2-core CPU under load)")
# Sizes the configs imply but do not state: CIFAR test splits, CIFAR-100 train split.
CIFAR_TEST, CIFAR100_TRAIN, CIFAR100_TEST = 10_000, 50_000, 10_000
METHODS = ("full", "retrain", "fastntk", "max_loss", "random_label")
TABLES = {"I": "cifar10", "II": "imagenet_r", "B": "appendix"}
MODES = sweep.MODES
MODE_LABELS = sweep.MODE_LABELS
# What each stage of a job is, for the plan's legend.
STAGES = {
    "full": "Full: fine-tuning on D (standard: SGD epochs; linearised: the Gram pass over D "
            "and a p x p solve, the dual's kernel over D's n·C outputs and an (n·C)² "
            "solve, or cg's jvp/vjp iterations)",
    "retrain": "Retrain: the same on D_r (closed form and dual: a solve on the Grams or the "
               "kernel Full computed)",
    "fastntk": "Fast-NTK's update (standard and cg: Jacobians of D, the dual's kernel "
               "products for the ViTs; closed form and dual: solves on the shared Grams or "
               "kernel)",
    "certificate": "the certificate of Fast-NTK's deletion on the device: matrix-free "
                   "gradient and 31 Hessian-vector products over D_r (standard, dual, cg), and the "
                   "release's cost (4 evaluations of D and the test split)",
    "certificate_host": "the certificate's exact bound on the host (closed form only)",
    "max_loss": "Max Loss", "random_label": "Random Label",
    "evaluation": "every method: inference, relearning to its 100-epoch cap (an upper "
                  "bound) and the relearning attack on D_r",
    "linear_probe": "three linear probes",
    "bn_recompute": "standard CNNs with train-mode BN: every released model's running "
                    "statistics recomputed on the data its method may see (two train-mode "
                    "passes each, and per evaluation of the release's cost)",
    "pretrain": "CIFAR-100 pre-training (160 epochs)",
    "pretrain_augment": "its crop + flip on the host",
}


@dataclasses.dataclass
class Row:
  """One grid point in one mode (all its seeds): sizes, its work in TFLOP per stage, the
  stages measured instead (seconds), and the hours."""
  table: str
  model: str
  dataset: str
  num_classes: int
  ipc: int
  seeds: int
  jobs: int
  stages: dict  # stage -> TFLOP over all seeds
  measured: dict  # stage -> (seconds over all seeds, source)
  mode: str = "standard"  # one of MODES; pre-training rows: "shared"

  def seconds(self, rate_tflops: float) -> float:
    """Every stage: its measured seconds, else its TFLOP at `rate_tflops`; plus compilation."""
    total = self.jobs * COMPILE_SECONDS
    for stage, tflop in self.stages.items():
      if stage in self.measured:
        total += self.measured[stage][0]
      else:
        total += tflop / rate_tflops
    return total

  @property
  def basis(self) -> str:
    """"measured" when every stage was, else "estimated", naming the measured stages."""
    done = [s for s in self.stages if s in self.measured]
    if len(done) == len(self.stages):
      return "measured"
    return "estimated" + (f" (measured: {', '.join(done)})" if done else "")


def _cfg(job):
  sys.path.insert(0, REPO)
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config_file(os.path.join(REPO, job.config) + ":" + job.config_arg)


def cg_iterations(num_params: int, num_outputs: int, expected: Optional[int] = None) -> int:
  """The iterations the plan counts for cg on the linearised objective: `expected` (e.g.
  measured on your data), capped by cg's own cap (`unlearn.plan.cg_iteration_budget`:
  2·min(p, n·C) + 200), which is the default: an upper bound."""
  cap = 2 * min(num_params, num_outputs) + 200
  return cap if expected is None else min(int(expected), cap)


def job_stages(job, *, cg_iters: Optional[int] = None) -> tuple[dict, dict, Optional[tuple]]:
  """(TFLOP per stage of one seed, measured seconds per stage of one seed, the
  pre-training's (TFLOP per stage, measured seconds per stage) or None) for a sweep.Job,
  from its config and mode; `cg_iters`: as `cg_iterations`' `expected`."""
  cfg = _cfg(job)
  size = cfg.data.image_size
  f = FORWARD_GFLOP[(job.model, size)] * 1e9  # FLOP per image, forward
  k, ipc = job.num_classes, job.ipc
  d, d_f = k * ipc, ipc
  d_r = d - d_f
  test = CIFAR_TEST if job.dataset == "cifar10" else k * (cfg.data.holdout_per_class or 25)
  c = k
  p = TRAINABLE[job.model](c)
  tf = 1e-12
  ft = cfg.finetune
  mode = ft.mode
  closed_form = mode == "linearized" and ft.linearized_solver == "closed_form"
  dual_fit = mode == "linearized" and ft.linearized_solver == "dual"
  kernel = lambda n: 2 * (n * c) ** 2 * p  # a kernel's products over n images' n·C outputs
  dual = kernel(d)  # the dual update's (the plan's choice for the ViTs)
  jac = (1 + c) * f  # one image's Jacobian: a forward and C backward passes
  stages, measured = {}, {}
  if mode == "standard":
    stages["full"] = ft.epochs * d * 3 * f * tf
    stages["retrain"] = ft.epochs * d_r * 3 * f * tf
    # a forward (residuals) + a Jacobian (a forward and C backward passes) per image
    stages["fastntk"] = (d * (c + 2) * f + (dual if job.model.startswith("vit") else 0)) * tf
  elif closed_form:  # the Grams of D_r and D_f at w0 once, then p x p solves
    stages["full"] = (d * jac + 2.0 * d * c * p * p + p ** 3 / 3) * tf
    stages["retrain"] = p ** 3 / 3 * tf
    stages["fastntk"] = p ** 3 * tf  # Schur solves on the shared Grams
  elif dual_fit:  # D's kernel statistics once (residuals, Jacobian rows, the kernel's
    # products), then Jᵀ(Θ + λI)⁻¹E for D and D_r and Eq. (1) from them
    stages["full"] = (d * (c + 2) * f + kernel(d) + (d * c) ** 3 / 3) * tf
    stages["retrain"] = (d_r * c) ** 3 / 3 * tf
    stages["fastntk"] = ((d_r * c) ** 3 / 3 + (d_f * c) ** 3 / 3) * tf  # Schur solves
  else:  # cg on the linearised objective: a jvp and a vjp (~4 F) per image and iteration
    stages["full"] = cg_iterations(p, d * c, cg_iters) * d * 4 * f * tf
    stages["retrain"] = cg_iterations(p, d_r * c, cg_iters) * d_r * 4 * f * tf
    stages["fastntk"] = (d * (c + 2) * f + dual) * tf  # the plan's dual, from the network
  # The certificate (run.certify_deletion): matrix-free without Gram statistics (gradient
  # ~5 F, 30 cg steps and a residual of ~4 F each per D_r image), and the accuracy of the
  # released model without noise and at the 3 ε of unlearn.release_epsilons.
  steps = 0 if closed_form else 5 + 4 * (30 + 1)
  evals = 1 + len(cfg.unlearn.release_epsilons)
  stages["certificate"] = (d_r * steps * f + evals * (d + test) * f) * tf
  if closed_form:
    p_ref, seconds, source = CERTIFICATE_HOST
    stages["certificate_host"] = 0.0
    measured["certificate_host"] = (seconds * (p / p_ref) ** 3,
                                    source + ("" if p == p_ref else ", scaled as p³"))
  # The baselines: SGD on the network; a linearised model trains on its tabulated Jacobian
  # rows (one Jacobian per image of D_f, then matrix products).
  for name in ("max_loss", "random_label"):
    epochs = cfg.baselines[name].epochs
    stages[name] = (epochs * d_f * 3 * f if mode == "standard" else d_f * jac) * tf
  # Every method: inference on D and the hold-out (f_lin: a jvp, ~2 F), relearning on D_f
  # up to its cap (an upper bound: it stops at the loss threshold), and the relearning attack
  # on D_r (a linearised model: tabulated, one Jacobian per image of D).
  step = 3 * f if mode == "standard" else 5 * f
  infer = f if mode == "standard" else 2 * f
  attack = (cfg.eval.relearn_attack.epochs * d_r * 3 * f if mode == "standard" else d * jac)
  stages["evaluation"] = len(METHODS) * ((d + test) * infer + cfg.eval.relearn.epochs * d_f *
                                         step + attack) * tf
  # three probes (fresh head on D over a frozen backbone: forward passes)
  stages["linear_probe"] = 3 * (cfg.eval.probe.epochs * d + d) * f * tf
  if mode == "standard" and ft.bn_mode == "train" and not job.model.startswith("vit"):
    # finetune.release_bn_stats: every released model's BN statistics from two train-mode
    # passes over the data its method may see (D for Full, D_r otherwise), and again for
    # each evaluation of the certified release's cost (batch_stats._batch_moments).
    stages["bn_recompute"] = (2 * ((len(METHODS) - 1) * d_r + d) + 2 * evals * d_r) * f * tf
  if job.model in MEASURED_FASTNTK and mode == "standard":
    n_ref, seconds, source = MEASURED_FASTNTK[job.model]
    measured["fastntk"] = (seconds * d / n_ref, source)  # Jacobians: linear in n
  pre = None
  if cfg.pretrain.source == "train" and cfg.pretrain.dataset == "cifar100":
    t = cfg.pretrain.train
    pre = ({"pretrain": (t.epochs * CIFAR100_TRAIN * 3 + CIFAR100_TEST) * f * tf},
           {"pretrain_augment": (t.epochs * CIFAR100_TRAIN * AUGMENT_SECONDS_PER_IMAGE,
                                 AUGMENT_SOURCE)} if t.augment == "crop_flip" else {})
  return stages, measured, pre


def plan(groups=sweep.DEFAULT_GROUPS, *, seeds=sweep.SEEDS, cifar_ipc=sweep.CIFAR10_IPC,
         imagenet_r=sweep.IMAGENET_R_SETTINGS, modes=MODES,
         cg_iters: Optional[int] = None) -> tuple[list[Row], list[Row]]:
  """(a Row per grid point and mode, a Row per shared pre-training) of the paper's grid;
  `cg_iters`: as `cg_iterations`' `expected`."""
  jobs = sweep.grid(groups, seeds=(0,), cifar_ipc=cifar_ipc, imagenet_r=imagenet_r,
                    modes=modes)
  rows, pretrains = [], {}
  for job in jobs:
    stages, measured, pre = job_stages(job, cg_iters=cg_iters)
    n = len(seeds)
    table = {v: t for t, v in TABLES.items()}[next(g for g, m, ds, cf in sweep.MODELS
                                                   if m == job.model and ds == job.dataset)]
    rows.append(Row(table, job.model, job.dataset, job.num_classes, job.ipc, n, n,
                    {s: v * n for s, v in stages.items()},
                    {s: (v[0] * n, v[1]) for s, v in measured.items()}, job.mode))
    if pre and job.model not in pretrains:
      pre_stages, pre_measured = pre
      for stage in pre_measured:
        pre_stages[stage] = 0.0  # host work: no device FLOPs, its measured seconds
      pretrains[job.model] = Row(table, job.model, "cifar100", 100, 500, 1, 0, pre_stages,
                                 pre_measured, "shared")
  return rows, list(pretrains.values())


def _h(seconds: float) -> str:
  return f"{seconds / 3600:.2f}"


def plan_markdown(rows: Sequence[Row], pretrains: Sequence[Row], rate: float) -> str:
  slow = rate / SLOW_FACTOR
  modes = sorted({r.mode for r in rows}, key=lambda m: MODES.index(m) if m in MODES else 9)
  lines = ["# Reproducing Tables I-III: the grid and its GPU hours (one GPU)", "",
           f"Modes: {', '.join(MODE_LABELS.get(m, m) for m in modes)} (each grid point runs in "
           "each; `--modes`). Every stage of every job counts (legend below): estimated from "
           f"its work (forward passes of each network, XLA's FLOP count) at {rate:g} TFLOP/s "
           f"(low) and {slow:g} TFLOP/s (high), plus {COMPILE_SECONDS:g} s of compilation per "
           "job; stages **measured** instead are named in the basis column and count their "
           "measured seconds in both columns. Table III needs no runs of its own: it is the "
           "linear probes of the Table II runs.",
           "", "| Table | Network | Data | #Classes/#IPC | Mode | Seeds | GPU h (low–high) | "
           "largest stages (TFLOP, all seeds) | basis |", "|---|---|---|---|---|---|---|---|---|"]
  total_lo = total_hi = 0.0
  for r in list(pretrains) + list(rows):
    lo, hi = r.seconds(rate), r.seconds(slow)
    total_lo += lo
    total_hi += hi
    top = sorted(r.stages.items(), key=lambda kv: -kv[1])[:3]
    basis = r.basis
    for stage, (_, source) in sorted(r.measured.items()):
      basis += f"; {stage}: {source}"
    label = sweep.MODEL_LABELS.get(r.model, r.model)
    if r.jobs == 0:
      what, setting, seeds, mode = "pre-training, CIFAR-100 (shared)", "100/500", "–", "both"
    else:
      what = sweep.DATASET_LABELS.get(r.dataset, r.dataset)
      setting, seeds, mode = f"{r.num_classes}/{r.ipc}", str(r.seeds), MODE_LABELS[r.mode]
    lines.append(f"| {r.table} | {label} | {what} | {setting} | {mode} | {seeds} | "
                 f"{_h(lo)}–{_h(hi)} | " + ", ".join(f"{s} {v:,.0f}" for s, v in top if v)
                 + f" | {basis} |")
  lines += [f"| | **total** | | | | | **{_h(total_lo)}–{_h(total_hi)}** | | |", "",
            "Stages (every one is in the hours):", ""]
  lines += [f"- `{name}`: {what}" for name, what in STAGES.items()]
  lines += ["", "Linearised mode: Full and Retrain in closed form for ResNet-110 "
            "(p = 8,746) and by the dual for MobileNetV2 and the ViTs (p = 34k-89k, whose p x "
            "p Grams do not fit beside their copies, while the kernel over D's n·C outputs "
            "does; configs/common.py). A config set to cg (finetune.linearized_solver=cg) "
            "counts its iteration cap 2·min(p, n·C) + 200 unless --cg-iterations says "
            "otherwise: an upper bound, which dominates such rows. Evaluation counts "
            "relearning to its cap of 100 epochs for every "
            "method (an upper bound). The ViTs' Fast-NTK adds the dual solver's kernel "
            "products 2(n·C)²p at the same rate (they run in float64). Host-side stages do not "
            "scale with the GPU. Override the throughput with --tflops.", ""]
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
                 ("relearn_epochs", "Relearn time (epochs)"),
                 ("avg_gap", "Avg. Gap to Retrain (UA, RA, TA, MIA-Efficacy)"),
                 ("relative_l2_to_retrain", "‖w − w_r‖ / ‖w_r − w0‖"))


def _mode_order(mode: str) -> int:
  return MODES.index(mode) if mode in MODES else len(MODES)


def _columns(points, dataset, models):
  """A column per network × setting × mode, the modes of one setting side by side."""
  cols = []
  for model in models:
    for p in sorted((p for p in points if p["model"] == model and p["dataset"] == dataset),
                    key=lambda p: (p["num_classes"], p["ipc"], _mode_order(p.get("mode")))):
      cols.append(p)
  return cols


def _column_name(p) -> str:
  mode = p.get("mode") or "standard"
  return (f"{sweep.MODEL_LABELS.get(p['model'], p['model'])} {p['num_classes']}/{p['ipc']} "
          f"{MODE_LABELS.get(mode, mode)}")


def _header(cols, first="") -> list[str]:
  names = [_column_name(p) for p in cols]
  return [f"| {first} | | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(cols)]


def _fmt_metric(key: str, stat: Optional[dict]) -> str:
  if key == "relative_l2_to_retrain" and stat and stat.get("mean") is not None:
    return f"{stat['mean']:.2g} ± {stat['std']:.1g}"
  return _fmt(stat)


def results_table(title: str, points, dataset: str, models: Sequence[str]) -> list[str]:
  """A Table I/II: row groups per metric, a row per method, a column per network × setting ×
  mode, the modes side by side (the layout of the paper's surviving Table III). The paper's
  values did not survive."""
  cols = _columns(points, dataset, models)
  if not cols:
    return [f"## {title}", "", "No results for this table yet.", ""]
  lines = [f"## {title}", "", *_header(cols, "Metric")]
  for key, label in TABLE_METRICS:
    for m in METHODS:
      if key in ("avg_gap", "relative_l2_to_retrain") and m == "retrain":
        continue  # zero by definition
      cells = [_fmt_metric(key, p["methods"].get(m, {}).get(key)) for p in cols]
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
            "Mean ± std over seeds (%; relearn in epochs, capped at 100; Avg. Gap in points). "
            "Standard: the paper's SGD fine-tuning; linearised: the exact mode (Full and "
            "Retrain are the network linearised at w0 trained to its ridge minimiser, where "
            "Fast-NTK equals Retrain up to round-off). The paper's values for this table did "
            "not survive text extraction.", ""]
  return lines


def table3(points) -> list[str]:
  """Table III: linear probing on the ImageNet-R runs, a column per setting and mode (the
  modes side by side), the paper's value beside ours in each."""
  cols = _columns(points, "imagenet_r", ("vit_s16", "vit_b16"))
  by_key = {(p["model"], p["num_classes"], p["ipc"], p.get("mode") or "standard"): p
            for p in cols}
  keys = list(by_key)
  for model, k, n in PAPER_TABLE3:  # the paper's columns even where we have no run yet
    if not any(key[:3] == (model, k, n) for key in keys):
      keys.append((model, k, n, None))
  keys.sort(key=lambda key: (key[0] != "vit_s16", key[1], key[2],
                             _mode_order(key[3]) if key[3] else -1))
  names = [f"{sweep.MODEL_LABELS[m]} {k}/{n}" + (f" {MODE_LABELS.get(mode, mode)}" if mode else "")
           for m, k, n, mode in keys]
  lines = ["## Table III: linear probing (fresh head on D, backbone frozen)", "",
           "| Acc on | Backbone | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
  for index, (metric, label) in enumerate((("probe_acc_retain", "D_r"),
                                           ("probe_acc_forget", "D_f"))):
    for kind, kind_label in PROBE_ROWS:
      cells = []
      for key in keys:
        ours = _fmt((by_key.get(key) or {}).get("probes", {}).get(kind, {}).get(metric))
        paper = PAPER_TABLE3.get(key[:3], {}).get(kind)
        cells.append(f"{ours} (paper {_paper(paper[index])})" if paper else ours)
      lines.append(f"| {label} | {kind_label} | " + " | ".join(cells) + " |")
  lines += ["", "Ours: mean ± std over seeds, per mode; in parentheses the paper's Table III "
            "(its protocol: standard fine-tuning).", ""]
  return lines


# The (dataset, models) each table holds: a result elsewhere has no place in them.
TABLE_PLACES = (("cifar10", ("resnet110", "mobilenetv2")), ("imagenet_r", ("vit_s16", "vit_b16")),
                ("cifar10", ("vit_b16",)))


def _placed(point: dict) -> bool:
  return any(point["dataset"] == ds and point["model"] in models
             for ds, models in TABLE_PLACES)


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
  left = merged.get("left_out") or []
  if left:
    out += ["## Results in no table of the paper", ""]
    out += [f"- {p['model']} on {p['dataset']} ({p['num_classes']} classes, {p['ipc']} per "
            f"class), {MODE_LABELS.get(p['mode'], p['mode'])}: {', '.join(p['sources'])}"
            for p in left]
    out += [""]
  return "\n".join(out)


def write_tables(paths: Sequence[str], out_dir: str, modes: Sequence[str] = MODES) -> str:
  """Merges the results.json files under `paths` (keeping the runs of `modes`) into
  out_dir/tables.md and tables.json; returns the markdown's path.

  Raises:
    ValueError: no results, or none in `modes` (the message names the modes found).
  """
  merged = sweep.merge(paths)
  found = sorted({p["mode"] for p in merged["points"]}, key=_mode_order)
  merged["points"] = [p for p in merged["points"] if p["mode"] in modes]
  if not merged["points"]:
    raise ValueError(f"no results in mode(s) {list(modes)} under {list(paths)} (found: "
                     f"{found}); pass --modes={','.join(found)}")
  merged["left_out"] = [p for p in merged["points"] if not _placed(p)]
  if len(merged["left_out"]) == len(merged["points"]):
    raise ValueError(
        "no result under " + str(list(paths)) + " has a place in the paper's tables (Table I: "
        "ResNet-110/MobileNetV2 on CIFAR-10; II and III: ViTs on ImageNet-R; Appendix B: "
        "ViT-B/16 on CIFAR-10); found: " + "; ".join(
            f"{p['model']} on {p['dataset']}" for p in merged["left_out"]))
  for p in merged["left_out"]:
    print(f"reproduce: {p['model']} on {p['dataset']} ({', '.join(p['sources'])}) has no place "
          "in the paper's tables; listed at the end of tables.md", file=sys.stderr)
  merged["modes"] = [m for m in MODES if m in modes]
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


MODES_HELP = (f"comma-separated fine-tuning modes: {','.join(MODES)} (default: both, side "
              "by side)")


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
  p_plan.add_argument("--modes", type=sweep.modes_arg, default=MODES, help=MODES_HELP)
  p_plan.add_argument("--cg-iterations", type=int, default=None,
                      help="iterations to count for cg in the linearised mode (default: its "
                      "cap 2·min(p, n·C) + 200, an upper bound)")
  p_plan.add_argument("--json", action="store_true", help="print the rows as JSON")
  sub.add_parser("run", help="run the grid: launch/sweep.py's flags", add_help=False)
  p_tab = sub.add_parser("tables", help="merge results.json files into the paper's tables")
  p_tab.add_argument("paths", nargs="+")
  p_tab.add_argument("--out", default=".")
  p_tab.add_argument("--modes", type=sweep.modes_arg, default=MODES, help=MODES_HELP)
  if argv and argv[0] == "run":
    return sweep.main(argv[1:])
  args = ap.parse_args(argv)
  if args.command == "plan":
    rows, pre = plan([g for g in args.groups.split(",") if g], seeds=args.seeds,
                     cifar_ipc=args.cifar_ipc, modes=args.modes, cg_iters=args.cg_iterations)
    if args.json:
      print(json.dumps([dataclasses.asdict(r) | {"hours_low": r.seconds(args.tflops) / 3600,
                                                 "hours_high": r.seconds(
                                                     args.tflops / SLOW_FACTOR) / 3600,
                                                 "basis": r.basis}
                        for r in pre + rows], indent=1))
    else:
      print(plan_markdown(rows, pre, args.tflops))
    return 0
  try:
    path = write_tables(args.paths, args.out, args.modes)
  except ValueError as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  print(open(path).read(), end="")
  print(f"Wrote {path} and {os.path.join(os.path.dirname(path), 'tables.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
