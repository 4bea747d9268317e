"""The data config (every field, its default and allowed values), its validation, and the
containers the loader returns (:class:`Split`, :class:`UnlearningData`).

Imports nothing heavy (numpy and ml_collections only), so that `fastntk_jax.config` can build and
validate the data config without JAX, Flax or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

DATASETS = ("digits", "cifar10", "cifar100", "imagenet_r")
FORGET_MODES = ("class", "samples", "subpopulation")
CLASS_CHOICES = ("first", "random")
FORGET_CHOICES = ("fixed", "random")
# Random-stream id (second entry of the seed sequence) of the forget-class draw; the class
# draw uses splits._STREAM_CLASS_CHOICE. Distinct from every per-class stream of splits.py.
STREAM_FORGET_CLASSES = 4

# Per-channel (mean, std) of images scaled to [0, 1]; None means "map [0, 1] to [-1, 1]".
# "cifar" is the CIFAR-10 training-set statistics (the std is the true per-pixel std, 0.247..,
# not the often-copied 0.2023.. which is a std of per-image means).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None | str] = {
  "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "vit": None,  # [-1, 1], the preprocessing of the google-research/vision_transformer weights
  "inception": None,  # same as "vit" (big_vision calls it value_range(-1, 1))
  "none": "none",  # leave pixels in [0, 1]
}

# Class counts in each dataset's own label space (for imagenet_r: after mapping to 0..199).
NUM_DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet_r": 200}

# What a None in the config resolves to, per dataset. Kept in one table so the choices are visible.
#   image_size: the resolution the paper's models take (digits: a cheap CPU-sized default).
#   holdout_per_class: None for CIFAR = the whole TFDS test split of the class.
#   pretrain_per_class: 0 = no pre-training split (backbone from a checkpoint, as in the paper).
DATASET_DEFAULTS = {
  "digits": dict(image_size=16, normalization="cifar", holdout_per_class=30,
                 pretrain_per_class=80),
  "cifar10": dict(image_size=32, normalization="cifar", holdout_per_class=None,
                  pretrain_per_class=0),
  "cifar100": dict(image_size=32, normalization="cifar100", holdout_per_class=None,
                   pretrain_per_class=0),
  "imagenet_r": dict(image_size=224, normalization="vit", holdout_per_class=25,
                     pretrain_per_class=0),
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def default_data_config() -> ml_collections.ConfigDict:
  """The data config: every field with its default. Experiment configs extend or override it.

  A None marked "dataset default" resolves per dataset (table ``DATASET_DEFAULTS``); the resolved
  values are stored in ``UnlearningData.config``.

  Returns:
    A fresh, unlocked ``ml_collections.ConfigDict``.
  """
  # Optional fields are typed placeholders (None by default) so that they can be set from
  # the command line, e.g. --config.data.data_dir=/data/tfds.
  placeholder = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.name = "digits"  # "digits" (embedded, offline) | "cifar10" | "cifar100" | "imagenet_r"
  c.data_dir = placeholder(str)  # TFDS data_dir (None: TFDS default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.manual_dir = placeholder(str)  # folder holding the dataset archive; only then is TFDS asked to prepare it
  c.image_size = placeholder(int)  # square side in pixels; dataset default: digits 16, CIFAR 32, IN-R 224
  # "cifar" | "cifar100" | "imagenet" (per-channel mean/std) | "vit" | "inception" ([-1, 1]) |
  # "none" ([0, 1]); dataset default: digits/cifar10 "cifar", cifar100 "cifar100",
  # imagenet_r "vit".
  c.normalization = placeholder(str)
  c.num_classes = placeholder(int)  # number of classes used (see class_choice); None = all
  c.classes = None  # explicit list of dataset class ids (label i := classes[i]); None: class_choice
  # How num_classes classes are chosen when `classes` is None: "first" (the first k dataset
  # classes) | "random" (k classes drawn with the seed, uniformly among the classes that have
  # enough images for holdout_per_class + pretrain_per_class + images_per_class; sorted by
  # dataset id; the paper's ImageNet-R subsets).
  c.class_choice = "first"
  # "fixed": forget_classes as given | "random": len(forget_classes) labels drawn with the
  # seed among the num_classes chosen ones (the paper: "we randomly choose one class").
  c.forget_choice = "fixed"
  # For the pipeline (the loader ignores it): False = one draw (`seed`) shared by every run
  # seed; True = run seed s draws its own classes, forget classes and images with data seed
  # `seed + s` (the paper's ImageNet-R runs: the ± then includes the choice of classes).
  c.draw_per_seed = False
  c.images_per_class = 60  # #IPC of the fine-tuning set D; None = every image left in the pool
  # Hold-out images per class; dataset default: digits 30, CIFAR the whole test split,
  # ImageNet-R 25.
  c.holdout_per_class = placeholder(int)
  # Pre-training images per class, disjoint from D and the hold-out; 0 = no pretrain split.
  # Dataset default: digits 80, others 0 (the paper's backbones come from checkpoints).
  c.pretrain_per_class = placeholder(int)
  # Remapped labels: forget_mode="class": the classes forming D_f; "subpopulation": exactly one,
  # the class the subpopulation is drawn from (it stays a retain class); ignored by "samples".
  c.forget_classes = (0,)
  # "class" (whole classes, the paper's) | "samples" (a seeded random subset of D) |
  # "subpopulation" (a seeded image of class forget_classes[0] and its nearest neighbours in
  # that class in the pre-trained features, `splits.subpopulation_masks`; no test forget side).
  c.forget_mode = "class"
  # forget_mode="samples" / "subpopulation": fraction of D forgotten, in (0, 1); None otherwise.
  c.forget_fraction = placeholder(float)
  c.seed = 0  # every random choice (class splits, forget samples) derives from it
  return c


def is_int(v: Any) -> bool:
  """True for a Python or NumPy integer that is not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_choice(field: str, v: Any, choices: Sequence[str]) -> None:
  """A ValueError naming the data-config ``field`` unless ``v`` is one of ``choices``."""
  if v not in choices:
    raise ValueError(f"data config: {field} must be one of {list(choices)}, got {v!r}")


