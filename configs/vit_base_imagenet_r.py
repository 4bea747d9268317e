"""ViT-B/16 with K/V prompts on ImageNet-R subsets (paper Table II).

Command (GPU; ImageNet-R prepared with TFDS; AugReg ViT-B/16 checkpoint at
checkpoints/ViT-B_16.npz):
  python -m fastntk_jax.main --config=configs/vit_base_imagenet_r.py:classes=20,ipc=50 \
      --workdir=wd_vitb_20_50

Trainable: prompts (L=4, 12 blocks: 73,728) + head (20 classes: 15,380) = 89,108 of 85.9M
parameters (0.10%). With p ≈ 89k, p² in float32 is 32 GB: `solver="auto"` picks dual for
n·C up to ~10⁴–10⁵ (the kernel is (n·C)²) and cg beyond.

Expected (the paper's claim, not measured here): Fast-NTK ≈ Retrain on D_f, close on D_r.

Arguments: `classes=K` (default 20), `ipc=N` (default 20), `tiny`.
"""

from fastntk_jax.config import parse_arg, vit_prompt_config


def get_config(arg=None):
  a = parse_arg(arg, {"classes": 20, "ipc": 20})
  return vit_prompt_config("vit_b16", "imagenet_r", a["classes"], a["ipc"],
                           "checkpoints/ViT-B_16.npz", a["tiny"])
