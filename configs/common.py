"""Helpers shared by the config files (`configs/*.py`): the `:arg` parser, the exact
(linearised) mode, the tiny test modes, the CIFAR pre-training recipe, digits at the paper's
architectures, and the prompted-ViT configs with their published AugReg checkpoints. A config
file imports this module by its folder (`import common` after putting `configs/` on
sys.path), so it works from any working directory."""

from __future__ import annotations

from typing import Any

from fastntk_jax import config


# The paper's Tables I-II: Fast-NTK beside Full, Retrain, Max Loss and Random Label.
PAPER_METHODS = ("full", "retrain", "fastntk", "max_loss", "random_label")


def paper_methods(c) -> None:
  """The reproduction configs run the paper's methods at the paper's settings: its baselines
  only, untuned (the field's comparison set, tuned on a validation seed, is the default's;
  add methods with --config.methods and turn tuning on with --config.tuning.enabled=True, at
  up to tuning.max_trials runs of each method on one more seed)."""
  c.methods = PAPER_METHODS
  c.tuning.enabled = False


def parse_arg(arg, allowed: dict, choices: dict | None = None,
              flags: tuple[str, ...] = ()) -> dict:
  """Parses a config file's `:arg` such as "tiny", "classes=20,ipc=50" or "ipc=100,linearized".

  Args:
    arg: None, or comma-separated parts: "tiny", a word of `flags`, or key=value.
    allowed: {key: default}: an int default takes digits; a str default takes a word, one of
      `choices[key]` when given.
    choices: {key: allowed words} for str-valued keys.
    flags: bare words the config accepts besides "tiny" (e.g. "linearized", "digits").

  Returns:
    {"tiny": bool, **{flag: bool}, **{key: value}}.

  Raises:
    ValueError: an unknown part, naming every accepted one.
  """
  out = {"tiny": False, **{f: False for f in flags}, **allowed}
  words = ("tiny",) + tuple(flags)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if part in words:
      out[part] = True
      continue
    key, _, value = part.partition("=")
    if key in allowed and isinstance(allowed[key], str) and value:
      if choices and key in choices and value not in choices[key]:
        raise ValueError(f"bad config argument {part!r}: {key} must be one of "
                         f"{list(choices[key])}")
      out[key] = value
      continue
    if key not in allowed or not value.isdigit():
      raise ValueError(f"bad config argument {part!r}: expected one of {list(words)} or "
                       f"key=int with key in {sorted(allowed)}")
    out[key] = int(value)
  return out


# How linearised fine-tuning reaches its minimiser, per paper config (`linearized`): the
# closed form where the p x p Grams fit, the dual (the kernel over D's n·C outputs, (n·C)²)
# where they do not, conjugate gradients where neither fits (cg's work, a jvp and a vjp over
# D per iteration for up to 2·min(p, n·C) + 200 iterations, exceeds the dual's kernel pass
# by orders of magnitude at the paper's sizes). Closed form
# holds G_r and G_f (p² float64 each), the factor of G + λI and, for the certificate's exact
# bound (unlearn/certificate.py, Gram basis), G_r twice more in 80-bit extended precision
# on the host plus one eigenvalue decomposition (p³): ~7 p² x 8 bytes in all. cg holds a few
# vectors of p and of n·C.
CLOSED_FORM, DUAL, CG = "closed_form", "dual", "cg"


def linearized(c: ml_collections.ConfigDict, solver: str = CLOSED_FORM) -> None:
  """The exact mode (docs/derivation.md §5), the one home of its settings: Full and Retrain
  are the network linearised at w0 trained to its ridge minimiser (squared loss, penalty
  ½λ‖w − w0‖², λ = unlearn.damping), so Fast-NTK lands on Retrain up to the solver's
  round-off whatever a learning rate or loss would have done.

  Args:
    c: the config to change in place.
    solver: `finetune.linearized_solver`: "closed_form" (from the Gram statistics at w0 that
      the primal update reuses; memory ~p²), "dual" (from the kernel over the set's n·C
      outputs; memory (n·C)²) or "cg" (matrix-free); with the last two the Fast-NTK update
      is the plan's choice, `unlearn.solver="auto"`: the dual while (n·C)² fits.
  """
  if solver not in (CLOSED_FORM, DUAL, CG):
    raise ValueError(f"linearized solver {solver!r}: use {CLOSED_FORM!r}, {DUAL!r} or {CG!r}")
  c.finetune.mode = "linearized"
  c.finetune.linearized_solver = solver
  c.finetune.bn_mode = "frozen"  # f_lin keeps the pre-trained BN statistics
  # The update, Full and Retrain solve the same ridge problem; their agreement (Fast-NTK's
  # distance to Retrain) is as good as the solve's precision (benchmarks/RESULTS.md §7).
  c.unlearn.solve_dtype = "float64"