def _check_int(field: str, v: Any, *, minimum: int, allow_none: bool, none_means: str = "") -> None:
  if v is None and allow_none:
    return
  if not is_int(v) or v < minimum:
    also = f" or None ({none_means})" if allow_none else ""
    raise ValueError(f"data config: {field} must be an int >= {minimum}{also}, got {v!r}")


def _check_int_list(field: str, v: Any, *, upper: int, upper_what: str) -> tuple[int, ...]:
  if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
    raise ValueError(f"data config: {field} must be a list of ints, got {v!r}")
  items = list(v)
  if not items:
    raise ValueError(f"data config: {field} must not be empty")
  for i in items:
    if not is_int(i) or not 0 <= i < upper:
      raise ValueError(
        f"data config: {field} entries must be ints in [0, {upper}) ({upper_what}), "
        f"got {i!r} in {items}"
      )
  if len(set(items)) != len(items):
    raise ValueError(f"data config: {field} has duplicates: {items}")
  return tuple(int(i) for i in items)


def resolve_data_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
                        **overrides: Any) -> ml_collections.FrozenConfigDict:
  """Merges ``cfg`` and ``overrides`` into the defaults, validates, and fills dataset defaults.

  Args:
    cfg: a ConfigDict / FrozenConfigDict / mapping with a subset of the fields of
      :func:`default_data_config`, or None.
    **overrides: field values applied after ``cfg``.

  Returns:
    A FrozenConfigDict: dataset defaults filled in, ``num_classes`` always set, ``classes``
    set unless ``class_choice="random"`` left the draw to the loader (whose
    ``UnlearningData.config`` then holds it), ``forget_classes`` drawn if
    ``forget_choice="random"``. None remains only where it means "all"
    (``images_per_class``; ``holdout_per_class`` for CIFAR: the whole test split) or "unused"
    (``data_dir``, ``manual_dir``, ``forget_fraction`` in class mode, ``forget_classes`` in
    samples mode). Resolving it again returns it unchanged. A subpopulation needs one forget
    class and a ``forget_fraction`` (refused here when too large for a fixed #IPC).

  Raises:
    ValueError: naming the field, for an unknown field or a bad value.
  """
  merged = default_data_config().to_dict()
  for source in (cfg, overrides):
    if source is None:
      continue
    if isinstance(source, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
      source = source.to_dict()
    if not isinstance(source, Mapping):
      raise ValueError(
        f"data config must be a ConfigDict or a mapping, got {type(source).__name__}"
      )
    unknown = sorted(set(source) - set(merged))
    if unknown:
      raise ValueError(
        f"data config: unknown field(s) {unknown}; known fields: {sorted(merged)}"
      )
    merged.update(source)
  c = merged

  check_choice("name", c["name"], DATASETS)
  name = c["name"]
  for key, value in DATASET_DEFAULTS[name].items():
    if c[key] is None:  # CIFAR's hold-out default stays None: the whole test split
      c[key] = value

  for field in ("data_dir", "manual_dir"):
    if c[field] is not None and not isinstance(c[field], (str, os.PathLike)):
      raise ValueError(
        f"data config: {field} must be a path string or None, got {c[field]!r}"
      )
    if c[field] is not None:
      c[field] = os.fspath(c[field])
  _check_int("image_size", c["image_size"], minimum=1, allow_none=False)
  check_choice("normalization", c["normalization"], tuple(NORMALIZATIONS))

  total = NUM_DATASET_CLASSES[name]
  if c["classes"] is not None:
    c["classes"] = list(_check_int_list("classes", c["classes"], upper=total,
                                        upper_what=f"{name} has {total} classes"))
    if len(c["classes"]) < 2:
      raise ValueError(
        f"data config: classes must name at least 2 classes, got {c['classes']}"
      )
    if c["num_classes"] is not None and c["num_classes"] != len(c["classes"]):
      raise ValueError(
        f"data config: num_classes={c['num_classes']} disagrees with classes "
        f"({len(c['classes'])} entries); set one of them, or make them agree"
      )
    c["num_classes"] = len(c["classes"])
  else:
    _check_int("num_classes", c["num_classes"], minimum=2, allow_none=True, none_means="all")
    if c["num_classes"] is None:
      c["num_classes"] = total
    if c["num_classes"] > total:
      raise ValueError(
        f"data config: num_classes={c['num_classes']} but {name} has {total} classes"
      )
    # class_choice="random" leaves `classes` to the loader, which knows how many images each
    # class has (`splits.choose_classes`); its UnlearningData.config holds the draw.
    if c["class_choice"] != "random":
      c["classes"] = list(range(c["num_classes"]))

  _check_int("images_per_class", c["images_per_class"], minimum=1, allow_none=True,
             none_means="all")
  _check_int("holdout_per_class", c["holdout_per_class"], minimum=1,
             allow_none=name in ("cifar10", "cifar100"), none_means="the whole test split")
  _check_int("pretrain_per_class", c["pretrain_per_class"], minimum=0, allow_none=False)
  _check_int("seed", c["seed"], minimum=0, allow_none=False)

  check_choice("class_choice", c["class_choice"], CLASS_CHOICES)
  check_choice("forget_choice", c["forget_choice"], FORGET_CHOICES)
  check_choice("forget_mode", c["forget_mode"], FORGET_MODES)
  mode = c["forget_mode"]
  if mode == "class":
    if c["forget_fraction"] is not None:
      raise ValueError(
        "data config: forget_fraction is only used with forget_mode='samples' or "
        "'subpopulation'; set it to None for forget_mode='class' (got "
        f"{c['forget_fraction']!r})"
      )
  else:
    f = c["forget_fraction"]
    is_number = isinstance(f, (int, float, np.floating)) and not isinstance(f, bool)
    if not is_number or not 0.0 < float(f) < 1.0:
      raise ValueError(
        "data config: forget_fraction must be a float in (0, 1) with "
        f"forget_mode={mode!r}, got {f!r}"
      )
    c["forget_fraction"] = float(f)
  if mode in ("class", "subpopulation"):
    forget = _check_int_list(
      "forget_classes", c["forget_classes"], upper=c["num_classes"],
      upper_what=f"remapped labels of the {c['num_classes']} chosen classes; "
                 "a forget class must be among the chosen classes",
    )
    if mode == "subpopulation" and len(forget) != 1:
      raise ValueError(
        "data config: forget_mode='subpopulation' needs exactly one class in forget_classes "
        f"(the class the subpopulation is drawn from), got {list(forget)}"
      )
    if len(forget) >= c["num_classes"]:
      raise ValueError(
        f"data config: forget_classes={list(forget)} covers all {c['num_classes']} "
        "classes; the retain set D_r would be empty"
      )
    if c["forget_choice"] == "random":
      # As many as given, drawn among the chosen labels; depends on (seed, num_classes) only,
      # so resolving the result again draws the same.
      rng = np.random.default_rng([c["seed"], STREAM_FORGET_CLASSES])
      forget = sorted(int(k) for k in rng.choice(c["num_classes"], size=len(forget),
                                                 replace=False))
    c["forget_classes"] = list(forget)
    if mode == "subpopulation" and c["images_per_class"] is not None:
      # Every class has images_per_class images in D: the size is known now, before any work.
      ipc = c["images_per_class"]
      subpopulation_size(c["forget_fraction"], c["num_classes"] * ipc, ipc, forget[0],
                         d_what=f"num_classes={c['num_classes']} x images_per_class={ipc}")
  else:
    c["forget_classes"] = None  # sample-level forgetting has no forget classes
  return ml_collections.FrozenConfigDict(c)


def subpopulation_size(fraction: float, d_size: int, class_size: int, label: int, *,
                       d_what: str = "") -> int:
  """k = max(1, round(fraction · |D|)) images of a subpopulation; ValueError naming
  forget_fraction and forget_classes when k exceeds the class's `class_size` images in D or
  would leave D_r empty (`d_what`: how |D| is made up, for the message)."""
  k = max(1, round(float(fraction) * d_size))
  if k > min(class_size, d_size - 1):
    made_of = f" ({d_what})" if d_what else ""
    raise ValueError(
      f"data config: forget_mode='subpopulation' with forget_fraction={fraction:g} of D's "
      f"{d_size} images{made_of} asks for {k} images, but forget_classes=[{label}] has only "
      f"{class_size} images in D (the subpopulation is drawn within that one class); lower "
      f"forget_fraction to at most {min(class_size, d_size - 1) / d_size:.4g} (or num_classes)"
    )
  return k


# --------------------------------------------------------------------------------------------------
# Result containers
# --------------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  a.setflags(write=False)
  return a


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Images and labels of one part of the data. ``x, y = split`` unpacks the arrays.

  Attributes:
    x: (n, H, W, 3) float32, normalised NHWC images (read-only).
    y: (n,) int32 labels in ``0..num_classes-1`` (read-only).
    index: (n,) int64 position of each image in its source pool (``source``), so that
      provenance and disjointness can be checked (read-only).
    source: the pool the indices refer to, e.g. ``"digits"``, ``"cifar10/train"``.
  """

  x: np.ndarray
  y: np.ndarray
  index: np.ndarray
  source: str

  def __post_init__(self):
    n = self.x.shape[0]
    if self.x.ndim != 4 or self.y.shape != (n,) or self.index.shape != (n,):
      raise ValueError(
        f"Split shapes disagree: x {self.x.shape}, y {self.y.shape}, "
        f"index {self.index.shape}"
      )
    object.__setattr__(self, "x", _readonly(self.x.astype(np.float32, copy=False)))
    object.__setattr__(self, "y", _readonly(self.y.astype(np.int32, copy=False)))
    object.__setattr__(self, "index", _readonly(self.index.astype(np.int64, copy=False)))

  def __iter__(self):
    # Lets callers write `x_r, y_r = data.retain`.
    return iter((self.x, self.y))

  @property
  def size(self) -> int:
    """Number of images."""
    return int(self.x.shape[0])

  def subset(self, mask: np.ndarray) -> "Split":
    """The rows where the (size,) bool ``mask`` is True, in order, from the same source."""
    return Split(self.x[mask], self.y[mask], self.index[mask], self.source)

  def class_counts(self, num_classes: int) -> np.ndarray:
    """(num_classes,) int64 number of images per label."""
    return np.bincount(self.y, minlength=num_classes)


def _concat(a: Split, b: Split) -> Split:
  source = a.source if a.source == b.source else f"{a.source}+{b.source}"
  return Split(
    x=np.concatenate([a.x, b.x]),
    y=np.concatenate([a.y, b.y]),
    index=np.concatenate([a.index, b.index]),
    source=source,
  )


@dataclasses.dataclass(frozen=True)
class Subpopulation:
  """A forget_mode="subpopulation" forget set: the `size` images of class `label` in D
  nearest the `anchor` (its `Split.index`) in the pre-trained features ("head_input", or
  "logits" for a model without a head); anchor and features are None until
  `experiment.prepare.resolve_forget_set` chose D_f (`splits.subpopulation_masks`)."""

  label: int
  size: int
  anchor: int | None = None
  features: str | None = None

  @property
  def pending(self) -> bool:
    """True until the features have chosen D_f (the forget side is then empty)."""
    return self.anchor is None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class UnlearningData:
  """Everything an unlearning run needs, as numpy arrays. Built by ``load_unlearning_data``.

  Attributes:
    pretrain: pre-training images (disjoint from all other splits), or None.
    retain: D_r, fine-tuning images kept.
    forget: D_f, fine-tuning images to unlearn.
    test_retain: hold-out images of retain classes (the whole hold-out unless "class").
    test_forget: hold-out images of forget classes (empty unless "class").
    num_classes: number of classes after remapping (labels are 0..num_classes-1).
    class_names: (num_classes,) names of the remapped classes (imagenet_r: WordNet ids).
    dataset_classes: (num_classes,) class id in the dataset's own label space for each remapped
      label (imagenet_r: 0..199).
    source_labels: (num_classes,) label as stored by the source (imagenet_r: ImageNet-1k id).
    forget_classes: remapped labels forgotten whole (forget_mode="class"), else ().
    forget_mode: "class", "samples" or "subpopulation".
    image_shape: (H, W, 3) of every image.
    config: the resolved, validated config the data was built from.
    subpopulation: forget_mode="subpopulation"'s `Subpopulation`, else None; while pending,
      D_f is empty and D_r is all of D until ``with_forget`` re-splits D.
  """

  pretrain: Split | None
  retain: Split
  forget: Split
  test_retain: Split
  test_forget: Split
  num_classes: int
  class_names: tuple[str, ...]
  dataset_classes: tuple[int, ...]
  source_labels: tuple[int, ...]
  forget_classes: tuple[int, ...]
  forget_mode: str
  image_shape: tuple[int, int, int]
  config: ml_collections.FrozenConfigDict
  subpopulation: Subpopulation | None = None

  @property
  def forget_pending(self) -> bool:
    """True while a subpopulation forget set waits for the pre-trained features (D_f empty)."""
    return self.subpopulation is not None and self.subpopulation.pending

  def with_forget(self, in_forget: np.ndarray, *,
                  subpopulation: Subpopulation | None = None) -> "UnlearningData":
    """D re-split: D_f = the rows of ``self.train`` where the (train.size,) bool
    ``in_forget`` holds, D_r the others, in train's order (D = D_r ∪ D_f, D_r ∩ D_f = ∅);
    the rest unchanged, ``subpopulation`` replaced when given. ValueError for a mask of
    another shape or dtype, or one leaving D_f or D_r empty."""
    d = self.train
    mask = np.asarray(in_forget)
    if mask.dtype != np.bool_ or mask.shape != (d.size,):
      raise ValueError(f"with_forget: in_forget must be a ({d.size},) bool mask over D, got "
                       f"{mask.dtype} {mask.shape}")
    if not mask.any() or mask.all():
      raise ValueError(f"with_forget: in_forget marks {int(mask.sum())} of D's {d.size} "
                       "images; D_f and D_r must both be non-empty")
    return dataclasses.replace(
      self, retain=d.subset(~mask), forget=d.subset(mask),
      subpopulation=self.subpopulation if subpopulation is None else subpopulation)

  @property
  def train(self) -> Split:
    """D = D_r ∪ D_f (retain first, then forget), what "Full" fine-tunes on; copied per call."""
    return _concat(self.retain, self.forget)

  @property
  def test(self) -> Split:
    """The whole hold-out set (retain classes first). A new copy per call."""
    return _concat(self.test_retain, self.test_forget)

  def splits(self) -> dict[str, Split | None]:
    """The five splits by name, in a fixed order."""
    return {
      "pretrain": self.pretrain,
      "retain": self.retain,
      "forget": self.forget,
      "test_retain": self.test_retain,
      "test_forget": self.test_forget,
    }

  def counts(self) -> dict[str, int]:
    """Number of images per split (0 for a missing pretrain split)."""
    return {k: (0 if s is None else s.size) for k, s in self.splits().items()}

  def describe(self) -> str:
    """A short multi-line summary: dataset, classes, and image counts per split."""
    cfg = self.config
    h, w, c = self.image_shape
    if self.forget_mode == "class":
      forgotten = ", ".join(f"{k} ({self.class_names[k]})" for k in self.forget_classes)
      what = f"forget classes [{forgotten}]"
    elif self.subpopulation is not None:
      sub = self.subpopulation
      what = (f"forget a subpopulation of {sub.size} images of class {sub.label} "
              f"({self.class_names[sub.label]}), fraction {cfg.forget_fraction}: ")
      what += ("pending, chosen from the pre-trained features" if sub.pending else
               f"the nearest neighbours of pool image {sub.anchor} ({sub.features} features)")
    else:
      what = f"forget {self.forget.size} random samples (fraction {cfg.forget_fraction})"
    lines = [
      f"{cfg.name}: {self.num_classes} classes, {what}, images {h}x{w}x{c} float32, "
      f"normalization={cfg.normalization}, seed={cfg.seed}"
    ]
    for key, split in self.splits().items():
      if split is None:
        lines.append(f"  {key:<12} none")
        continue
      per_class = split.class_counts(self.num_classes)
      nonzero = per_class[per_class > 0]
      spread = (
        f"{nonzero.min()}" if nonzero.size and nonzero.min() == nonzero.max()
        else (f"{nonzero.min()}..{nonzero.max()}" if nonzero.size else "0")
      )
      classes = f"{nonzero.size} class{'es' if nonzero.size != 1 else ''}"
      lines.append(
        f"  {key:<12} {split.size:>7}  ({classes}, {spread}/class, from {split.source})"
      )
    return "\n".join(lines)
