"""The experiment config: one schema with a commented default for every knob, and validation.

Config files in `configs/` start from `base_config()` and override fields; the dict is
locked, so a misspelt field fails at assignment (`KeyError` naming it), and `validate`
rejects bad values with a message naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Light modules only (pure Python, numpy, ml_collections): importing the config must not import
# JAX, Flax, Optax or TensorFlow (tests/test_light_imports.py).
from fastntk_jax import enums
from fastntk_jax.data import schema as data_schema

METHODS = ("full", "retrain", "fastntk", "max_loss", "random_label")


def _train(epochs, lr, batch_size, optimizer="sgd", loss="mse", bn_mode="frozen",
           momentum=0.9, weight_decay=0.0) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.epochs = epochs  # passes over the training split
  c.learning_rate = lr  # peak learning rate (the constant one with schedule="constant")
  c.batch_size = batch_size  # fixed batch shape (last batch padded and masked)
  c.optimizer = optimizer  # "sgd" (with momentum) | "adam" (AdamW)
  c.momentum = momentum  # SGD momentum (ignored by adam)
  c.weight_decay = weight_decay  # weight decay on the trained leaves (SGD: coupled; adam: AdamW's)
  c.loss = loss  # "mse" (0.5||f - onehot||², what Eq. (1) assumes) | "ce"
  c.bn_mode = bn_mode  # "frozen": pre-trained running stats (what the NTK linearises) | "train"
  # Train-time augmentation: "none" | "crop_flip" (random crop of the 4-pixel zero-padded
  # image + horizontal flip; the CIFAR pre-training recipe). Off for fine-tuning, baselines,
  # relearning and probes, so that the unlearning protocol sees the data as it is.
  c.augment = "none"
  # Learning-rate schedule after a linear warm-up of warmup_epochs: "constant" | "cosine"
  # (to 0 at the last step) | "step" (× decay_factor from each epoch in decay_epochs).
  c.schedule = "constant"
  c.warmup_epochs = 0.0
  c.decay_epochs = ()
  c.decay_factor = 0.1
  return c


def _finetune(epochs, lr, batch_size, **kwargs) -> ml_collections.ConfigDict:
  """The fine-tuning group (Full on D, Retrain on D_r): a training group plus its mode."""
  c = _train(epochs, lr, batch_size, **kwargs)
  # "standard" (SGD on the network, the paper's protocol) | "linearized" (the network
  # linearised at w0, squared loss, penalty ½λ‖w - w0‖² with unlearn.damping: Fast-NTK then
  # equals Retrain exactly; BN uses the pre-trained statistics; docs/derivation.md §5).
  c.mode = "standard"
  # linearized mode: "closed_form" (w0 + (G + λI)⁻¹JᵀE, one Jacobian pass) | "optax" (the
  # loop above on f_lin with loss "mse"; approximate).
  c.linearized_solver = "closed_form"
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field of an experiment with its default (the embedded digits run)."""
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2)  # training seeds (head init, batch order); results give mean ± std
  c.methods = METHODS  # which methods to run and report (full and retrain always run)

  c.data = data_schema.default_data_config()

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet8"  # one of fastntk_jax.models.MODEL_NAMES
  c.model.options = ml_collections.ConfigDict({"shortcut": "B"})  # get_model(**options)

  c.pretrain = ml_collections.ConfigDict()
  # "train" (see `dataset`) | "npz" (a vision_transformer/AugReg ViT .npz) | "state_dict" (a
  # PyTorch CIFAR ResNet state dict: .pt/.pth with torch installed, or .npz/.safetensors) |
  # "checkpoint" (this project's orbax folder, e.g. another workdir's pretrain/) | "none"
  c.pretrain.source = "train"
  c.pretrain.path = ""  # file/folder for source="npz"/"state_dict"/"checkpoint"
  # source="npz"/"state_dict": regular expressions (full match) of parameter names kept at
  # their fresh init instead of loaded (the head: the public one is for another label set).
  c.pretrain.dont_load = ("head/.*",)
  # source="train" with a `dataset`: a folder shared by runs (every seed, every config with
  # the same backbone) holding each pre-trained backbone once, under a key computed from
  # the pre-training config (model, dataset, image size, normalisation, recipe); concurrent
  # runs wait on a file lock for the one that trains. "" = pre-train in the workdir.
  c.pretrain.cache_dir = ""
  # source="train": "" trains on the experiment data's own pretrain split; a dataset name
  # ("cifar100", ...) trains on that dataset's train split (all its classes, with its own
  # head) and transfers everything but the head, as the paper pre-trains on CIFAR-100.
  c.pretrain.dataset = ""
  c.pretrain.images_per_class = ml_collections.config_dict.placeholder(int)  # None = all
  c.pretrain.train = _train(epochs=30, lr=0.05, batch_size=64, loss="ce", bn_mode="train")
  c.pretrain.train.weight_decay = 5e-4

  # PEFT fine-tuning of the trainable collection (Full on D, Retrain on D_r; same protocol).
  # Squared loss, a small learning rate and BN in train mode keep standard fine-tuning close
  # to the linearised model the update assumes: the best cell of the README's regime map
  # (Avg. Gap 0.09 at lr 0.002; cross-entropy or lr 0.05 leave it at 46-50 points).
  c.finetune = _finetune(epochs=40, lr=0.002, batch_size=64, bn_mode="train")

  c.unlearn = ml_collections.ConfigDict()
  c.unlearn.damping = 1e-2  # λ added to every inverted kernel block
  c.unlearn.solver = "auto"  # "dual" | "primal" | "cg" | "auto"
  c.unlearn.batch_size = 128  # rows per streamed Jacobian/kernel block
  c.unlearn.checkpoint_rows = 256  # primal: samples per checkpointed Gram chunk (resumable)
  c.unlearn.kernel_impl = "auto"  # "auto" | "neural_tangents" | "jax"
  c.unlearn.linearize_at = "init"  # "init" (w0, docs/derivation.md §3) | "trained"
  c.unlearn.step_scale = 1.0  # 1.0 = the exact update
  c.unlearn.solve_dtype = "float32"  # "float32" | "float64" (float64 enables jax x64)
  # True: Fast-NTK as a deletion request served on the state of D (Gram, Cholesky factor and
  # ridge solution at w0 over all of D, `unlearn.stream`), built once per seed and kept in
  # the workdir; results give the cold time (building it) and the request's latency apart.
  # False: the one-shot update (the same parameters up to round-off).
  c.unlearn.serve = False
  # serve: keep D's Jacobian rows (n·C·p numbers in the solve dtype) when they take at most
  # this many GiB; a request then needs no backward pass and subtracts the very rows summed
  # into G (recomputed rows may round differently: a warning names the bound). 0: never.
  c.unlearn.jacobian_cache_gib = 4.0

  c.baselines = ml_collections.ConfigDict()
  # Max Loss: gradient ascent on D_f from Full.
  c.baselines.max_loss = _train(epochs=5, lr=0.01, batch_size=64, loss="ce")
  # Random Label: fine-tune Full on D_f with random wrong labels.
  c.baselines.random_label = _train(epochs=5, lr=0.01, batch_size=64, loss="ce")

  c.eval = ml_collections.ConfigDict()
  c.eval.relearn = _train(epochs=100, lr=0.01, batch_size=64, loss="ce")  # epochs = the cap
  c.eval.relearn_threshold = 0.05  # relearn time = epochs until D_f training loss < this
  c.eval.probe = _train(epochs=30, lr=0.05, batch_size=64, loss="ce")  # linear probe of a fresh head
  c.eval.batch_size = 256  # inference batch
  # KLoM (population level): N seeds of Full/Retrain/Fast-NTK and N other seeds of Retrain
  # (the noise floor); 0 = off. Affordable in linearised closed-form mode (one Gram per seed).
  c.eval.population_seeds = 0

  c.lock()
  return c


