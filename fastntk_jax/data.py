"""Data for Fast-NTK unlearning experiments: D = D_r ∪ D_f, a hold-out set, a pre-training split.

One entry point, :func:`load_unlearning_data`, turns a small config (see
:func:`default_data_config`) into an :class:`UnlearningData` of float32 NHWC numpy arrays:

* ``pretrain``     images the backbone may be pre-trained on (disjoint from everything else), or
                   ``None`` where the backbone comes from a checkpoint;
* ``retain``       D_r, the fine-tuning images that are kept;
* ``forget``       D_f, the fine-tuning images to unlearn;
* ``test_retain``  hold-out images of the retain classes;
* ``test_forget``  hold-out images of the forget classes.

Datasets (``name``):

* ``"digits"``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside the wheel, so the
  whole pipeline runs offline and in seconds. The images are upsampled to ``image_size`` and the
  grey channel is repeated three times. One pool is carved per class, in this order, from one
  seeded permutation: hold-out (30), pre-training (80), fine-tuning D (#IPC, 60 by default).
  Classes hold 174..183 images, so the defaults use at most 170 per class.
* ``"cifar10"`` / ``"cifar100"`` (TFDS): D and the optional pre-training split come from the TFDS
  ``train`` split, the hold-out from the ``test`` split. ``pretrain`` is ``None`` by default: the
  paper starts from a backbone pre-trained elsewhere (CIFAR-100 for its CIFAR-10 CNNs); set
  ``pretrain_per_class`` to carve "the rest of CIFAR train" (disjoint from D) when no checkpoint
  is available.
* ``"imagenet_r"`` (TFDS): TFDS ships only a ``test`` split whose labels are ImageNet-1k ids. The
  200 ids present are mapped to 0..199 in increasing ImageNet-1k id order (``class_names`` holds
  the WordNet ids), and each class is split, seeded, into hold-out / pre-training / D like digits.

Selection rules shared by all datasets (why: comparable runs across settings):

* Every per-class choice uses its own random stream ``default_rng([seed, pool, class_id])``, so a
  class's images do not depend on which other classes are chosen, and D for #IPC=20 is a prefix
  of D for #IPC=50 under the same seed. The hold-out set never depends on #IPC.
* Labels are remapped to ``0..num_classes-1`` in the order of the chosen classes (``classes``, or
  the first ``num_classes`` dataset classes); ``forget_classes`` index that remapped space.
* Nothing is downloaded unless ``manual_dir`` is given (then TFDS prepares from the archive found
  there); a dataset that is not prepared raises :class:`DatasetNotPreparedError` naming the fix.

Images are resized with (antialiased) bilinear interpolation straight to ``image_size`` x
``image_size``; there is no cropping, so non-square ImageNet-R images are stretched, as in
big_vision's plain ``resize`` preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

__all__ = [
    "DATASETS",
    "NORMALIZATIONS",
    "FORGET_MODES",
    "DatasetNotPreparedError",
    "Split",
    "UnlearningData",
    "Batch",
    "default_data_config",
    "resolve_data_config",
    "load_unlearning_data",
    "normalize_images",
    "iterate_batches",
    "num_batches",
]

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "imagenet_r")
FORGET_MODES = ("class", "samples")
REMAINDERS = ("pad", "drop")

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
_NUM_DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet_r": 200}

# What a None in the config resolves to, per dataset. Kept in one table so the choices are visible.
#   image_size: the resolution the paper's models take (digits: a cheap CPU-sized default).
#   holdout_per_class: None for CIFAR = the whole TFDS test split of the class.
#   pretrain_per_class: 0 = no pre-training split (backbone from a checkpoint, as in the paper).
_DATASET_DEFAULTS = {
    "digits": dict(image_size=16, normalization="cifar", holdout_per_class=30,
                   pretrain_per_class=80),
    "cifar10": dict(image_size=32, normalization="cifar", holdout_per_class=None,
                    pretrain_per_class=0),
    "cifar100": dict(image_size=32, normalization="cifar100", holdout_per_class=None,
                     pretrain_per_class=0),
    "imagenet_r": dict(image_size=224, normalization="vit", holdout_per_class=25,
                       pretrain_per_class=0),
}

# The archive TFDS looks for in manual_dir (file name from TFDS's checksum files), and its source.
_TFDS_ARCHIVES = {
    "cifar10": ("cifar-10-binary.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
    "cifar100": ("cifar-100-binary.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"),
    "imagenet_r": ("imagenet-r.tar",
                   "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"),
}

# Random-stream ids (second entry of the seed sequence) so that independent choices never share
# a stream: class c of pool p uses default_rng([seed, p, c]).
_STREAM_TRAIN_POOL, _STREAM_TEST_POOL, _STREAM_FORGET_SAMPLES = 0, 1, 2


class DatasetNotPreparedError(ValueError):
    """A TFDS dataset is not prepared in ``data_dir``; the message names the fix (one line)."""


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

    def class_counts(self, num_classes: int) -> np.ndarray:
        """(num_classes,) int64 number of images per label."""
        return np.bincount(self.y, minlength=num_classes)


@dataclasses.dataclass(frozen=True, eq=False)
class UnlearningData:
    """Everything an unlearning run needs, as numpy arrays. Built by :func:`load_unlearning_data`.

    Attributes:
      pretrain: pre-training images (disjoint from all other splits), or None.
      retain: D_r, fine-tuning images kept.
      forget: D_f, fine-tuning images to unlearn.
      test_retain: hold-out images of retain classes (forget_mode="samples": the whole hold-out).
      test_forget: hold-out images of forget classes (forget_mode="samples": empty).
      num_classes: number of classes after remapping (labels are 0..num_classes-1).
      class_names: (num_classes,) names of the remapped classes (imagenet_r: WordNet ids).
      dataset_classes: (num_classes,) class id in the dataset's own label space for each remapped
        label (imagenet_r: 0..199).
      source_labels: (num_classes,) label as stored by the source (imagenet_r: ImageNet-1k id).
      forget_classes: remapped labels forgotten (forget_mode="class"); () in "samples" mode.
      forget_mode: "class" or "samples".
      image_shape: (H, W, 3) of every image.
      config: the resolved, validated config the data was built from.
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


