"""ViT-B/16 with K/V prompts on ImageNet-R subsets (paper Table II and Table III).

Command (GPU; ImageNet-R prepared with TFDS; the AugReg ViT-B/16 file downloaded into
checkpoints/, see README "Reproducing the paper"):
  python -m fastntk_jax.main --config=configs/vit_base_imagenet_r.py:classes=20,ipc=50 \
      --workdir=wd_vitb_20_50

Classes and the forgotten class are drawn at random per seed as in
configs/vit_small_imagenet_r.py (`random=0`: the first #classes and label 0). Trainable:
prompts (L=4, 12 blocks: 73,728) + head (20 classes: 15,380) = 89,108 of 85.9M parameters
(0.10%). With p ≈ 89k, p² in float64 is 63 GB: `solver="auto"` picks the dual (kernel
(n·C)²: 20,000² for 20/50, 50,000² = 20 GB in float64 for 50/20) and cg beyond; the solve
is in float64 (benchmarks/RESULTS.md §8 measures float32 against it at p = 89,108).

Weights (`weights=`): i1k (default) =
  checkpoints/B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz
i21k_i1k = B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz,
i21k = B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz; all from
https://storage.googleapis.com/vit_models/augreg/. The original (non-AugReg)
imagenet21k/ViT-B_16.npz also loads: its `pre_logits` layer is dropped with a log line.

Expected (the paper's claim, not measured here): Fast-NTK ≈ Retrain on D_f, close on D_r.

Exact mode, `linearized` (configs/common.py `linearized`):
  python -m fastntk_jax.main --config=configs/vit_base_imagenet_r.py:classes=20,ipc=50,linearized \
      --workdir=wd_vitb_20_50_lin
Full and Retrain are the linearised network's ridge minimiser from the kernel over D's n·C
outputs (finetune.linearized_solver="dual"): p = 89,108, one p x p Gram 59.2 GiB in float64
(the closed form does not fit), the kernel (n·C)² as above (20 GB in float64 at 50/20, and
as much for its Cholesky factor, plus D's Jacobian rows kept in float32, 17.8 GB: an 80 GB
device), from the Jacobians of D and one vjp.
Fast-NTK's update: the plan's dual as above, its certificate matrix-free. Where (n·C)² does
not fit, `--config.finetune.linearized_solver=cg` (vectors of p and n·C; a jvp and a vjp
over D per iteration, ~4 x 35.3 GFLOP per image, up to 2·min(p, n·C) + 200 iterations).

Arguments: `classes=K` (default 20), `ipc=N` (default 20), `random=1|0`,
`weights=i1k|i21k_i1k|i21k`, `linearized`, `tiny`.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position


def get_config(arg=None):
  a = common.parse_arg(arg, {"classes": 20, "ipc": 20, "random": 1, "weights": "i1k"},
                       {"weights": common.VIT_WEIGHTS}, flags=("linearized",))
  return common.vit_prompt_config("vit_b16", "imagenet_r", a["classes"], a["ipc"],
                                  common.vit_checkpoint("vit_b16", a["weights"]), a["tiny"],
                                  random_classes=bool(a["random"]),
                                  linearized_mode=a["linearized"])
