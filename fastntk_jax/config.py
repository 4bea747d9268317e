"""The experiment config: one schema with a commented default for every knob, and validation.

Config files in `configs/` start from `base_config()` and override fields; the dict is
locked, so a misspelt field fails at assignment (`KeyError` naming it). The command line
loads them through `ml_collections.config_flags` (`--config=file.py[:arg]`, overrides
`--config.a.b=value`; `fastntk_jax.main`), and `validate` rejects a bad value, naming the
field, the value and what is allowed, before any work. Helpers shared by the config files
live beside them (`configs/common.py`).
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections
import numpy as np

# Light modules only (pure Python, numpy, ml_collections): importing the config must not import
# JAX, Flax, Optax or TensorFlow (tests/test_light_imports.py).
from fastntk_jax import enums
from fastntk_jax.data import schema as data_schema
from fastntk_jax.experiment import methods as methods_registry
from fastntk_jax.config_files import check_is_config, load_config_file  # noqa: F401 (re-exported)

DEFAULT_METHODS = ("full", "retrain", "fastntk", "max_loss", "random_label", "ft",
                   "neggrad_plus", "l1_sparse", "salun", "scrub", "ssd", "bad_teacher", "iu")


def train_group(epochs, lr, batch_size, optimizer="sgd", loss="mse", bn_mode="frozen",
           momentum=0.9, weight_decay=0.0) -> ml_collections.ConfigDict:
  """A training group: every field of `train.TrainSpec.from_config`, commented."""
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


def finetune_group(epochs, lr, batch_size, **kwargs) -> ml_collections.ConfigDict:
  """The fine-tuning group (Full on D, Retrain on D_r): a training group plus its mode."""
  c = train_group(epochs, lr, batch_size, **kwargs)
  # "standard" (SGD on the network, the paper's protocol) | "linearized" (the network
  # linearised at w0, squared loss, penalty ½λ‖w - w0‖² with unlearn.damping: Fast-NTK then
  # equals Retrain exactly; BN uses the pre-trained statistics; docs/derivation.md §5).
  c.mode = "standard"
  # linearized mode, how Full and Retrain reach the ridge minimiser: "closed_form" (w0 +
  # (G + λI)⁻¹JᵀE, memory p²) | "dual" (w0 + Jᵀ(Θ + λI)⁻¹E, memory (n·C)²) | "cg" (jvp/vjp
  # conjugate gradients, memory ~ p + n·C, where neither fits). The loop fields above unused.
  c.linearized_solver = "closed_form"
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field of an experiment with its default (the embedded digits run)."""
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2)  # training seeds (head init, batch order); results give mean ± std
  # Which methods to run and report, by name: "full" and "retrain" (always run) and the
  # plug-ins of fastntk_jax/experiment/methods (each with its block below).
  c.methods = DEFAULT_METHODS

  c.data = data_schema.default_data_config()

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet8"  # one of fastntk_jax.models.MODEL_NAMES
  c.model.options = ml_collections.ConfigDict({"shortcut": "B"})  # get_model(**options)

  c.pretrain = ml_collections.ConfigDict()
  # "train" (see `dataset`) | "npz" (a vision_transformer/AugReg ViT .npz) | "state_dict" (a
  # PyTorch CIFAR ResNet/MobileNetV2 state dict: .pt/.pth/.npz/.safetensors, torch_import) |
  # "checkpoint" (this project's orbax folder, e.g. another workdir's pretrain/) | "none"
  c.pretrain.source = "train"
  c.pretrain.path = ""  # file/folder for source="npz"/"state_dict"/"checkpoint"
  # source="npz"/"state_dict": parameter-name regexes (full match) kept at init, not loaded.
  c.pretrain.dont_load = ("head/.*",)
  # source="train" with a `dataset`: a folder shared by runs holding each pre-trained backbone
  # once, keyed by its pre-training config (model, dataset, size, normalisation, recipe);
  # concurrent runs wait on a file lock for the one that trains. "" = pre-train in the workdir.
  c.pretrain.cache_dir = ""
  # source="train": "" trains on the data's own pretrain split; a dataset name ("cifar100",
  # ...) on that dataset's train split (its own head), then transfers all but the head.
  c.pretrain.dataset = ""
  c.pretrain.images_per_class = ml_collections.config_dict.placeholder(int)  # None = all
  c.pretrain.train = train_group(epochs=30, lr=0.05, batch_size=64, loss="ce", bn_mode="train")
  c.pretrain.train.weight_decay = 5e-4
  c.pretrain.batch_stats = "running"  # BN: "running" (the EMA) | "recompute" (on pretrain images)

  # PEFT fine-tuning of the trainable collection (Full on D, Retrain on D_r; same protocol).
  # Squared loss, a small learning rate and BN in train mode keep standard fine-tuning close
  # to the linearised model the update assumes: the best cell of the README's regime map
  # (Avg. Gap 0.09 at lr 0.002; cross-entropy or lr 0.05 leave it at 46-50 points).
  c.finetune = finetune_group(epochs=40, lr=0.002, batch_size=64, bn_mode="train")

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
  # ridge solution at w0 over D, `unlearn.stream`), built once per seed, kept in the workdir;
  # results give its cold time and the request's latency apart. False: the one-shot update.
  c.unlearn.serve = False
  # serve: keep D's Jacobian rows (n·C·p numbers in the solve dtype) when they take at most
  # this many GiB; a request then needs no backward pass and subtracts the very rows summed
  # into G (recomputed rows may round differently: a warning names the bound). 0: never.
  c.unlearn.jacobian_cache_gib = 4.0
  # A forget sample listed twice, or also in D_r, is refused; 0 compares inputs exactly, > 0
  # also inputs of the same label within this distance in every entry (near-duplicates).
  c.unlearn.duplicate_tolerance = 0.0
  # Certified removal (unlearn.release, docs/certified_removal.md): a deletion is certified
  # when its bound on ‖w − w_r‖ is at most this fraction of ‖w_r − w0‖ (w_r: f_lin's retrain).
  c.unlearn.certify_threshold = 1e-3
  # True: Fast-NTK's released model is w + N(0, σ²I) with σ calibrated to the certificate's
  # bound, (epsilon, delta)-indistinguishable from the retrain released the same way.
  c.unlearn.certified = False
  c.unlearn.epsilon = 1.0  # the released model's ε (certified=True)
  c.unlearn.delta = 1e-5  # and its δ
  # The ε whose accuracy cost (UA/RA/TA with and without noise) results report, at delta.
  c.unlearn.release_epsilons = (0.1, 1.0, 10.0)
  # The Ed25519 key that signs each record of the deletion log, kept outside the workdir (created on
  # first use, mode 0600). "" = $FASTNTK_AUDIT_KEY or ~/.config/fastntk_jax/audit_ed25519.pem.
  c.unlearn.signing_key = ""

  # The method plug-ins' blocks (fastntk_jax/experiment/methods/<name>.py; Fast-NTK's: `unlearn`).
  c.baselines = ml_collections.ConfigDict()
  # Max Loss: gradient ascent on D_f from Full.
  c.baselines.max_loss = train_group(epochs=5, lr=0.01, batch_size=64, loss="ce")
  # Random Label: fine-tune Full on D_f with random wrong labels.
  c.baselines.random_label = train_group(epochs=5, lr=0.01, batch_size=64, loss="ce")
  # FT: fine-tune Full on D_r alone (Unlearn-Sparse's recipe: 10 epochs, lr 0.01, CE).
  c.baselines.ft = train_group(epochs=10, lr=0.01, batch_size=64, loss="ce")
  # The field's comparison set, each with its reference's defaults (the plug-in's docstring):
  # NegGrad+ (α·CE_r − (1 − α)·CE_f), l1-sparse (FT + α(1 − t/E)‖θ‖₁), SalUn (random labels,
  # salient entries only), SCRUB (max KL to Full on D_f, min on D_r), SSD (dampening), Bad
  # Teacher (distillation from a random and a competent teacher), IU (WoodFisher step).
  c.baselines.neggrad_plus = train_group(epochs=10, lr=0.01, batch_size=64, loss="ce")
  c.baselines.neggrad_plus.alpha = 0.95  # weight of D_r's loss; 1 - alpha weighs D_f's ascent
  c.baselines.l1_sparse = train_group(10, 0.01, 64, loss="ce", weight_decay=5e-4)
  c.baselines.l1_sparse.alpha = 5e-4  # the ℓ1 weight at the first epoch, decaying linearly to 0
  c.baselines.salun = train_group(10, 0.013, 64, loss="ce", weight_decay=5e-4)
  c.baselines.salun.threshold = 0.5  # the fraction of entries with the largest |∇CE(D_f)| trained
  c.baselines.scrub = train_group(3, 5e-4, 64, loss="ce", weight_decay=5e-4)
  c.baselines.scrub.max_steps = 2  # epochs that start with the max pass over D_f
  c.baselines.scrub.temperature = 4.0  # distillation temperature T (KL times T²)
  c.baselines.scrub.gamma = 0.99  # weight of CE on D_r in the min pass
  c.baselines.scrub.alpha = 0.001  # weight of KL to Full on D_r in the min pass
  c.baselines.scrub.forget_batch_size = 64  # D_f rows per step of the max pass
  c.baselines.ssd = ml_collections.ConfigDict()  # no training
  c.baselines.ssd.alpha = 10.0  # selection weighting: dampen where []_f > alpha·[]_D
  c.baselines.ssd.lam = 1.0  # dampening constant: θ ← min(lam·[]_D/[]_f, 1)·θ
  c.baselines.ssd.batch_size = 64  # minibatch of the squared-gradient importances
  c.baselines.bad_teacher = train_group(1, 1e-4, 64, optimizer="adam", loss="ce")
  c.baselines.bad_teacher.temperature = 1.0  # KL temperature T of both teachers
  c.baselines.bad_teacher.retain_fraction = 0.3  # share of D_r (seeded) distilled from Full
  c.baselines.iu = ml_collections.ConfigDict()  # no training
  c.baselines.iu.alpha = 0.2  # step size of the influence update
  c.baselines.iu.fisher_samples = 1000  # N: retain examples of the recursion, and its damping
  # Methods registered from outside the package (`methods.register`): their own blocks.
  for method in methods_registry.registered():
    c.baselines[method.name] = method.default_block()

  c.eval = ml_collections.ConfigDict()
  c.eval.relearn = train_group(100, 0.01, 64, loss="ce")  # D_f until loss < threshold; epochs = cap
  c.eval.relearn_threshold = 0.05  # relearn time = epochs until D_f training loss < this
  c.eval.relearn_attack = train_group(10, 0.01, 64, loss="ce")  # D_r only; D_f acc per epoch
  c.eval.mia_subsamples = 20  # MIA-Efficacy's range over this many member subsamples (>= 1)
  c.eval.probe = train_group(epochs=30, lr=0.05, batch_size=64, loss="ce")  # linear probe of a fresh head
  c.eval.batch_size = 256  # inference batch
  c.eval.population_seeds = 0  # the audits' population: N seeds of every method, N of Retrain

  # Fair tuning (experiment/tuning.py): each grid on a validation seed, nearest its Retrain.
  c.tuning = ml_collections.ConfigDict()
  c.tuning.enabled = True  # False: every method runs with its block as written
  c.tuning.seed = 90_000  # the validation seed (not a report seed, not a population seed)
  c.tuning.max_trials = 16  # the budget per method: a larger grid is refused
  c.tuning.mia_subsamples = 10  # MIA-Efficacy of each trial: mean over this many subsamples

  c.lock()
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
  """`cfg` has exactly the schema's keys (catches configs built without base_config)."""
  reference = base_config() if reference is None else reference
  missing = [key for key in reference.keys() if key not in cfg]
  if missing:
    raise ValueError(f"config{'.' + prefix[:-1] if prefix else ''} lacks the field(s) "
                     f"{missing}; build configs from fastntk_jax.config.base_config() (or "
                     "configs/common.py), which has every field with its default")
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
  seeds = tuple(cfg.seeds) if isinstance(cfg.seeds, (tuple, list)) else None
  if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
                      for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds={cfg.seeds!r} must be a non-empty list of distinct ints "
                     ">= 0, e.g. '(0, 1, 2)'")
  _check_methods(cfg)
  _check_tuning(cfg, seeds)
  _choice("model.name", cfg.model.name, enums.values(enums.ModelName))
  _check_model_options(cfg)
  _choice("pretrain.source", cfg.pretrain.source, PRETRAIN_SOURCES)
  if cfg.pretrain.dataset:
    _choice("pretrain.dataset", cfg.pretrain.dataset, data_schema.DATASETS)
  if cfg.pretrain.source in ("npz", "state_dict", "checkpoint") and not cfg.pretrain.path:
    raise ValueError(f"config.pretrain.path must name the file for pretrain.source="
                     f"{cfg.pretrain.source!r}")
  if cfg.pretrain.source == "state_dict" and not cfg.model.name.startswith(("resnet", "mobilenet")):
    raise ValueError(f"config.pretrain.source='state_dict' imports PyTorch CIFAR ResNets and Mobile"
                     f"NetV2s, not model.name={cfg.model.name!r}; a ViT: pretrain.source='npz'")
  _check_patterns("pretrain.dont_load", cfg.pretrain.dont_load)
  _choice("pretrain.batch_stats", cfg.pretrain.batch_stats, enums.values(enums.PretrainBatchStats))
  if cfg.pretrain.batch_stats == "recompute" and cfg.pretrain.train.bn_mode != "train":
    raise ValueError("config.pretrain.batch_stats='recompute' needs pretrain.train.bn_mode="
                     "'train' (frozen BN learns the weights for the statistics they have)")
  if cfg.pretrain.images_per_class is not None:  # None = every image of pretrain.dataset
    _positive("pretrain.images_per_class", cfg.pretrain.images_per_class, integer=True)
  if cfg.data.draw_per_seed and cfg.pretrain.source == "train" and not cfg.pretrain.dataset:
    raise ValueError("config.data.draw_per_seed=True draws other images per seed, but "
                     "pretrain.source='train' pre-trains on the data's own pretrain split once; "
                     "set pretrain.dataset, another pretrain.source, or draw_per_seed=False")
  for prefix in train_groups(cfg):
    _validate_train(prefix, node(cfg, prefix))
  _choice("finetune.mode", cfg.finetune.mode, enums.values(enums.FinetuneMode))
  _choice("finetune.linearized_solver", cfg.finetune.linearized_solver,
          enums.values(enums.LinearizedSolver))
  if cfg.finetune.mode == "linearized":
    # Linearised fine-tuning is the ridge problem Eq. (1) inverts (squared loss, pre-trained
    # BN statistics, the data as given, ½λ‖w - w0‖² alone): other choices are refused.
    for field, wanted, why in (
        ("loss", "mse", "linearised fine-tuning minimises the squared loss (the objective the "
         "update inverts)"),
        ("bn_mode", "frozen", "the linearised network keeps the pre-trained BatchNorm "
         "statistics"),
        ("weight_decay", 0.0, "the linearised objective's only penalty is "
         "½·unlearn.damping·‖w - w0‖² (raise unlearn.damping instead)"),
        ("augment", "none", "the update inverts the fit to the data as given")):
      value = cfg.finetune[field]
      if value != wanted:
        raise ValueError(f"config.finetune.{field}={value!r} with finetune.mode='linearized': "
                         f"{why}; set finetune.{field}={wanted!r}, or finetune.mode='standard'")
    if cfg.unlearn.linearize_at != "init":
      # f_lin's Jacobian is J(w0) everywhere; the network's at the trained params is another
      # model's (measured on :tiny: Fast-NTK RA 38.9% against Retrain's 100%).
      raise ValueError(f"config.unlearn.linearize_at={cfg.unlearn.linearize_at!r} with "
                       "finetune.mode='linearized': the linearised model's Jacobian is the "
                       "network's at w0 wherever it is taken; set unlearn.linearize_at='init', "
                       "or finetune.mode='standard'")
  u = cfg.unlearn
  _positive("unlearn.damping", u.damping, integer=False, allow_zero=True)
  _positive("unlearn.duplicate_tolerance", u.duplicate_tolerance, integer=False, allow_zero=True)
  _positive("unlearn.certify_threshold", u.certify_threshold, integer=False)
  if not isinstance(u.certified, bool):
    raise ValueError(f"config.unlearn.certified={u.certified!r} must be True or False")
  epsilons = u.release_epsilons
  if isinstance(epsilons, str) or not isinstance(epsilons, (tuple, list)):
    raise ValueError(f"config.unlearn.release_epsilons={epsilons!r} must be a list of ε, e.g. "
                     "'(0.1, 1.0, 10.0)' (or () for none)")
  for field, value in [("epsilon", u.epsilon)] + [("release_epsilons", e) for e in epsilons]:
    _positive(f"unlearn.{field}", value, integer=False)
    if value > 100:
      raise ValueError(f"config.unlearn.{field}={value!r}: ε must be in (0, 100]")
  _positive("unlearn.delta", u.delta, integer=False)
  if not u.delta < 1:
    raise ValueError(f"config.unlearn.delta={u.delta!r} must be in (0, 1), e.g. 1e-5")
  if not isinstance(u.signing_key, str):
    raise ValueError(f"config.unlearn.signing_key={u.signing_key!r} must be a file path or ''")
  if u.certified and cfg.finetune.mode != "linearized":
    raise ValueError("config.unlearn.certified=True with finetune.mode="
                     f"{cfg.finetune.mode!r}: the certificate bounds the distance to the "
                     "linearised model's retrain, which says nothing about a network fine-tuned "
                     "in the standard mode; set finetune.mode='linearized'")
  if u.certified and "fastntk" not in cfg.methods:
    raise ValueError("config.unlearn.certified=True releases Fast-NTK's model with noise, but "
                     "config.methods does not run 'fastntk'")
  if "fastntk" in cfg.methods and not u.damping > 0:
    raise ValueError(f"config.unlearn.damping={u.damping!r}: every Fast-NTK deletion of a run is "
                     "certified, and the certificate's bound divides by λ; set "
                     "unlearn.damping > 0, e.g. --config.unlearn.damping=0.01")
  if cfg.finetune.mode == "linearized" and not u.damping > 0:
    raise ValueError(f"config.unlearn.damping={u.damping!r} with finetune.mode='linearized': the "
                     "linearised objective's ridge penalty must be > 0 (its minimiser inverts "
                     "G + λI, singular when p exceeds the n·C outputs); e.g. "
                     "--config.unlearn.damping=0.01")
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
  for field, zero in (("batch_size", False), ("mia_subsamples", False), ("population_seeds", True)):
    _positive(f"eval.{field}", cfg.eval[field], integer=True, allow_zero=zero)
  if cfg.eval.population_seeds in (1, 2):  # U-LiRA: 2 shadow models and 1 target a side
    raise ValueError(f"config.eval.population_seeds={cfg.eval.population_seeds}: the audits "
                     "need at least 3 models a side (0 turns them off)")
  data_schema.resolve_data_config(cfg.data)  # raises naming the data field
  return cfg