def _concat(a: Split, b: Split) -> Split:
    source = a.source if a.source == b.source else f"{a.source}+{b.source}"
    return Split(
        x=np.concatenate([a.x, b.x]),
        y=np.concatenate([a.y, b.y]),
        index=np.concatenate([a.index, b.index]),
        source=source,
    )


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def default_data_config() -> ml_collections.ConfigDict:
    """The data config: every field with its default. Experiment configs extend or override it.

    A None marked "dataset default" resolves per dataset (table ``_DATASET_DEFAULTS``); the resolved
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
    c.num_classes = placeholder(int)  # number of classes used (first k of the dataset's classes); None = all
    c.classes = None  # explicit list of dataset class ids (label i := classes[i]); None = first k
    c.images_per_class = 60  # #IPC of the fine-tuning set D; None = every image left in the pool
    # Hold-out images per class; dataset default: digits 30, CIFAR the whole test split,
    # ImageNet-R 25.
    c.holdout_per_class = placeholder(int)
    # Pre-training images per class, disjoint from D and the hold-out; 0 = no pretrain split.
    # Dataset default: digits 80, others 0 (the paper's backbones come from checkpoints).
    c.pretrain_per_class = placeholder(int)
    c.forget_classes = [0]  # forget_mode="class": remapped labels forming D_f (ignored: "samples")
    c.forget_mode = "class"  # "class" (the paper's setting) | "samples" (random subset of D)
    c.forget_fraction = placeholder(float)  # forget_mode="samples": fraction of D forgotten, in (0, 1)
    c.seed = 0  # every random choice (class splits, forget samples) derives from it
    return c


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_int(field: str, v: Any, *, minimum: int, allow_none: bool, none_means: str = "") -> None:
    if v is None and allow_none:
        return
    if not _is_int(v) or v < minimum:
        also = f" or None ({none_means})" if allow_none else ""
        raise ValueError(f"data config: {field} must be an int >= {minimum}{also}, got {v!r}")


def _check_choice(field: str, v: Any, choices: Sequence[str]) -> None:
    if v not in choices:
        raise ValueError(f"data config: {field} must be one of {list(choices)}, got {v!r}")


def _check_int_list(field: str, v: Any, *, upper: int, upper_what: str) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
        raise ValueError(f"data config: {field} must be a list of ints, got {v!r}")
    items = list(v)
    if not items:
        raise ValueError(f"data config: {field} must not be empty")
    for i in items:
        if not _is_int(i) or not 0 <= i < upper:
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
      A FrozenConfigDict: dataset defaults filled in, ``classes`` and ``num_classes`` always set.
      None remains only where it means "all" (``images_per_class``; ``holdout_per_class`` for
      CIFAR: the whole test split) or "unused" (``data_dir``, ``manual_dir``, ``forget_fraction``
      in class mode, ``forget_classes`` in samples mode). Resolving it again returns it unchanged.

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

    _check_choice("name", c["name"], DATASETS)
    name = c["name"]
    for key, value in _DATASET_DEFAULTS[name].items():
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
    _check_choice("normalization", c["normalization"], tuple(NORMALIZATIONS))

    total = _NUM_DATASET_CLASSES[name]
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
        c["classes"] = list(range(c["num_classes"]))

    _check_int("images_per_class", c["images_per_class"], minimum=1, allow_none=True,
               none_means="all")
    _check_int("holdout_per_class", c["holdout_per_class"], minimum=1,
               allow_none=name in ("cifar10", "cifar100"), none_means="the whole test split")
    _check_int("pretrain_per_class", c["pretrain_per_class"], minimum=0, allow_none=False)
    _check_int("seed", c["seed"], minimum=0, allow_none=False)

    _check_choice("forget_mode", c["forget_mode"], FORGET_MODES)
    if c["forget_mode"] == "class":
        if c["forget_fraction"] is not None:
            raise ValueError(
                "data config: forget_fraction is only used with forget_mode='samples'; "
                f"set it to None for forget_mode='class' (got {c['forget_fraction']!r})"
            )
        forget = _check_int_list(
            "forget_classes", c["forget_classes"], upper=c["num_classes"],
            upper_what=f"remapped labels of the {c['num_classes']} chosen classes; "
                       "a forget class must be among the chosen classes",
        )
        if len(forget) >= c["num_classes"]:
            raise ValueError(
                f"data config: forget_classes={list(forget)} covers all {c['num_classes']} "
                "classes; the retain set D_r would be empty"
            )
        c["forget_classes"] = list(forget)
    else:
        f = c["forget_fraction"]
        is_number = isinstance(f, (int, float, np.floating)) and not isinstance(f, bool)
        if not is_number or not 0.0 < float(f) < 1.0:
            raise ValueError(
                "data config: forget_fraction must be a float in (0, 1) with "
                f"forget_mode='samples', got {f!r}"
            )
        c["forget_fraction"] = float(f)
        c["forget_classes"] = None  # sample-level forgetting has no forget classes
    return ml_collections.FrozenConfigDict(c)


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def normalize_images(x01: np.ndarray, normalization: str) -> np.ndarray:
    """Normalises images scaled to [0, 1].

    Args:
      x01: (..., 3) float array in [0, 1].
      normalization: a key of :data:`NORMALIZATIONS`.

    Returns:
      float32 array of the same shape.
    """
    _check_choice("normalization", normalization, tuple(NORMALIZATIONS))
    x01 = np.asarray(x01, np.float32)
    spec = NORMALIZATIONS[normalization]
    if spec == "none":
        return x01
    if spec is None:
        return x01 * np.float32(2.0) - np.float32(1.0)
    mean, std = (np.asarray(v, np.float32) for v in spec)
    return (x01 - mean) / std


def _resize_digits(images01: np.ndarray, size: int) -> np.ndarray:
    """(n, 8, 8) grey in [0, 1] -> (n, size, size, 3) float32, bilinear (half-pixel centres)."""
    import jax  # local: keeps `import fastntk_jax.data` light

    x = images01[..., None].astype(np.float32)
    if size != x.shape[1]:
        # Why on the CPU device: the result must not depend on which accelerator is attached
        # (bit-identical data on laptop and GPU host), and 1,797 tiny images need no accelerator.
        try:
            device = jax.devices("cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
            device = jax.devices()[0]
        with jax.default_device(device):
            x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, 1), method="bilinear"))
    # (Antialiased) bilinear weights are convex, so [0, 1] is kept; clip float round-off anyway.
    return np.repeat(np.clip(x, 0.0, 1.0), 3, axis=-1)


# --------------------------------------------------------------------------------------------------
# Selection (pure numpy on labels; images are fetched afterwards, only for chosen indices)
# --------------------------------------------------------------------------------------------------


class _Pools(NamedTuple):
    """Source labels in the dataset's class space; images are fetched lazily by index."""

    train_labels: np.ndarray  # (n,) int: pool of D and pretrain (and of the hold-out if no test)
    test_labels: np.ndarray | None  # (n_test,) int, separate hold-out pool (CIFAR), else None
    train_source: str
    test_source: str | None
    class_names: tuple[str, ...]  # per dataset class id
    source_labels: tuple[int, ...]  # per dataset class id: label as stored by the source


