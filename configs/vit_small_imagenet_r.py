"""ViT-S/16 with K/V prompts on ImageNet-R subsets (paper Table II).

Command (GPU; ImageNet-R prepared with TFDS, see BUILD.md; the AugReg ViT-S/16 ImageNet-21k
checkpoint downloaded from the vision_transformer bucket to checkpoints/ViT-S_16.npz):
  python -m fastntk_jax.main --config=configs/vit_small_imagenet_r.py:classes=20,ipc=50 \
      --workdir=wd_vits_20_50

The paper's grid is #classes/#IPC ∈ {20/20, 20/50, 50/20}; one class (label 0) is forgotten.
Trainable: prompts (L=4 per block, 12 blocks: 2·L·D·12 = 36,864) + head (20 classes:
7,700) = 44,564 of 21.7M parameters (0.21%).

Expected (the paper's claim, not measured here): Fast-NTK's D_f accuracy ≈ Retrain's,
D_r accuracy close to Retrain's.

Arguments: `classes=K` (default 20), `ipc=N` (default 20), `tiny` (2-layer 16-wide ViT on
32x32 images, random backbone; run under tfds.testing.mock_data).
"""

from fastntk_jax.config import parse_arg, vit_prompt_config


def get_config(arg=None):
  a = parse_arg(arg, {"classes": 20, "ipc": 20})
  return vit_prompt_config("vit_s16", "imagenet_r", a["classes"], a["ipc"],
                           "checkpoints/ViT-S_16.npz", a["tiny"])