def parse_arg(arg, allowed: dict, choices: dict | None = None) -> dict:
  """Parses a config file's `:arg` such as "tiny" or "classes=20,ipc=50".

  Args:
    arg: None, "tiny", or comma-separated key=value pairs (optionally with "tiny").
    allowed: {key: default}: an int default takes digits; a str default takes a word, one of
      `choices[key]` when given.
    choices: {key: allowed words} for str-valued keys.

  Returns:
    {"tiny": bool, **{key: value}}.
  """
  out = {"tiny": False, **allowed}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if part == "tiny":
      out["tiny"] = True
      continue
    key, _, value = part.partition("=")
    if key in allowed and isinstance(allowed[key], str) and value:
      if choices and key in choices and value not in choices[key]:
        raise ValueError(f"bad config argument {part!r}: {key} must be one of "
                         f"{list(choices[key])}")
      out[key] = value
      continue
    if key not in allowed or not value.isdigit():
      raise ValueError(f"bad config argument {part!r}: expected 'tiny' or key=int with key in "
                       f"{sorted(allowed)}")
    out[key] = int(value)
  return out


def tiny_training(c: ml_collections.ConfigDict) -> None:
  """Shrinks every training loop of `c` to seconds (the configs' test mode)."""
  c.seeds = (0,)
  c.pretrain.train.epochs = 1
  c.finetune.epochs = 2
  c.baselines.max_loss.epochs = 1
  c.baselines.random_label.epochs = 1
  c.eval.relearn.epochs = 2
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
                      tiny: bool, *, random_classes: bool = False) -> ml_collections.ConfigDict:
  """Shared body of the prompted-ViT configs (paper Table II and Appendix B).

  Pre-trained weights come from an AugReg/vision_transformer `.npz` (`npz`; head and prompts
  stay fresh, a `pre_logits` layer is dropped); the trainable collection is the K/V prompts
  of every block plus the head. The update solves in float64: at the ViT-B/16 prompt size
  (p = 89,108) a float32 solve is not accurate enough (benchmarks/RESULTS.md §8).
  `random_classes`: the paper's ImageNet-R sampling, #classes drawn at random and one of them
  forgotten at random, a new draw for every seed (data.class_choice/forget_choice/
  draw_per_seed); otherwise the first #classes and label 0, the same for every seed.
  """
  c = base_config()
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
  c.finetune = _finetune(epochs=20, lr=0.01, batch_size=32, bn_mode="frozen")  # no BN in ViTs
  c.unlearn.batch_size = 32
  c.unlearn.solve_dtype = "float64"
  c.eval.batch_size = 64
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


