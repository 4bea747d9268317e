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

Arguments: `ipc=N` (default 50), `weights=i1k|i21k_i1k|i21k` (default i1k), `tiny`.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position


def get_config(arg=None):
  a = common.parse_arg(arg, {"ipc": 50, "weights": "i1k"}, {"weights": common.VIT_WEIGHTS})
  c = common.vit_prompt_config("vit_b16", "cifar10", None, a["ipc"],
                               common.vit_checkpoint("vit_b16", a["weights"]), a["tiny"])
  c.data.normalization = "vit"
  return c
