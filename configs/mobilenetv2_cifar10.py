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

Exact mode, `linearized` (docs/derivation.md §5; configs/common.py `linearized`):
  python -m fastntk_jax.main --config=configs/mobilenetv2_cifar10.py:ipc=100,linearized \
      --workdir=wd_mbv2_lin
Full and Retrain are the network linearised at w0 trained to its ridge minimiser, from the
kernel over the set's n·C outputs (finetune.linearized_solver="dual": w0 + Jᵀ(Θ + λI)⁻¹E):
p = 46,922 (34,112 BN scale/bias + the 12,810 of the head), so one p x p Gram is 16.4 GiB
in float64 and the closed form would hold ~7 of them (the Grams of D_r and D_f, a factor,
the certificate's 80-bit copies: ~115 GiB) plus p³-order eigenvalue decompositions on the
host, while the kernel is (n·C)² (n·C = 10,000 at #IPC 100: 0.75 GiB in float64), from the
Jacobians of D (a forward and C backward passes per image) and one vjp. Conjugate gradients
(`--config.finetune.linearized_solver=cg`, matrix-free) cost a jvp and a vjp over D per
iteration for up to 2·min(p, n·C) + 200 iterations: measured 8.2 s an iteration at 50
digits on this 2-core CPU (benchmarks/results/issue25/cg_iteration_mobilenetv2_50.json), so
hours where the dual takes minutes. Fast-NTK's update is the plan's choice
(unlearn.solver="auto"): the dual while (n·C)² fits. The certificate is then matrix-free (a
gradient and 31 Hessian-vector products over D_r). Measured here (2-core CPU, digits): see
the README's "Digits at the paper's architectures".

Digits at this architecture, `digits`: as configs/resnet110_cifar10.py's (scikit-learn's
digits at 32x32x3, MobileNetV2 pre-trained from scratch on 50 digits per class for 8
epochs (AdamW), D = #IPC per class, default 5, class 0 forgotten); the README runs
  python -m fastntk_jax.main --config=configs/mobilenetv2_cifar10.py:digits \
      --config.eval.relearn.epochs=1 --config.eval.relearn_attack.epochs=0 \
      --config.eval.probe.epochs=1 --config.unlearn.release_epsilons='()' --workdir=wd_mbv2

Arguments: `ipc=N` (default 100; 5 with `digits`), `width=W` (width multiplier ×100,
default 100), `linearized`, `digits`, `tiny` (with `digits`: 4 digit classes, no TFDS).
Arguments combine: `:digits,linearized`.

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

# `:digits`: images per class of D and pre-training epochs (see the docstring).
DIGITS_IPC = 5
DIGITS_PRETRAIN_EPOCHS = 8


def get_config(arg=None):
  a = common.parse_arg(arg, {"ipc": None, "width": 100}, flags=("linearized", "digits"))
  c = base_config()
  common.paper_methods(c)
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.images_per_class = a["ipc"] or 100
  c.model.name = "mobilenetv2"
  c.model.options = {"width_mult": a["width"] / 100.0}
  # The same pre-training recipe as ResNet-110 (common.cifar_pretrain_recipe; weight decay
  # 5e-4, as the common CIFAR MobileNetV2 code, instead of ImageNet's 4e-5).
  common.cifar_pretrain_recipe(c, "cifar100")
  # BN statistics recomputed after pre-training, not the EMA training left: stale EMA
  # statistics cripple the backbone of a short pre-training (benchmarks/RESULTS.md §22).
  c.pretrain.batch_stats = "recompute"
  c.finetune.epochs = 40
  c.finetune.learning_rate = 0.002
  c.unlearn.batch_size = 128
  # Float64 solve, as ResNet-110 (whose float32 solve at 5,000 images was 71% off): p here
  # is 5x larger.
  c.unlearn.solve_dtype = "float64"
  if a["digits"]:
    common.digits_at_paper_architecture(c, ipc=a["ipc"] or DIGITS_IPC,
                                        pretrain_epochs=DIGITS_PRETRAIN_EPOCHS)
  if a["linearized"]:
    # p = 46,922: one Gram is 16.4 GiB in float64 and the closed form holds ~7 of them
    # (common.CLOSED_FORM), so the dual (the kernel over D's n·C outputs).
    common.linearized(c, common.DUAL)
  if a["tiny"]:
    c.unlearn.solve_dtype = "float32"  # in-process tests (see resnet110_cifar10.py)
    common.tiny_cifar_cnn(c)
    if a["digits"]:  # no TFDS: 4 digit classes, 12 pre-training images each
      c.data.pretrain_per_class = 12
    # Three of the 17 inverted-residual blocks: seconds to compile, every kind of block kept
    # (stride 1 with and without expansion, stride 2).
    c.model.options = {"width_mult": 0.25, "last_channel": 32,
                       "block_settings": ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 1, 1))}
  return c