def _choice(field: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"config.{field}={value!r} is not valid; allowed: {list(allowed)}")


def _positive(field: str, value: Any, *, integer: bool, allow_zero: bool = False) -> None:
  """Refuses anything but a (finite, for floats) number > 0, or >= 0 with `allow_zero`."""
  import math  # pylint: disable=g-import-not-at-top
  ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
  if (isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0
      or (value == 0 and not allow_zero)):
    kind = "an int" if integer else "a finite number"
    raise ValueError(f"config.{field}={value!r} must be {kind} "
                     f"{'>= 0' if allow_zero else '> 0'}")


PRETRAIN_SOURCES = ("train", "npz", "state_dict", "checkpoint", "none")


def _check_patterns(field: str, patterns) -> None:
  import re  # pylint: disable=g-import-not-at-top
  if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)):
    raise ValueError(f"config.{field}={patterns!r} must be a list of regular expressions, "
                     "e.g. ('head/.*',)")
  for p in patterns:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      raise ValueError(f"config.{field}: {p!r} is not a regular expression ({e})") from None


def _validate_train(prefix: str, c) -> None:
  _positive(f"{prefix}.epochs", c.epochs, integer=True, allow_zero=True)
  _positive(f"{prefix}.learning_rate", c.learning_rate, integer=False)
  _positive(f"{prefix}.batch_size", c.batch_size, integer=True)
  _choice(f"{prefix}.optimizer", c.optimizer, enums.values(enums.Optimizer))
  _choice(f"{prefix}.loss", c.loss, enums.values(enums.Loss))
  _choice(f"{prefix}.bn_mode", c.bn_mode, enums.values(enums.BNMode))
  _positive(f"{prefix}.momentum", c.momentum, integer=False, allow_zero=True)
  _positive(f"{prefix}.weight_decay", c.weight_decay, integer=False, allow_zero=True)
  _choice(f"{prefix}.augment", c.augment, enums.values(enums.Augment))
  _choice(f"{prefix}.schedule", c.schedule, enums.values(enums.Schedule))
  _positive(f"{prefix}.warmup_epochs", c.warmup_epochs, integer=False, allow_zero=True)
  if c.warmup_epochs > c.epochs:
    raise ValueError(f"config.{prefix}.warmup_epochs={c.warmup_epochs} exceeds "
                     f"{prefix}.epochs={c.epochs}")
  _positive(f"{prefix}.decay_factor", c.decay_factor, integer=False)
  decay = c.decay_epochs
  if isinstance(decay, str) or not isinstance(decay, (tuple, list)) or any(
      isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in decay):
    raise ValueError(f"config.{prefix}.decay_epochs={decay!r} must be a list of epochs >= 1")
  if c.schedule == "step" and not decay:
    raise ValueError(f"config.{prefix}.schedule='step' needs {prefix}.decay_epochs, e.g. "
                     "(80, 120)")