def _class_indices(labels: np.ndarray, cls: int, seed: int, stream: int) -> np.ndarray:
    idx = np.flatnonzero(labels == cls)
    return np.random.default_rng([seed, stream, cls]).permutation(idx)


def _take(field: str, want: int | None, avail: np.ndarray, cls: int, name: str,
          what: str) -> np.ndarray:
    """The first ``want`` of ``avail`` (all if None), or a ValueError naming class and counts."""
    if want is None:
        return avail
    if want > avail.size:
        raise ValueError(
            f"data config: {field}={want} but class {cls} ({name}) has only {avail.size} images "
            f"{what}; lower {field}"
        )
    return avail[:want]


def _select(pools: _Pools, cfg: ml_collections.FrozenConfigDict) -> dict[str, list[np.ndarray]]:
    """Per chosen class, the pool indices of its hold-out, pretrain and D images.

    Returns:
      {"holdout": [...], "pretrain": [...], "train": [...]}: one index array per chosen class, in
      the order of ``cfg.classes``. "holdout" indexes ``test_labels`` when it exists.
    """
    out: dict[str, list[np.ndarray]] = {"holdout": [], "pretrain": [], "train": []}
    num_present = len(pools.class_names)
    for cls in cfg.classes:
        if cls >= num_present:
            raise ValueError(
                f"data config: class {cls} requested but the prepared {cfg.name} data has only "
                f"{num_present} classes"
            )
        name = pools.class_names[cls]
        perm = _class_indices(pools.train_labels, cls, cfg.seed, _STREAM_TRAIN_POOL)
        total = perm.size
        if pools.test_labels is None:  # one pool: carve the hold-out first
            holdout = _take("holdout_per_class", cfg.holdout_per_class, perm, cls, name,
                            f"in {pools.train_source}")
            perm = perm[holdout.size:]
            after = f"after holding out {holdout.size}"
        else:
            test_perm = _class_indices(pools.test_labels, cls, cfg.seed, _STREAM_TEST_POOL)
            holdout = _take("holdout_per_class", cfg.holdout_per_class, test_perm, cls, name,
                            f"in {pools.test_source}")
            after = "before pre-training" if not cfg.pretrain_per_class else ""
        pretrain = _take("pretrain_per_class", cfg.pretrain_per_class, perm, cls, name,
                         f"left in {pools.train_source} {after} ({total} in total)")
        rest = perm[pretrain.size:]
        if pretrain.size:
            after = f"{after} and {pretrain.size} for pre-training".strip()
        train = _take("images_per_class", cfg.images_per_class, rest, cls, name,
                      f"left in {pools.train_source} {after} ({total} in total)")
        if train.size == 0:
            raise ValueError(
                f"data config: class {cls} ({name}) has no fine-tuning images left in "
                f"{pools.train_source} ({total} in total); lower holdout_per_class or "
                "pretrain_per_class"
            )
        if holdout.size == 0:
            raise ValueError(f"data config: class {cls} ({name}) has no hold-out images")
        out["holdout"].append(holdout)
        out["pretrain"].append(pretrain)
        out["train"].append(train)
    return out


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _digits_source(cfg) -> tuple[_Pools, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images01 = digits.images.astype(np.float32) / np.float32(16.0)  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    pools = _Pools(labels, None, "digits", None, tuple(str(n) for n in digits.target_names),
                   tuple(int(n) for n in digits.target_names))

    def fetch(pool: str, indices: np.ndarray) -> np.ndarray:
        del pool  # single pool
        return _resize_digits(images01[indices], cfg.image_size)

    return pools, fetch


def _import_tf_tfds():
    import tensorflow as tf

    # Why: JAX owns the accelerator. TF would otherwise reserve most of the GPU memory for an
    # input pipeline that only needs the CPU.
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices already initialised: nothing we can change now
        pass
    import tensorflow_datasets as tfds

    return tf, tfds


def _data_dir_root(builder) -> str:
    # builder.data_dir is <root>/<name>/<version> for these (config-less) datasets.
    return os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))


