"""MobileNet-v2 (CIFAR variant) on CIFAR-10, BN scale/bias + head trainable (paper Table I).

Command (GPU recommended; CIFAR-100/CIFAR-10 prepared with TFDS first, see BUILD.md):
  python -m fastntk_jax.main --config=configs/mobilenetv2_cifar10.py:ipc=100 --workdir=wd_mbv2

Pipeline as configs/resnet110_cifar10.py: pre-train on CIFAR-100 (the same recipe, its test
accuracy reported; shared between runs with --config.pretrain.cache_dir), fine-tune BN
scale/bias + a fresh head (p = 46,922 of 2.24M, 2.10%) on #IPC images per class, forget
class 0.
With p ≈ 47k, `solver="auto"` picks dual for small n·C and cg/dual when p² does not fit.

Expected (the paper's claim, not measured here): Fast-NTK ≈ Retrain on D_f (≈0%) and within a
few points on D_r and the retain-class test set.

Arguments: `ipc=N` (default 100), `width=W` (width multiplier ×100, default 100), `tiny`.

Backbone without the CIFAR-100 pre-training: chenyaofo's public CIFAR-100 MobileNetV2 is this
network (load_cifar_mobilenetv2 in fastntk_jax/models/torch_import.py):
  python -m fastntk_jax.pretrained_files download mobilenetv2_x1_0-cifar100
  ... --config.pretrain.source=state_dict --config.data.normalization=cifar100
  --config.pretrain.path=checkpoints/cifar100_mobilenetv2_x1_0-1311f9ff.pt
(`.pt` needs torch: pip install -e '.[torch]', or convert it once to .npz). Its inputs were
normalised with CIFAR-100's mean/std, hence `cifar100`, not the `cifar` default.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/common.py, beside
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from fastntk_jax.config import base_config


def get_config(arg=None):
  a = common.parse_arg(arg, {"ipc": 100, "width": 100})
  c = base_config()
  common.paper_methods(c)
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.images_per_class = a["ipc"]
  c.model.name = "mobilenetv2"
  c.model.options = {"width_mult": a["width"] / 100.0}
  # The same pre-training recipe as ResNet-110 (common.cifar_pretrain_recipe; weight decay
  # 5e-4, as the common CIFAR MobileNetV2 code, instead of ImageNet's 4e-5).
  common.cifar_pretrain_recipe(c, "cifar100")
  c.finetune.epochs = 40
  c.finetune.learning_rate = 0.002
  c.unlearn.batch_size = 128
  # Float64 solve, as ResNet-110 (whose float32 solve at 5,000 images was 71% off): p here
  # is 5x larger.
  c.unlearn.solve_dtype = "float64"
  if a["tiny"]:
    c.unlearn.solve_dtype = "float32"  # in-process tests (see resnet110_cifar10.py)
    common.tiny_cifar_cnn(c)
    # Three of the 17 inverted-residual blocks: seconds to compile, every kind of block kept
    # (stride 1 with and without expansion, stride 2).
    c.model.options = {"width_mult": 0.25, "last_channel": 32,
                       "block_settings": ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 1, 1))}
  return c
