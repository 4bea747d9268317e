"""ViT-B/16 with K/V prompts on CIFAR-10 (paper Appendix B), class 0 forgotten.

Command (GPU; CIFAR-10 prepared with TFDS; the AugReg ViT-B/16 file in checkpoints/, see
configs/vit_base_imagenet_r.py for the published names):
  python -m fastntk_jax.main --config=configs/vit_base_cifar10.py:ipc=50 --workdir=wd_vitb_c10

Images are resized 32→224 (position embeddings of the checkpoint are used as is at 224;
they are resampled automatically if image_size is changed). Trainable: prompts (73,728) +
head (10 classes: 7,690) = 81,418 of 85.9M parameters (0.09%). Float64 solve, as the other
ViT configs.

Expected (the paper's claim, not measured here): Fast-NTK ≈ Retrain on D_f (≈0%), close on
D_r and the retain-class test set.

Exact mode, `linearized` (configs/common.py `linearized`):
  python -m fastntk_jax.main --config=configs/vit_base_cifar10.py:ipc=50,linearized \
      --workdir=wd_vitb_c10_lin
from the kernel over D's n·C outputs (finetune.linearized_solver="dual"): p = 81,418, one
p x p Gram 49.4 GiB in float64 (the closed form does not fit), while the kernel is
(n·C)² = 5,000² in float64: 0.19 GiB, from the Jacobians of D (a forward and C backward
passes of 35.3 GFLOP per image) and one vjp. Fast-NTK's update: the plan's dual on the same
kernel sizes, its certificate matrix-free. `--config.finetune.linearized_solver=cg` is the
matrix-free alternative (a jvp and a vjp over D per iteration, up to 2·min(p, n·C) + 200).

Arguments: `ipc=N` (default 50), `weights=i1k|i21k_i1k|i21k` (default i1k), `linearized`,
`tiny`.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position


def get_config(arg=None):
  a = common.parse_arg(arg, {"ipc": 50, "weights": "i1k"}, {"weights": common.VIT_WEIGHTS},
                       flags=("linearized",))
  c = common.vit_prompt_config("vit_b16", "cifar10", None, a["ipc"],
                               common.vit_checkpoint("vit_b16", a["weights"]), a["tiny"],
                               linearized_mode=a["linearized"])
  c.data.normalization = "vit"
  return c