def tiny_training(c: ml_collections.ConfigDict) -> None:
  """Shrinks every training loop of `c` to seconds (the configs' test mode)."""
  c.seeds = (0,)
  c.pretrain.train.epochs = 1
  c.finetune.epochs = 2
  config.set_method_epochs(c, 1)  # every method plug-in's training group(s)
  c.eval.relearn.epochs = 2
  c.eval.relearn_attack.epochs = 2
  c.eval.mia_subsamples = 3
  c.eval.probe.epochs = 1
  c.eval.batch_size = 32
  c.unlearn.batch_size = 16
  c.unlearn.checkpoint_rows = 16  # one Gram chunk = one block: one small compile


def cifar_pretrain_recipe(c: ml_collections.ConfigDict, dataset: str = "cifar100") -> None:
  """The CNN configs' pre-training on `dataset`'s train split (the paper: CIFAR-100), the
  usual CIFAR recipe: SGD momentum 0.9, lr 0.1, batch 128, 160 epochs, ×0.1 at epochs 80
  and 120 after a 1-epoch linear warm-up (He et al. 2016's schedule for ResNet-110, which
  warms up for ~400 iterations), weight decay 5e-4 (the value common for CIFAR-100), random
  crop (4-pixel padding) + horizontal flip, cross-entropy, BN in train mode. Its accuracy on
  the dataset's test split goes to results.json (`pretrain.test_accuracy`): ResNet-110 with
  such a recipe commonly reaches ~72% on CIFAR-100 (not measured here: no CIFAR on our
  machines)."""
  c.pretrain.source = "train"
  c.pretrain.dataset = dataset
  t = c.pretrain.train
  t.epochs = 160
  t.learning_rate = 0.1
  t.batch_size = 128
  t.momentum = 0.9
  t.weight_decay = 5e-4
  t.loss = "ce"
  t.bn_mode = "train"
  t.augment = "crop_flip"
  t.schedule = "step"
  t.decay_epochs = (80, 120)
  t.decay_factor = 0.1
  t.warmup_epochs = 1.0


# Digits at the paper's CNNs (`:digits` of configs/resnet110_cifar10.py and
# mobilenetv2_cifar10.py): scikit-learn's 8x8 digits resized to 32x32 with 3 channels
# (data/sources.py), 50 images per class to pre-train on and 30 per class held out, so that
# the real ResNet-110 / MobileNetV2 run on real images on a CPU.
DIGITS_PRETRAIN_PER_CLASS = 50
DIGITS_HOLDOUT_PER_CLASS = 30


def digits_at_paper_architecture(c: ml_collections.ConfigDict, *, ipc: int,
                                 pretrain_epochs: int) -> None:
  """Replaces CIFAR by digits at 32x32x3 (all 10 classes, class 0 forgotten), pre-trained
  from scratch on the data's own pre-train split (disjoint from D and the hold-out; no
  CIFAR-100): AdamW lr 1e-3, batch 64, cosine after a 1-epoch warm-up, weight decay 5e-4,
  cross-entropy, BN in train mode, no augmentation (a flipped digit is another digit).
  AdamW, not the CIFAR recipe's SGD at lr 0.1: a few epochs must train a 110-layer network
  from scratch, and SGD at lr 0.05 diverged here (ResNet-110's mean loss 3.8 then 4.5 in
  its first two epochs, above chance's 2.3). Its hold-out accuracy goes to results.json
  (`pretrain.test_accuracy`).

  Args:
    c: a CNN paper config (changed in place).
    ipc: images per class of D (digits has 174-183 per class; 50 + 30 are taken first).
    pretrain_epochs: passes over the 500 pre-training images.
  """
  c.data.name = "digits"
  c.data.image_size = 32
  c.data.normalization = None  # the dataset's default (per-channel mean/std)
  c.data.images_per_class = ipc
  c.data.pretrain_per_class = DIGITS_PRETRAIN_PER_CLASS
  c.data.holdout_per_class = DIGITS_HOLDOUT_PER_CLASS
  c.pretrain.source = "train"
  c.pretrain.dataset = ""  # the data's own pre-train split
  c.pretrain.images_per_class = None
  t = c.pretrain.train
  t.epochs = pretrain_epochs
  t.optimizer = "adam"
  t.learning_rate = 1e-3
  t.batch_size = 64
  t.weight_decay = 5e-4
  t.loss = "ce"
  t.bn_mode = "train"
  t.augment = "none"
  t.schedule = "cosine"
  t.warmup_epochs = 1.0
  t.decay_epochs = ()


def tiny_cifar_cnn(c: ml_collections.ConfigDict) -> None:
  """The CIFAR CNN configs' seconds-long test mode (run under tfds.testing.mock_data, which
  must give every CIFAR-100 class 2 training and 1 test image): tiny training, 8x8 images,
  4 classes of 3 training and 2 hold-out images, and the pre-training recipe (augmentation,
  warm-up, step decay, test accuracy) shrunk to 2 epochs on 2 CIFAR-100 images per class."""
  tiny_training(c)
  c.data.image_size = 8
  c.data.images_per_class = 3
  c.data.holdout_per_class = 2
  c.data.num_classes = 4
  c.pretrain.images_per_class = 2
  t = c.pretrain.train
  t.epochs = 2
  t.batch_size = 32
  t.decay_epochs = (1,)
  t.warmup_epochs = 0.5