def _check_model_options(cfg) -> None:
  options = cfg.model.options
  if not hasattr(options, "items"):
    raise ValueError(f"config.model.options={options!r} must be a group of the model's options, "
                     f"e.g. {{'shortcut': 'B'}}")
  allowed = enums.model_options(cfg.model.name)
  for key, value in options.items():
    if key not in allowed:
      raise ValueError(f"config.model.options.{key}: {cfg.model.name} has no option {key!r}; "
                       f"its options: {list(allowed)}")
    if value is None:
      raise ValueError(f"config.model.options.{key}=None: leave the option out for its "
                       "default, or give a value")


def node(cfg, dotted: str):
  """The field or group of `cfg` at a dotted path ("baselines.ft")."""
  found = cfg
  for part in dotted.split("."):
    found = found[part]
  return found


_TRAIN_FIELDS = frozenset(train_group(1, 1.0, 1).keys())


def _is_train_group(node) -> bool:
  return isinstance(node, ml_collections.ConfigDict) and _TRAIN_FIELDS <= set(node.keys())


def train_groups(cfg) -> tuple[str, ...]:
  """The dotted paths of every training group of `cfg` (each validated as one, and each
  batch size a multiple of the device count under data parallelism): the fixed ones, and
  every group under `baselines` (at any depth) that has all of a training group's fields (a
  plug-in's block may hold more fields, or training groups inside it)."""
  fixed = ("pretrain.train", "finetune", "eval.relearn", "eval.relearn_attack", "eval.probe")
  found = []

  def visit(node, path):
    if _is_train_group(node):
      found.append(path)
    if isinstance(node, ml_collections.ConfigDict):
      for key in node.keys():
        visit(node[key], f"{path}.{key}")

  visit(cfg.baselines, "baselines")
  return fixed + tuple(found)