def _prepare_command(name: str, data_dir_root: str) -> str:
    return (f"python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
            f"--data_dir={data_dir_root}")


def _not_prepared(builder) -> DatasetNotPreparedError:
    name, root = builder.name, _data_dir_root(builder)
    archive, url = _TFDS_ARCHIVES[name]
    return DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and nothing is downloaded "
        f"by default: run `{_prepare_command(name, root)}` on a machine with internet and copy "
        f"{root}/{name} here, or put {archive} (from {url}) in a folder and pass "
        f"manual_dir=<that folder> to prepare it offline"
    )


def _tfds_builder(cfg):
    _, tfds = _import_tf_tfds()
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    if cfg.manual_dir is not None and not builder.is_prepared():
        archive = os.path.join(cfg.manual_dir, _TFDS_ARCHIVES[cfg.name][0])
        # Why check first: without the archive TFDS would silently fall back to downloading.
        if not os.path.exists(archive):
            file_name, url = _TFDS_ARCHIVES[cfg.name]
            raise DatasetNotPreparedError(
                f"manual_dir={cfg.manual_dir!r} does not contain {file_name}: put the archive "
                f"from {url} at {archive} (or drop manual_dir and run "
                f"`{_prepare_command(cfg.name, _data_dir_root(builder))}`)"
            )
        log.info("Preparing %s in %s from %s", cfg.name, builder.data_dir, archive)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=cfg.manual_dir, try_download_gcs=False
                )
            )
        except ModuleNotFoundError as e:
            # Seen with tensorflow-datasets 4.9.10 on Python 3.11: preparing imports
            # importlib_resources, which that release declares only for Python < 3.9.
            raise DatasetNotPreparedError(
                f"TFDS could not prepare {cfg.name!r}: Python module {e.name!r} is missing "
                f"(tensorflow-datasets needs it to prepare datasets); `pip install {e.name}` "
                "and retry"
            ) from e
    return builder