# The published AugReg ViT checkpoints (google-research/vision_transformer, bucket
# gs://vit_models/augreg/ = https://storage.googleapis.com/vit_models/augreg/; "How to train
# your ViT?", Steiner et al. 2021). Names as listed in vision_transformer's README (i21k) and
# in timm's vision_transformer.py default_cfgs, which loads these URLs: `augreg_in1k`
# (i1k), `augreg_in21k` (i21k), `augreg_in21k_ft_in1k` (i21k_i1k). All at 224x224, inception
# normalisation ([-1, 1]: data.normalization "vit"). The paper pre-trains its ViTs "on
# ImageNet-1K", so "i1k" (trained on ImageNet-1k only) is the default; "i21k_i1k" is
# ImageNet-21k pre-training fine-tuned on ImageNet-1k, "i21k" the ImageNet-21k upstream.
AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg/"
VIT_CHECKPOINTS = {
    ("vit_s16", "i1k"): "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"
                        "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    ("vit_b16", "i1k"): "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1"
                        "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    ("vit_s16", "i21k_i1k"): "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"
                             "--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    ("vit_b16", "i21k_i1k"): "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
                             "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    ("vit_s16", "i21k"): "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    ("vit_b16", "i21k"): "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
}
VIT_WEIGHTS = ("i1k", "i21k_i1k", "i21k")


def vit_checkpoint(model: str, weights: str, folder: str = "checkpoints") -> str:
  """The local path the configs expect for a published AugReg file (download it from
  AUGREG_URL + its name; see README "Reproducing the paper")."""
  return f"{folder}/{VIT_CHECKPOINTS[(model, weights)]}"


def vit_prompt_config(model: str, dataset: str, num_classes, ipc: int, npz: str,
                      tiny: bool, *, random_classes: bool = False,
                      linearized_mode: bool = False) -> ml_collections.ConfigDict:
  """Shared body of the prompted-ViT configs (paper Table II and Appendix B).

  Pre-trained weights come from an AugReg/vision_transformer `.npz` (`npz`; head and prompts
  stay fresh, a `pre_logits` layer is dropped); the trainable collection is the K/V prompts
  of every block plus the head. The update solves in float64: at the ViT-B/16 prompt size
  (p = 89,108) a float32 solve is not accurate enough (benchmarks/RESULTS.md §8).
  `random_classes`: the paper's ImageNet-R sampling, #classes drawn at random and one of them
  forgotten at random, a new draw for every seed (data.class_choice/forget_choice/
  draw_per_seed); otherwise the first #classes and label 0, the same for every seed.
  `linearized_mode`: the exact mode (`linearized`) by the dual (the kernel over D's n·C
  outputs), since the prompts' p x p Gram (ViT-S/16 p = 44,564: 14.8 GiB in float64;
  ViT-B/16 89,108: 59.2 GiB) does not fit beside its copies; the Fast-NTK update is the
  plan's choice (the dual while (n·C)² fits).
  """
  c = config.base_config()
  paper_methods(c)
  c.data.name = dataset
  c.data.image_size = 224
  c.data.normalization = "vit"
  c.data.num_classes = num_classes
  c.data.images_per_class = ipc
  if random_classes:
    c.data.class_choice = "random"
    c.data.forget_choice = "random"
    c.data.draw_per_seed = True
  c.model.name = model
  c.model.options = {"prompt_length": 4}
  c.pretrain.source = "npz"
  c.pretrain.path = npz
  c.finetune = config.finetune_group(epochs=20, lr=0.01, batch_size=32,
                                     bn_mode="frozen")  # no BN in ViTs
  c.unlearn.batch_size = 32
  c.unlearn.solve_dtype = "float64"
  c.eval.batch_size = 64
  if linearized_mode:
    linearized(c, DUAL)
  if tiny:
    tiny_training(c)
    # In-process tests: x64 would stay on for the tests that follow (test_configs runs the
    # float64 path of the CNN config in a subprocess).
    c.unlearn.solve_dtype = "float32"
    c.data.image_size = 32
    c.data.images_per_class = 2
    # 2: the membership attack's cross-validation needs 2 hold-out images of the forgotten
    # class (pipeline.distances_to_retrain), at least as many folds as samples per side.
    c.data.holdout_per_class = 2
    c.data.num_classes = 4 if num_classes else None
    c.model.options = {"prompt_length": 2, "patch_size": 16, "hidden_size": 16,
                       "num_layers": 2, "num_heads": 2, "mlp_dim": 32}
    c.pretrain.source = "none"
    c.pretrain.path = ""
  return c