def set_method_epochs(cfg, epochs: int) -> None:
  """Sets `epochs` in every training group of the method plug-ins' blocks (`baselines`, at
  any depth): the configs' seconds-long test modes."""
  for path in train_groups(cfg):
    if path.startswith("baselines."):
      node(cfg, path).epochs = epochs


POPULATION_SEED_BASE = 100_000  # the KLoM population's seeds: + k, never a report seed


def _check_tuning(cfg, seeds) -> None:
  """The tuning's fields, and a validation seed no report or population uses."""
  t = cfg.tuning
  _positive("tuning.seed", t.seed, integer=True, allow_zero=True)
  _positive("tuning.max_trials", t.max_trials, integer=True)
  _positive("tuning.mia_subsamples", t.mia_subsamples, integer=True)
  n = cfg.eval.population_seeds if isinstance(cfg.eval.population_seeds, int) else 0
  if t.enabled and t.seed in seeds:
    raise ValueError(f"config.tuning.seed={t.seed} is a report seed (config.seeds={seeds}): "
                     "the tuning must never see a seed it reports")
  if t.enabled and POPULATION_SEED_BASE <= t.seed < POPULATION_SEED_BASE + 2 * n:
    raise ValueError(f"config.tuning.seed={t.seed} is a seed of the KLoM population "
                     f"({POPULATION_SEED_BASE}..{POPULATION_SEED_BASE + 2 * n - 1})")