def _as_dataset(builder, split: str):
    """The split, in a fixed order, with images left JPEG/PNG-encoded (decoded only when chosen)."""
    _, tfds = _import_tf_tfds()
    try:
        return builder.as_dataset(
            split=split,
            # Fixed order: the indices of the label pass must address the same examples in the
            # image pass.
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except AssertionError as e:  # how TFDS reports a missing data dir
        if "could not find data" not in str(e):
            raise
        raise _not_prepared(builder) from None


def _read_labels(builder, split: str) -> np.ndarray:
    ds = _as_dataset(builder, split).map(lambda ex: ex["label"]).batch(8192)
    chunks = [b.numpy() for b in ds]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros((0,), np.int64)


def _read_images(builder, split: str, indices: np.ndarray, expected_labels: np.ndarray,
                 cfg) -> np.ndarray:
    """Decodes and resizes only the images at ``indices`` of ``split``.

    Returns:
      (len(indices), S, S, 3) float32 in [0, 1], in the order of ``indices``.
    """
    tf, _ = _import_tf_tfds()
    size = cfg.image_size
    keep = np.zeros((expected_labels.shape[0],), bool)
    keep[indices] = True
    keep_t = tf.constant(keep)
    image_feature = builder.info.features["image"]
    needs_resize = tuple(image_feature.shape[:2]) != (size, size)

    def decode(i, ex):
        img = tf.cast(image_feature.decode_example(ex["image"]), tf.float32) / 255.0
        if needs_resize:
            img = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
        return i, tf.clip_by_value(img, 0.0, 1.0), ex["label"]

    ds = _as_dataset(builder, split).enumerate()
    ds = ds.filter(lambda i, ex: tf.gather(keep_t, i))  # before decoding: skip unused images
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
    got_idx, got_x, got_y = [], [], []
    for i, x, y in ds:
        got_idx.append(i.numpy())
        got_x.append(x.numpy())
        got_y.append(y.numpy())
    got_idx = np.concatenate(got_idx) if got_idx else np.zeros((0,), np.int64)
    order = np.argsort(got_idx)
    got_idx = got_idx[order]
    pos = np.searchsorted(got_idx, indices)
    # Why: the label pass and the image pass read the split separately; they must agree
    # example by example, or labels would silently be attached to the wrong images.
    ok = pos < got_idx.size
    ok[ok] = got_idx[pos[ok]] == indices[ok]
    got_y_sorted = np.concatenate(got_y)[order] if got_y else np.zeros((0,), np.int64)
    if not ok.all() or not np.array_equal(got_y_sorted[pos], expected_labels[indices]):
        raise RuntimeError(
            f"{cfg.name}/{split}: TFDS returned the split in a different order on a second read"
        )
    return np.concatenate(got_x)[order][pos]


def _tfds_source(cfg) -> tuple[_Pools, Any]:
    builder = _tfds_builder(cfg)
    label_names = builder.info.features["label"].names
    if cfg.name == "imagenet_r":
        raw = _read_labels(builder, "test")
        source_ids = np.unique(raw)  # sorted ImageNet-1k ids present: 200 on the real dataset
        if source_ids.size != _NUM_DATASET_CLASSES["imagenet_r"]:
            log.warning("imagenet_r: %d classes present, expected 200", source_ids.size)
        # Map ImageNet-1k ids -> 0..199 in increasing id order.
        train_labels = np.searchsorted(source_ids, raw)
        pools = _Pools(train_labels, None, "imagenet_r/test", None,
                       tuple(label_names[i] for i in source_ids), tuple(int(i) for i in source_ids))
        raw_by_pool = {"train": raw}
        split_of_pool = {"train": "test"}
    else:
        train_raw = _read_labels(builder, "train")
        test_raw = _read_labels(builder, "test")
        pools = _Pools(train_raw, test_raw, f"{cfg.name}/train", f"{cfg.name}/test",
                       tuple(label_names), tuple(range(len(label_names))))
        raw_by_pool = {"train": train_raw, "test": test_raw}
        split_of_pool = {"train": "train", "test": "test"}

    def fetch(pool: str, indices: np.ndarray) -> np.ndarray:
        return _read_images(builder, split_of_pool[pool], indices, raw_by_pool[pool], cfg)

    return pools, fetch


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_unlearning_data(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
                         **overrides: Any) -> UnlearningData:
    """Builds D_r, D_f, the hold-out set and the optional pre-training split.

    Args:
      cfg: data config (fields of :func:`default_data_config`; missing fields take the defaults).
      **overrides: field values applied on top of ``cfg``, e.g. ``name="cifar10", seed=1``.

    Returns:
      An :class:`UnlearningData`; every image is (image_size, image_size, 3) float32, normalised.

    Raises:
      ValueError: a bad config value (the message names the field), or more images asked for than
        a class has (the message names the class and the counts).
      DatasetNotPreparedError: a TFDS dataset is not prepared (the message names the fix).
    """
    cfg = resolve_data_config(cfg, **overrides)
    pools, fetch = _digits_source(cfg) if cfg.name == "digits" else _tfds_source(cfg)
    sel = _select(pools, cfg)
    remap = np.full((len(pools.class_names),), -1, np.int32)  # dataset class id -> 0..k-1
    remap[list(cfg.classes)] = np.arange(len(cfg.classes), dtype=np.int32)
    holdout_pool = "test" if pools.test_labels is not None else "train"
    holdout_source = pools.test_source if pools.test_labels is not None else pools.train_source
    labels_of = {"train": pools.train_labels, "test": pools.test_labels}

    # Fetch each pool's images once (one pass over a TFDS split), then slice.
    if holdout_pool == "test":
        wanted = {"train": np.concatenate(sel["train"] + sel["pretrain"]),
                  "test": np.concatenate(sel["holdout"])}
    else:
        wanted = {"train": np.concatenate(sel["train"] + sel["pretrain"] + sel["holdout"])}
    images = {}
    for pool, idx in wanted.items():
        unique = np.unique(idx)  # sorted: what the image pass returns
        assert unique.size == idx.size, "an image was selected twice"  # _select's invariant
        idx = unique
        x = normalize_images(fetch(pool, idx), cfg.normalization)
        images[pool] = (idx, x)

    def make(pool: str, idx: np.ndarray, source: str) -> Split:
        all_idx, x = images[pool]
        size = cfg.image_size
        if idx.size == 0:
            return Split(np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32),
                         np.zeros((0,), np.int64), source)
        y = remap[labels_of[pool][idx]]
        return Split(x[np.searchsorted(all_idx, idx)], y, idx, source)

    train_idx = np.concatenate(sel["train"])
    holdout_idx = np.concatenate(sel["holdout"])
    pretrain_idx = np.concatenate(sel["pretrain"])
    d = make("train", train_idx, pools.train_source)
    holdout = make(holdout_pool, holdout_idx, holdout_source)
    pretrain = make("train", pretrain_idx, pools.train_source) if pretrain_idx.size else None
    del images  # the splits hold their own copies

    if cfg.forget_mode == "class":
        forget_classes = tuple(cfg.forget_classes)
        in_forget = np.isin(d.y, forget_classes)
        test_in_forget = np.isin(holdout.y, forget_classes)
    else:
        forget_classes = ()
        if d.size < 2:
            raise ValueError(
                "data config: forget_mode='samples' needs at least 2 fine-tuning images"
            )
        # At least one image forgotten and one retained, whatever the fraction rounds to.
        n_forget = min(max(1, round(cfg.forget_fraction * d.size)), d.size - 1)
        rng = np.random.default_rng([cfg.seed, _STREAM_FORGET_SAMPLES])
        in_forget = np.zeros((d.size,), bool)
        in_forget[rng.choice(d.size, size=n_forget, replace=False)] = True
        # Sample-level forgetting has no forget classes: the whole hold-out is test_retain.
        test_in_forget = np.zeros((holdout.size,), bool)

    def subset(s: Split, mask: np.ndarray) -> Split:
        return Split(s.x[mask], s.y[mask], s.index[mask], s.source)

    data = UnlearningData(
        pretrain=pretrain,
        retain=subset(d, ~in_forget),
        forget=subset(d, in_forget),
        test_retain=subset(holdout, ~test_in_forget),
        test_forget=subset(holdout, test_in_forget),
        num_classes=len(cfg.classes),
        class_names=tuple(pools.class_names[c] for c in cfg.classes),
        dataset_classes=tuple(int(c) for c in cfg.classes),
        source_labels=tuple(pools.source_labels[c] for c in cfg.classes),
        forget_classes=forget_classes,
        forget_mode=cfg.forget_mode,
        image_shape=(cfg.image_size, cfg.image_size, 3),
        config=cfg,
    )
    log.info("Loaded data:\n%s", data.describe())
    return data


