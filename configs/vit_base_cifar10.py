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

A small prompted ViT on digits, `digits` (no downloads; configs/common.py
`digits_at_paper_architecture`): this config's protocol (K/V prompts in every block + head
trainable, 20 epochs of SGD at lr 0.01, batch 32; or `linearized`) on a ViT of 2 blocks,
width 32, patch 4, 2 heads, MLP 64, 4 prompts per block (p = 842: 512 prompt numbers + the
head's 330), pre-trained from scratch with AdamW for 30 epochs on 50 digits per class, on
scikit-learn's digits at 32x32x3, #IPC 5, class 0 forgotten. The README's table ("Digits at
the paper's architectures") runs
  python -m fastntk_jax.main --config=configs/vit_base_cifar10.py:digits[,linearized] \
      --config.eval.relearn.epochs=1 --config.eval.relearn_attack.epochs=0 \
      --config.eval.probe.epochs=1 --config.unlearn.release_epsilons='()' --workdir=wd_vit

Arguments: `ipc=N` (default 50; 5 with `digits`), `weights=i1k|i21k_i1k|i21k` (default i1k),
`linearized`, `digits`, `tiny`.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position


# `:digits`: images per class of D, pre-training epochs, and the small ViT (see the docstring).
DIGITS_IPC = 5
DIGITS_PRETRAIN_EPOCHS = 30
DIGITS_VIT = {"patch_size": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
              "mlp_dim": 64, "prompt_length": 4}


def get_config(arg=None):
  a = common.parse_arg(arg, {"ipc": None, "weights": "i1k"}, {"weights": common.VIT_WEIGHTS},
                       flags=("linearized", "digits"))
  c = common.vit_prompt_config("vit_b16", "cifar10", None, a["ipc"] or 50,
                               common.vit_checkpoint("vit_b16", a["weights"]), a["tiny"],
                               linearized_mode=a["linearized"])
  c.data.normalization = "vit"
  if a["digits"]:
    if a["weights"] != "i1k":
      raise ValueError(f"vit_base_cifar10.py: weights={a['weights']} with digits: the small "
                       "ViT is pre-trained from scratch on digits, not loaded")
    common.digits_at_paper_architecture(c, ipc=a["ipc"] or DIGITS_IPC,
                                        pretrain_epochs=DIGITS_PRETRAIN_EPOCHS)
    c.pretrain.path = ""
    c.pretrain.train.weight_decay = 1e-4  # as benchmarks/linearized_models.py's ViT
    c.model.name = "vit_ti16"  # the ViT family; its size from DIGITS_VIT
    c.model.options = dict(DIGITS_VIT)
    if a["tiny"]:  # no TFDS: 4 digit classes, 12 pre-training images each, 2 epochs
      c.data.num_classes = 4
      c.data.pretrain_per_class = 12
      c.data.images_per_class = 2
      c.pretrain.train.epochs = 2
  return c