def _check_methods(cfg) -> None:
  allowed = tuple(methods_registry.REFERENCES) + methods_registry.names()
  methods = cfg.methods
  if isinstance(methods, str) or not isinstance(methods, (tuple, list)):
    raise ValueError(f"config.methods={methods!r} must be a list of method names, e.g. "
                     "'(\"fastntk\", \"max_loss\")'; allowed: " + str(list(allowed)))
  for m in methods:
    if isinstance(m, str) and "," in m:
      names = ",".join(f'"{n.strip()}"' for n in m.split(","))
      raise ValueError(f"config.methods: {m!r} is one name with commas in it; give the list "
                       f"quoted, e.g. --config.methods='({names})'")
    if m not in allowed:
      raise ValueError(f"config.methods: unknown method {m!r}; allowed: {list(allowed)}")
  if len(set(methods)) != len(methods):
    raise ValueError(f"config.methods={tuple(methods)!r} names a method twice")


def solve_dtype(cfg) -> Optional[Any]:
  """The solve dtype `unlearn.solve_dtype` asks for: numpy's float64 (JAX's 64-bit mode on for
  the run), or None for the params' own (float32)."""
  return np.dtype(np.float64) if cfg.unlearn.solve_dtype == "float64" else None


def ignored_fields(cfg) -> list[str]:
  """One note per config field the chosen mode does not use (logged once per run)."""
  notes = []
  ft = cfg.finetune
  if ft.mode == "linearized":
    notes.append(f"finetune.linearized_solver={ft.linearized_solver!r}: Full and Retrain are the "
                 "linearised model's ridge minimisers, solved, not trained, so finetune.epochs, "
                 "learning_rate, batch_size, optimizer, momentum, schedule, warmup_epochs, "
                 "decay_epochs and decay_factor are not used")
  elif ft.linearized_solver != "closed_form":  # set, but standard mode trains by SGD
    notes.append("finetune.mode='standard': finetune.linearized_solver is not used")
  if not cfg.unlearn.serve:
    notes.append("unlearn.serve=False: unlearn.jacobian_cache_gib is not used")
  if not cfg.unlearn.certified:
    notes.append("unlearn.certified=False: the released model carries no noise, so unlearn.eps"
                 "ilon is not used (the release's cost at unlearn.release_epsilons is reported)")
  notes.append("tuning.enabled=True: every field a method's grid covers (results.md, 'Fair "
               "tuning') is chosen on the validation seed tuning.seed, whatever its block "
               "says; tuning.enabled=False runs the blocks as written" if cfg.tuning.enabled
               else "tuning.enabled=False: every method runs its block as written, so "
               "tuning.seed, max_trials and mia_subsamples are not used")
  if "fastntk" not in cfg.methods:
    notes.append("config.methods has no 'fastntk': nothing is certified or logged, so unlearn."
                 "certify_threshold, release_epsilons, delta and signing_key are not used")
  return notes