# --------------------------------------------------------------------------------------------------
# Minibatches
# --------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One fixed-shape minibatch.

    Attributes:
      x: (batch_size, H, W, C) float32 images; padding rows are zeros.
      y: (batch_size,) int32 labels; padding rows are 0.
      mask: (batch_size,) float32, 1 for a real example and 0 for padding. Weight per-example
        losses and accuracies by it (sum(mask * loss) / sum(mask)).
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray


def num_batches(n: int, batch_size: int, remainder: str = "pad") -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` examples."""
    _check_batch_args(batch_size, remainder)
    return math.ceil(n / batch_size) if remainder == "pad" else n // batch_size


def _check_batch_args(batch_size: int, remainder: str) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {list(REMAINDERS)}, got {remainder!r}")


def iterate_batches(data: Split | tuple[np.ndarray, np.ndarray], batch_size: int, *,
                    seed: int = 0, epoch: int = 0, shuffle: bool = True,
                    remainder: str = "pad") -> Iterator[Batch]:
    """Yields one epoch of fixed-shape minibatches, shuffled by ``(seed, epoch)``.

    Every batch has exactly ``batch_size`` rows so a jitted step never recompiles. The last,
    incomplete batch is either padded (``remainder="pad"``, the default: no example is ever
    dropped, which matters for small D_f, and ``mask`` marks the padding) or dropped
    (``remainder="drop"``: every example of an epoch still appears at most once; ``mask`` is all
    ones; an epoch with n < batch_size yields nothing).

    Args:
      data: a :class:`Split` or an ``(x, y)`` pair with leading dimension n.
      batch_size: rows per batch.
      seed: base seed of the shuffle.
      epoch: epoch number; each epoch gets its own permutation ``default_rng([seed, epoch])``.
      shuffle: False keeps the data order (evaluation).
      remainder: "pad" or "drop".

    Yields:
      :class:`Batch` with x (batch_size, ...) float32, y (batch_size,) int32, mask (batch_size,).
    """
    _check_batch_args(batch_size, remainder)
    x, y = data
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y disagree on the number of examples: {x.shape[0]} vs {y.shape[0]}"
        )
    n = x.shape[0]
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for b in range(num_batches(n, batch_size, remainder)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        pad = batch_size - idx.size
        xb = x[idx].astype(np.float32, copy=False)
        yb = y[idx].astype(np.int32, copy=False)
        mask = np.ones((batch_size,), np.float32)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad,) + x.shape[1:], np.float32)])
            yb = np.concatenate([yb, np.zeros((pad,), np.int32)])
            mask[idx.size:] = 0.0
        yield Batch(xb, yb, mask)
