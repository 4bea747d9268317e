"""ViT-S/16 with K/V prompts on ImageNet-R subsets (paper Table II and Table III).

Command (GPU; ImageNet-R prepared with TFDS, see BUILD.md; the AugReg ViT-S/16 file
downloaded into checkpoints/, see README "Reproducing the paper"):
  python -m fastntk_jax.main --config=configs/vit_small_imagenet_r.py:classes=20,ipc=50 \
      --workdir=wd_vits_20_50

The paper's grid is #classes/#IPC ∈ {20/20, 20/50, 50/20}. As in the paper, every seed draws
its #classes classes at random among ImageNet-R's 200 (among those with enough images for
the hold-out of 25 + #IPC) and forgets one of them at random (`random=0`: the first #classes
classes and label 0 for every seed). Trainable: prompts (L=4 per block, 12 blocks:
2·L·D·12 = 36,864) + head (20 classes: 7,700) = 44,564 of 21.7M parameters (0.21%).

Weights (`weights=`): i1k (default; the paper: "pre-trained on ImageNet-1K") =
  checkpoints/S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz
i21k_i1k = S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz,
i21k = S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz; all from
https://storage.googleapis.com/vit_models/augreg/ (common.VIT_CHECKPOINTS). Any other file:
--config.pretrain.path=...; names kept at init: --config.pretrain.dont_load='("head/.*",)'.

Expected (the paper's claim, not measured here): Fast-NTK's D_f accuracy ≈ Retrain's,
D_r accuracy close to Retrain's; Table III's linear probe of Fast-NTK near 0% on D_f.

Exact mode, `linearized` (configs/common.py `linearized`):
  python -m fastntk_jax.main --config=configs/vit_small_imagenet_r.py:classes=20,ipc=50,linearized \
      --workdir=wd_vits_20_50_lin
Full and Retrain are the network linearised at w0 trained to its ridge minimiser, from the
kernel over D's n·C outputs (finetune.linearized_solver="dual"): p = 44,564 (20 classes), so
one p x p Gram is 14.8 GiB in float64: the closed form would hold three or four on the
device, and its certificate's exact bound two 80-bit copies (59 GiB) and p³-order eigenvalue
decompositions on the host (hours, estimated by p³ from benchmarks/RESULTS.md §22); the
kernel is (n·C)² in float64: 0.5 GiB at 20/20, 3.0 GiB at 20/50, 18.6 GiB at 50/20, from the
Jacobians of D (a forward and C backward passes of 9.28 GFLOP per image) and one vjp.
Fast-NTK's update is the plan's dual on the same kernel sizes, its certificate matrix-free.
`--config.finetune.linearized_solver=cg` is the matrix-free alternative (a jvp and a vjp
over D per iteration for up to 2·min(p, n·C) + 200 iterations: the cap `launch/reproduce.py
plan` counts).

Arguments: `classes=K` (default 20), `ipc=N` (default 20), `random=1|0` (default 1),
`weights=i1k|i21k_i1k|i21k`, `linearized`, `tiny` (2-layer 16-wide ViT on 32x32 images,
random backbone; run under tfds.testing.mock_data).
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position


def get_config(arg=None):
  a = common.parse_arg(arg, {"classes": 20, "ipc": 20, "random": 1, "weights": "i1k"},
                       {"weights": common.VIT_WEIGHTS}, flags=("linearized",))
  return common.vit_prompt_config("vit_s16", "imagenet_r", a["classes"], a["ipc"],
                                  common.vit_checkpoint("vit_s16", a["weights"]), a["tiny"],
                                  random_classes=bool(a["random"]),
                                  linearized_mode=a["linearized"])
