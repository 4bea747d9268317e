"""Unlearning time vs Retrain time at the paper's scale: ResNet-110, 4,500 retained images.

    python -m benchmarks.bench_retrain_ratio --out benchmarks/results

Retrain = fine-tuning the trainable collection (BN scale/bias + head) on D_r from w0 with the
protocol of `configs/resnet110_cifar10.py` (`finetune`: SGD, lr 0.002, batch 64, squared loss,
BN in train mode, 40 epochs), through the library's own `train.fit`. Running all 40 epochs
would take about an hour here, so this runs `--epochs` of them (default 3), takes the
steady-state epoch time (the fastest epoch after the first, which includes compilation) and
extrapolates to the protocol's epoch count, labelled as such. The unlearning time is read from
`fastntk_cpu_5000.json` (the measured 5,000-image Fast-NTK run in the same folder).

Same network as that run (`common.build_resnet`: random frozen convs, BatchNorm statistics of
128 random images), random 32x32 inputs. Writes retrain_ratio.{md,json,png}.
"""

import argparse
import json
import sys
import time

import numpy as np

from benchmarks import common
from fastntk_jax import config as config_lib
from fastntk_jax import train


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--n-retain", type=int, default=4500)
  ap.add_argument("--epochs", type=int, default=3, help="epochs actually run (>= 2)")
  ap.add_argument("--model", default="resnet110")
  args = ap.parse_args(argv)
  if args.epochs < 2:
    sys.exit("bench_retrain_ratio: --epochs must be >= 2 (the first one compiles)")
  out = common.Path(args.out)
  info = common.machine_info()
  cfg = config_lib.load_config_file(str(common.REPO_ROOT / "configs" / "resnet110_cifar10.py"))
  protocol = train.TrainSpec.from_config(cfg.finetune)
  spec = train.TrainSpec.from_config(cfg.finetune, epochs=args.epochs)
  c = 10
  calib_x, _ = common.random_data(128, c, 1000, 0)
  model, w0, frozen = common.build_resnet(args.model, c, None, 0, calib_x)
  x, y = common.random_data(args.n_retain, c, 0, 0)
  stamps = [time.perf_counter()]
  losses = []

  def progress(epoch, loss):
    stamps.append(time.perf_counter())
    losses.append(loss)
    print(f"epoch {epoch + 1}/{args.epochs}: {stamps[-1] - stamps[-2]:.1f} s, loss {loss:.4f}",
          flush=True)

  train.fit(model, w0, frozen, (x, y), spec, c, seed=0, progress=progress)
  epoch_s = np.diff(stamps)
  steady = float(np.min(epoch_s[1:]))
  retrain_s = steady * protocol.epochs + (epoch_s[0] - steady)  # + the first epoch's compile
  record = {"machine": info, "args": vars(args), "protocol": protocol.describe(),
            "protocol_epochs": protocol.epochs, "epoch_seconds": epoch_s.tolist(),
            "losses": losses, "steady_epoch_s": steady,
            "retrain_extrapolated_s": retrain_s}
  unlearn_path = out / "fastntk_cpu_5000.json"
  unlearn = json.loads(unlearn_path.read_text()) if unlearn_path.exists() else None
  rows = [["Retrain: one fine-tuning epoch on D_r (steady state)", f"{steady:.1f}", "measured"],
          ["Retrain: the first epoch (includes compilation)", f"{epoch_s[0]:.1f}", "measured"],
          [f"Retrain: {protocol.epochs} epochs (the protocol)", f"{retrain_s:.0f}",
           f"**extrapolated** from {args.epochs} measured epochs"]]
  if unlearn is not None:
    total = unlearn["total_wall_s"]
    solve32 = unlearn["phases"]["primal solve, float32 (2 Cholesky of p×p)"]["wall_s"]
    fastntk = total - solve32  # the float64 path alone (the float32 solve was the check)
    record.update(fastntk_s=fastntk, ratio=fastntk / retrain_s)
    rows += [[f"Fast-NTK: the whole update, {unlearn['n']:,} images (float64 solve)",
              f"{fastntk:.0f}", "measured (fastntk_cpu_5000.json)"],
             ["**unlearn / Retrain**", f"**{fastntk / retrain_s:.2f}**", ""]]
  lines = ["# Unlearning time vs Retrain time, ResNet-110 BN+head, this machine", "",
           "    python -m benchmarks.bench_retrain_ratio " + " ".join(argv or sys.argv[1:]), "",
           common.machine_markdown(info), "",
           f"Retrain protocol: {protocol.describe()}, {protocol.epochs} epochs, "
           f"{args.n_retain:,} images. Epoch times: "
           + ", ".join(f"{t:.1f}" for t in epoch_s) + " s.", "",
           common.markdown_table(["what", "seconds", "basis"], rows), ""]
  text = "\n".join(lines)
  common.atomic_write(out / "retrain_ratio.md", text)
  common.atomic_write(out / "retrain_ratio.json", json.dumps(record, indent=1, default=str))
  if unlearn is not None:
    plot(record, out / "retrain_ratio.png")
  print(text)


def plot(record: dict, path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 2.6))
  names = [f"Retrain ({record['protocol_epochs']} epochs, extrapolated)", "Fast-NTK (measured)"]
  vals = [record["retrain_extrapolated_s"] / 60, record["fastntk_s"] / 60]
  ax.barh(names, vals, color=["C7", "C0"])
  for yy, v in enumerate(vals):
    ax.text(v, yy, f" {v:.0f} min", va="center", fontsize=9)
  ax.set_xlim(0, max(vals) * 1.2)
  ax.set_xlabel("minutes on this CPU")
  ax.set_title(f"ResNet-110 BN+head, 5,000 images: unlearn / Retrain = {record['ratio']:.2f}",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
