"""What linearised fine-tuning costs and gives on other networks than the default's.

On the embedded digits data (class 0 forgotten), per network: the paper's SGD protocol
(`configs/default.py:standard`: squared loss, lr 0.002, BN in train mode, 40 epochs) against
linearised fine-tuning at w0 in closed form (the default): Full's test accuracy on the retained
classes (what linearity costs), and Fast-NTK's Avg. Gap and relative parameter distance to
Retrain (what it gives). Networks: the default ResNet-8 (projection shortcuts, BN scale/bias +
head), a CIFAR-style ResNet-20 (option-A shortcuts, widths 8/16/32) and a small prompted ViT
(2 layers, width 32, patch 4, 4 prompts per block; prompts + head trainable, pre-trained with
AdamW). One backbone per network, pre-trained once and shared by its cells. Writes
linearized_models.{json,md} into --out.

    python -m benchmarks.linearized_models --out benchmarks/results/linearized_models
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import regime_map  # pylint: disable=wrong-import-position


def _resnet20(cfg):
  cfg.model.name = "resnet20"
  cfg.model.options = ml_collections.ConfigDict({"shortcut": "A", "widths": (8, 16, 32)})


def _vit(cfg):
  cfg.model.name = "vit_ti16"
  cfg.model.options = ml_collections.ConfigDict(dict(
      patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, prompt_length=4))
  cfg.pretrain.train.optimizer = "adam"
  cfg.pretrain.train.learning_rate = 1e-3
  cfg.pretrain.train.weight_decay = 1e-4


NETWORKS = {"resnet8": None, "resnet20": _resnet20, "vit": _vit}
DESCRIPTION = {"resnet8": "ResNet-8, projection shortcuts (the default)",
               "resnet20": "ResNet-20, option-A shortcuts, widths 8/16/32",
               "vit": "prompted ViT, 2 layers, width 32, patch 4, 4 prompts/block"}


def write(rows: list, out: str, command: str) -> None:
  with open(os.path.join(out, "linearized_models.json"), "w") as f:
    json.dump({"command": command, "rows": rows}, f, indent=1)
  lines = ["# Linearised vs standard fine-tuning on three networks (digits, class 0 forgotten)",
           "", f"Command: `{command}`", "",
           "| network | fine-tuning | seed | Full TA | Retrain TA | Fast-NTK UA / Retrain UA | "
           "Fast-NTK Avg. Gap (points) | ‖w−w_r‖/‖w_r−w0‖ |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {DESCRIPTION[r['network']]} | {r['mode']} | {r['seed']} | "
                 f"{r['full_ta']:.1f} | {r['retrain_ta']:.1f} | "
                 f"{r['fastntk_ua']:.1f} / {r['retrain_ua']:.1f} | {r['avg_gap']:.2f} | "
                 f"{r['rel_dist']:.1e} |")
  with open(os.path.join(out, "linearized_models.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="benchmarks/results/linearized_models")
  ap.add_argument("--networks", default="resnet8,resnet20,vit", type=lambda s: s.split(","))
  ap.add_argument("--seeds", default="0,1", type=lambda s: [int(v) for v in s.split(",")])
  ap.add_argument("--workdir", default="workdir_linearized_models",
                  help="one pipeline workdir per cell (kept: a rerun resumes)")
  args = ap.parse_args(argv)
  unknown = set(args.networks) - set(NETWORKS)
  if unknown:
    ap.error(f"unknown networks {sorted(unknown)}; choose from {sorted(NETWORKS)}")
  os.makedirs(args.out, exist_ok=True)
  command = "python -m benchmarks.linearized_models " + " ".join(
      argv if argv else sys.argv[1:])
  rows = []
  for net in args.networks:
    pretrained = ""
    for seed in args.seeds:
      for mode in ("linearized", "standard"):
        workdir = os.path.join(args.workdir, f"{net}_{mode}_{seed}")
        row = regime_map.cell(mode, "class", 0.002, "mse", "train", 0.01, seed, workdir,
                              pretrained=pretrained, edit=NETWORKS[net])
        pretrained = pretrained or os.path.join(os.path.abspath(workdir), "pretrain")
        rows.append({"network": net, **row})
        print(f"{net} {mode} seed {seed}: Full TA {row['full_ta']:.1f}, Fast-NTK Avg. Gap "
              f"{row['avg_gap']:.2f}, rel. distance {row['rel_dist']:.1e} "
              f"({row['seconds']:.0f} s)", flush=True)
        write(rows, args.out, command)


if __name__ == "__main__":
  main()