def check_keys(cfg, reference=None, prefix="") -> None:
  """Every key of `cfg` must exist in the schema (catches configs built without base_config)."""
  reference = base_config() if reference is None else reference
  for key in cfg.keys():
    if key not in reference:
      raise ValueError(f"unknown config key '{prefix}{key}'; known keys at this level: "
                       f"{sorted(reference.keys())}")
    sub, ref = cfg[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and key != "options":
      if not isinstance(sub, ml_collections.ConfigDict):
        raise ValueError(f"config.{prefix}{key} must be a group of fields, got {sub!r}")
      check_keys(sub, ref, prefix=f"{prefix}{key}.")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; returns the config unchanged or raises ValueError naming the field."""
  check_keys(cfg)
  seeds = tuple(cfg.seeds)
  if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) \
      or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds={cfg.seeds!r} must be a non-empty list of distinct ints")
  for m in cfg.methods:
    _choice("methods[]", m, METHODS)
  _choice("model.name", cfg.model.name, enums.values(enums.ModelName))
  _choice("pretrain.source", cfg.pretrain.source, PRETRAIN_SOURCES)
  if cfg.pretrain.dataset:
    _choice("pretrain.dataset", cfg.pretrain.dataset, data_schema.DATASETS)
  if cfg.pretrain.source in ("npz", "state_dict", "checkpoint") and not cfg.pretrain.path:
    raise ValueError(f"config.pretrain.path must name the file for pretrain.source="
                     f"{cfg.pretrain.source!r}")
  _check_patterns("pretrain.dont_load", cfg.pretrain.dont_load)
  if cfg.pretrain.images_per_class is not None:  # None = every image of pretrain.dataset
    _positive("pretrain.images_per_class", cfg.pretrain.images_per_class, integer=True)
  if cfg.data.draw_per_seed and cfg.pretrain.source == "train" and not cfg.pretrain.dataset:
    raise ValueError("config.data.draw_per_seed=True draws other images per seed, but "
                     "pretrain.source='train' pre-trains on the data's own pretrain split once; "
                     "set pretrain.dataset, another pretrain.source, or draw_per_seed=False")
  for prefix in ("pretrain.train", "finetune", "baselines.max_loss", "baselines.random_label",
                 "eval.relearn", "eval.probe"):
    node = cfg
    for part in prefix.split("."):
      node = node[part]
    _validate_train(prefix, node)
  _choice("finetune.mode", cfg.finetune.mode, enums.values(enums.FinetuneMode))
  _choice("finetune.linearized_solver", cfg.finetune.linearized_solver,
          enums.values(enums.LinearizedSolver))
  if cfg.finetune.mode == "linearized":
    # Linearised fine-tuning is the ridge problem Eq. (1) inverts: squared loss and the
    # pre-trained BN statistics. Other choices would be silently ignored, so they are refused.
    if cfg.finetune.loss != "mse":
      raise ValueError(f"config.finetune.loss={cfg.finetune.loss!r} with finetune.mode="
                       "'linearized': linearised fine-tuning minimises the squared loss (the "
                       "objective the update inverts); set finetune.loss='mse', or "
                       "finetune.mode='standard' to fine-tune the network with that loss")
    if cfg.finetune.bn_mode != "frozen":
      raise ValueError(f"config.finetune.bn_mode={cfg.finetune.bn_mode!r} with finetune.mode="
                       "'linearized': the linearised network keeps the pre-trained BatchNorm "
                       "statistics; set finetune.bn_mode='frozen', or finetune.mode='standard'")
    # The closed form ignores both; the optax loop would minimise another objective (decay
    # towards 0, not w0; augmented inputs), so the update would no longer land on Retrain.
    if cfg.finetune.weight_decay:
      raise ValueError(f"config.finetune.weight_decay={cfg.finetune.weight_decay!r} with "
                       "finetune.mode='linearized': the linearised objective's only penalty is "
                       "½·unlearn.damping·‖w - w0‖²; set finetune.weight_decay=0 (raise "
                       "unlearn.damping instead), or finetune.mode='standard'")
    if cfg.finetune.augment != "none":
      raise ValueError(f"config.finetune.augment={cfg.finetune.augment!r} with finetune.mode="
                       "'linearized': the update inverts the fit to the data as given; set "
                       "finetune.augment='none', or finetune.mode='standard'")
    if cfg.unlearn.linearize_at != "init":
      # f_lin's Jacobian is J(w0) everywhere; the network's at the trained params is another
      # model's (measured on :tiny: Fast-NTK RA 38.9% against Retrain's 100%).
      raise ValueError(f"config.unlearn.linearize_at={cfg.unlearn.linearize_at!r} with "
                       "finetune.mode='linearized': the linearised model's Jacobian is the "
                       "network's at w0 wherever it is taken; set unlearn.linearize_at='init', "
                       "or finetune.mode='standard'")
  u = cfg.unlearn
  _positive("unlearn.damping", u.damping, integer=False, allow_zero=True)
  _choice("unlearn.solver", u.solver, enums.values(enums.Solver))
  _positive("unlearn.batch_size", u.batch_size, integer=True)
  _positive("unlearn.checkpoint_rows", u.checkpoint_rows, integer=True)
  _choice("unlearn.kernel_impl", u.kernel_impl, enums.values(enums.KernelImplementation))
  _choice("unlearn.linearize_at", u.linearize_at, enums.values(enums.LinearizationPoint))
  _positive("unlearn.step_scale", u.step_scale, integer=False, allow_zero=True)
  _choice("unlearn.solve_dtype", u.solve_dtype, enums.values(enums.SolveDtype))
  _positive("unlearn.jacobian_cache_gib", u.jacobian_cache_gib, integer=False, allow_zero=True)
  if u.serve and u.linearize_at != "init":
    raise ValueError(f"config.unlearn.serve=True with unlearn.linearize_at={u.linearize_at!r}: "
                     "the state of D is built at w0 before any fine-tuning; set "
                     "unlearn.linearize_at='init' or unlearn.serve=False")
  if u.serve and u.step_scale != 1.0:
    raise ValueError(f"config.unlearn.serve=True with unlearn.step_scale={u.step_scale}: a "
                     "served request applies the exact update; set unlearn.step_scale=1.0")
  if u.serve and not u.damping > 0:
    raise ValueError(f"config.unlearn.serve=True needs unlearn.damping > 0 (got {u.damping}): "
                     "requests downdate the Cholesky factor of G + λI, which λ keeps definite")
  _positive("eval.relearn_threshold", cfg.eval.relearn_threshold, integer=False)
  _positive("eval.batch_size", cfg.eval.batch_size, integer=True)
  _positive("eval.population_seeds", cfg.eval.population_seeds, integer=True, allow_zero=True)
  if cfg.eval.population_seeds == 1:
    raise ValueError("config.eval.population_seeds=1: KLoM needs at least 2 models per side")
  data_schema.resolve_data_config(cfg.data)  # raises naming the data field
  return cfg


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a config file and calls its `get_config(arg)`; `path` may be 'file.py:arg'."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  arg = None
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("fastntk_user_config", path)
  if spec is None:  # not a .py file
    raise ValueError(f"config file {path!r} is not a Python file (e.g. configs/default.py)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  try:
    return module.get_config(arg) if arg is not None else module.get_config()
  except (AttributeError, KeyError) as e:  # a misspelt field of the locked ConfigDict
    raise ValueError(f"config file {path!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Command-line overrides: --config.a.b=value (fastntk_jax.main)
# --------------------------------------------------------------------------------------------------

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
_FREE_FORM = ("model.options",)  # groups whose keys are free (get_model(**options))


class ConfigOverrideError(ValueError):
  """A `--config.field=value` override that names no field or whose value does not parse."""


def _literal(raw: str):
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(raw.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return raw


def _split_top_level_commas(text: str) -> list:
  """Splits at the commas outside brackets and quotes: 'a,b' -> ['a', 'b'], but a regular
  expression's 'head/.{1,3}' or '(a,b)x' stays one element."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth = max(0, depth - 1)
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def _literal_sequence(raw: str) -> list:
  """'(0, 1)', '[0,1]', '0,1', '3' or 'full,retrain' -> a list (elements parsed as literals)."""
  value = _literal(raw)
  if isinstance(value, (tuple, list)):
    return list(value)
  if not isinstance(value, str):  # a single number, bool or None
    return [value]
  text = raw.strip()
  if text[:1] + text[-1:] in ("()", "[]"):
    text = text[1:-1]
  parts = [p.strip() for p in _split_top_level_commas(text)]
  if parts and parts[-1] == "":  # '(a,)'
    parts = parts[:-1]
  return [_literal(p) for p in parts if p or len(parts) > 1]


def parse_override_value(field: str, raw: str | None, kind: type, current: Any) -> Any:
  """Parses the text of `--config.<field>=<raw>` for a field of type `kind`.

  `raw` None means the flag was given without a value (only booleans: true). Any field may
  be set to None with 'None' (other fields also 'none' or 'null'; a text field keeps those as
  text, e.g. augment='none'); `validate` then decides whether None is allowed there.
  """
  flag = f"--config.{field}" + ("" if raw is None else f"={raw}")

  def bad(expected: str):
    return ConfigOverrideError(f"{flag}: config.{field} expects {expected}, got {raw!r}")

  if raw is None:
    if kind is bool:
      return True
    raise ConfigOverrideError(f"{flag}: config.{field} needs a value, e.g. --config.{field}=...")
  text = raw.strip()
  if text == "None" or (kind is not str and text.lower() in _NONE_WORDS):
    return None
  if kind is bool:
    if text.lower() in _TRUE_WORDS:
      return True
    if text.lower() in _FALSE_WORDS:
      return False
    raise bad("true or false")
  if kind is int:
    value = _literal(text)
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad("an int")
    return value
  if kind is float:
    value = _literal(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      try:
        value = float(text)  # 'inf', 'nan'
      except ValueError:
        raise bad("a number") from None
    return float(value)
  if kind is str:
    return raw
  if kind in (tuple, list):
    opened, closed = text[:1] in "([", text[-1:] in ")]"
    if opened != closed or (opened and text[:1] + text[-1:] not in ("()", "[]")):
      raise bad("a list such as '(3,)', '[3, 4]' or '3,4'")
    return kind(_literal_sequence(raw))
  if isinstance(current, ml_collections.ConfigDict) or kind is dict:
    value = _literal(text)
    if not isinstance(value, dict):
      raise bad("a dict such as \"{'key': value}\"")
    return value
  return _literal(raw)  # a field that is None by default: any Python literal, else the text


def _did_you_mean(key: str, options) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(key, [str(o) for o in options], n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies `[(field, raw_text_or_None), ...]` from `--config.field=raw` flags, in order.

  Every field of the config can be set, lists and tuples too ('(0,1)', '[3]', '3' or '0,1');
  a group's free-form keys (`model.options`) can be added. Raises `ConfigOverrideError`
  (a ValueError) with one line naming the flag and what it expects.
  """
  for field, raw in overrides:
    flag = f"--config.{field}" + ("" if raw is None else f"={raw}")
    parts = field.split(".")
    if not field or any(not p for p in parts):
      raise ConfigOverrideError(f"{flag}: empty config field name")
    node, walked = cfg, []
    for key in parts[:-1]:
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigOverrideError(f"{flag}: config.{'.'.join(walked)} is a value, not a group "
                                  "of fields")
      if key not in node:
        where = "config" + "".join(f".{w}" for w in walked)
        raise ConfigOverrideError(
            f"{flag}: unknown config field {'.'.join(walked + [key])!r}"
            f"{_did_you_mean(key, node.keys())} ({where} has {sorted(node.keys())})")
      node = node[key]
      walked.append(key)
    key = parts[-1]
    group = ".".join(walked)
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigOverrideError(f"{flag}: config.{group} is a value, not a group of fields")
    free_form = group in _FREE_FORM
    if key not in node:
      if not free_form:
        where = "config" + "".join(f".{w}" for w in walked)
        raise ConfigOverrideError(
            f"{flag}: unknown config field {field!r}{_did_you_mean(key, node.keys())} "
            f"({where} has {sorted(node.keys())})")
      value = None if raw is None else _literal(raw)
      with node.unlocked():
        node[key] = value
      continue
    current = node[key]
    if isinstance(current, ml_collections.ConfigDict) and field not in _FREE_FORM:
      raise ConfigOverrideError(
          f"{flag}: config.{field} is a group of fields; set one of them, e.g. "
          f"--config.{field}.{sorted(current.keys())[0] if current.keys() else 'name'}=...")
    kind = node.get_type(key)
    value = parse_override_value(field, raw, kind, current)
    try:
      if isinstance(current, ml_collections.ConfigDict):  # model.options: a whole new dict
        with node.unlocked():
          node[key] = ml_collections.ConfigDict(value)
      elif free_form:
        with node.unlocked():
          node[key] = value
      else:
        node[key] = value
    except (TypeError, ValueError, KeyError) as e:
      raise ConfigOverrideError(f"{flag}: cannot set config.{field}: "
                                f"{' '.join(str(e).split())}") from None
  return cfg
