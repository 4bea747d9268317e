"""Selection: which images form the pre-training split, D (= D_r ∪ D_f) and the hold-out set, and
which of D are forgotten (whole classes, a random fraction of samples, or a subpopulation of one
class: an anchor image and its nearest neighbours in the pre-trained network's feature space).

Rules shared by all datasets (why: comparable runs across settings):

* Every per-class choice uses its own random stream ``default_rng([seed, pool, class_id])``, so a
  class's images do not depend on which other classes are chosen, and D for #IPC=20 is a prefix
  of D for #IPC=50 under the same seed. The hold-out set never depends on #IPC.
* With one source pool (digits, ImageNet-R) each class is carved, in this order, into hold-out,
  pre-training and D; with a separate test pool (CIFAR) the hold-out comes from it.
* Labels are remapped to ``0..num_classes-1`` in the order of the chosen classes (``classes``, or
  the first ``num_classes`` dataset classes); ``forget_classes`` index that remapped space.

Selection is pure numpy on labels; images are fetched afterwards, only for the chosen indices.

forget_mode="subpopulation" is split in two steps, because its features exist only after
pre-training: :func:`load_unlearning_data` returns the data with the forget side pending (D_f
empty, ``UnlearningData.subpopulation`` holding the class and size k, refused now if k exceeds
the class), and once the features of D are known :func:`subpopulation_masks` (pure numpy)
picks D_f and ``UnlearningData.with_forget`` re-splits D
(``experiment.prepare.resolve_forget_set`` does both).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from fastntk_jax.data import schema
from fastntk_jax.data import sources

log = logging.getLogger(__name__)

# Random-stream ids (second entry of the seed sequence) so that independent choices never share
# a stream: class c of pool p uses default_rng([seed, p, c]).
_STREAM_TRAIN_POOL, _STREAM_TEST_POOL, _STREAM_FORGET_SAMPLES = 0, 1, 2
_STREAM_CLASS_CHOICE = 3  # (schema.STREAM_FORGET_CLASSES = 4)
_STREAM_SUBPOPULATION_ANCHOR = 5
_LISTED = 10  # short classes named in an error


def _needed(cfg, separate_test: bool) -> tuple[int, int]:
  """Images a class needs (in the train pool, in the test pool) for the asked counts."""
  holdout = cfg.holdout_per_class or 1  # None: the whole test split, at least one image
  train = (cfg.pretrain_per_class or 0) + (cfg.images_per_class or 1)
  if separate_test:
    return train, holdout
  return train + holdout, 0


def _what_needed(cfg, separate_test: bool) -> str:
  parts = []
  if not separate_test:
    parts.append(f"holdout_per_class {cfg.holdout_per_class}")
  if cfg.pretrain_per_class:
    parts.append(f"pretrain_per_class {cfg.pretrain_per_class}")
  parts.append(f"images_per_class {cfg.images_per_class or '1 (None: all)'}")
  return " + ".join(parts)


def choose_classes(pools: sources.Pools, cfg: ml_collections.FrozenConfigDict) -> list[int]:
  """class_choice="random": ``num_classes`` dataset classes drawn with ``default_rng([seed,
  3])`` uniformly among the classes that can supply the asked counts (hold-out, pre-training,
  #IPC), sorted by dataset id.

  Raises:
    ValueError: fewer classes than ``num_classes`` have enough images (names the counts).
  """
  separate = pools.test_labels is not None
  need_train, need_test = _needed(cfg, separate)
  total = len(pools.class_names)
  train_counts = np.bincount(pools.train_labels, minlength=total)[:total]
  ok = train_counts >= need_train
  if separate:
    ok &= np.bincount(pools.test_labels, minlength=total)[:total] >= need_test
  eligible = np.flatnonzero(ok)
  k = cfg.num_classes
  if eligible.size < k:
    raise ValueError(
      f"data config: class_choice='random' needs num_classes={k} classes with at least "
      f"{need_train} images each in {pools.train_source} ({_what_needed(cfg, separate)})"
      + (f" and {need_test} in {pools.test_source}" if separate else "")
      + f", but only {eligible.size} of the {total} classes have that many "
      f"(fewest: {int(train_counts.min())}); lower images_per_class or holdout_per_class, "
      "or num_classes"
    )
  rng = np.random.default_rng([cfg.seed, _STREAM_CLASS_CHOICE])
  chosen = sorted(int(c) for c in rng.choice(eligible, size=k, replace=False))
  log.info("class_choice='random' (seed %d): %d of %d eligible classes: %s", cfg.seed, k,
           eligible.size, chosen)
  return chosen


def _class_indices(labels: np.ndarray, cls: int, seed: int, stream: int) -> np.ndarray:
  idx = np.flatnonzero(labels == cls)
  return np.random.default_rng([seed, stream, cls]).permutation(idx)


def _take(field: str, want: int | None, avail: np.ndarray, cls: int, name: str,
          what: str) -> np.ndarray:
  """The first ``want`` of ``avail`` (all if None), or a ValueError naming class and counts."""
  if want is None:
    return avail
  if want > avail.size:
    raise _ShortClass(
      f"data config: {field}={want} but class {cls} ({name}) has only {avail.size} images "
      f"{what}; lower {field}"
    )
  return avail[:want]


def select(pools: sources.Pools,
           cfg: ml_collections.FrozenConfigDict) -> dict[str, list[np.ndarray]]:
  """Per chosen class, the pool indices of its hold-out, pretrain and D images.

  Returns:
    {"holdout": [...], "pretrain": [...], "train": [...]}: one index array per chosen class, in
    the order of ``cfg.classes``; disjoint within each pool. "holdout" indexes ``test_labels``
    when it exists.

  Raises:
    ValueError: a class has fewer images than asked for (the message names the class, the field
      and the counts).
  """
  out: dict[str, list[np.ndarray]] = {"holdout": [], "pretrain": [], "train": []}
  num_present = len(pools.class_names)
  short = []  # (class, its first error): every short class is named in one error
  for cls in cfg.classes:
    try:
      parts = _select_class(pools, cfg, cls, num_present)
    except _ShortClass as e:
      short.append((cls, str(e)))
      continue
    for key, idx in parts.items():
      out[key].append(idx)
  if short:
    separate = pools.test_labels is not None
    need_train, need_test = _needed(cfg, separate)
    counts = np.bincount(pools.train_labels, minlength=num_present)
    message = short[0][1]
    if len(short) > 1:
      named = ", ".join(f"{c} ({pools.class_names[c]}): {int(counts[c])}"
                        for c, _ in short[:_LISTED])
      more = f" and {len(short) - _LISTED} more" if len(short) > _LISTED else ""
      message += (f". {len(short)} of the {len(cfg.classes)} chosen classes are short of the "
                  f"{need_train} images each needs in {pools.train_source} "
                  f"({_what_needed(cfg, separate)}"
                  + (f"; {need_test} in {pools.test_source}" if separate else "")
                  + f"): {named}{more}")
    raise ValueError(message)
  return out


class _ShortClass(ValueError):
  """A class cannot supply the asked counts (collected by `select`)."""


def _select_class(pools: sources.Pools, cfg, cls: int, num_present: int) -> dict:
  """The hold-out, pretrain and D indices of one class (see `select`)."""
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
    raise _ShortClass(
      f"data config: class {cls} ({name}) has no fine-tuning images left in "
      f"{pools.train_source} ({total} in total); lower holdout_per_class or "
      "pretrain_per_class"
    )
  if holdout.size == 0:
    raise _ShortClass(f"data config: class {cls} ({name}) has no hold-out images")
  return {"holdout": holdout, "pretrain": pretrain, "train": train}


def forget_masks(d: schema.Split, holdout: schema.Split,
                 cfg: ml_collections.FrozenConfigDict) -> tuple[tuple[int, ...], np.ndarray,
                                                                np.ndarray]:
  """Which images of D and of the hold-out set belong to the forget side.

  forget_mode="class": every image of a forget class. forget_mode="samples": a seeded random
  ``forget_fraction`` of D (at least one image forgotten and one kept); the hold-out set has no
  forget side. forget_mode="subpopulation": nothing yet (D_f is chosen from the pre-trained
  features, :func:`subpopulation_masks`); its hold-out has no forget side either, since the
  subpopulation is a subset of a class that stays: that class's hold-out images are
  test_retain.

  Returns:
    (forget_classes, in_forget (d.size,) bool, test_in_forget (holdout.size,) bool).
  """
  if cfg.forget_mode == "class":
    forget_classes = tuple(cfg.forget_classes)
    return forget_classes, np.isin(d.y, forget_classes), np.isin(holdout.y, forget_classes)
  if cfg.forget_mode == "subpopulation":
    return (), np.zeros((d.size,), bool), np.zeros((holdout.size,), bool)
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
  return (), in_forget, np.zeros((holdout.size,), bool)


def subpopulation_anchor(labels: np.ndarray, cfg: ml_collections.FrozenConfigDict) -> int:
  """The row of D (in the order of ``labels``) of a subpopulation's anchor: drawn uniformly,
  with ``default_rng([seed, 5])``, among the rows of class ``cfg.forget_classes[0]``.

  Raises:
    ValueError: the class has no image in ``labels``.
  """
  labels = np.asarray(labels)
  label = int(cfg.forget_classes[0])
  members = np.flatnonzero(labels == label)
  if members.size == 0:
    raise ValueError(f"data config: forget_classes=[{label}] has no image in D")
  rng = np.random.default_rng([cfg.seed, _STREAM_SUBPOPULATION_ANCHOR])
  return int(members[rng.integers(members.size)])


def subpopulation_masks(features: np.ndarray, labels: np.ndarray,
                        cfg: ml_collections.FrozenConfigDict) -> np.ndarray:
  """forget_mode="subpopulation": which images of D form D_f, given their features.

  Within class ``cfg.forget_classes[0]`` (remapped label), the seeded anchor
  (:func:`subpopulation_anchor`) and its k - 1 nearest neighbours, by Euclidean distance
  between L2-normalised feature vectors (a zero vector stays zero); k =
  ``schema.subpopulation_size`` (``round(forget_fraction * |D|)``, at least 1). The anchor
  is always in; equal distances go to the earlier row. Pure numpy (float64), deterministic.

  Args:
    features: (n, ...) features of D's images (flattened per image), e.g. the penultimate
      features of the pre-trained network.
    labels: (n,) remapped labels of D, in the same order.
    cfg: a resolved data config in forget_mode="subpopulation".

  Returns:
    in_forget: (n,) bool over the rows of D.

  Raises:
    ValueError: a size mismatch or non-finite features, or k larger than the class (naming
      forget_fraction and forget_classes).
  """
  labels = np.asarray(labels)
  features = np.asarray(features, np.float64)
  n = labels.shape[0]
  if labels.ndim != 1 or features.shape[:1] != (n,):
    raise ValueError(f"subpopulation_masks: {features.shape[:1]} feature rows for labels of "
                     f"shape {labels.shape}")
  features = features.reshape(n, -1)
  if not np.isfinite(features).all():
    raise ValueError("subpopulation_masks: the features of D are not all finite (a diverged "
                     "pre-training?); the nearest neighbours are undefined")
  label = int(cfg.forget_classes[0])
  members = np.flatnonzero(labels == label)
  k = schema.subpopulation_size(cfg.forget_fraction, n, members.size, label)
  anchor = subpopulation_anchor(labels, cfg)
  f = features[members]
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-300)
  is_anchor = members == anchor
  dist = np.linalg.norm(f - f[is_anchor], axis=1)
  dist[is_anchor] = -1.0  # the anchor first, even beside an exact duplicate
  nearest = members[np.argsort(dist, kind="stable")[:k]]
  in_forget = np.zeros((n,), bool)
  in_forget[nearest] = True
  return in_forget


def load_unlearning_data(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
                         **overrides: Any) -> schema.UnlearningData:
  """Builds D_r, D_f, the hold-out set and the optional pre-training split.

  Args:
    cfg: data config (fields of ``default_data_config``; missing fields take the defaults).
    **overrides: field values applied on top of ``cfg``, e.g. ``name="cifar10", seed=1``.

  Returns:
    An ``UnlearningData``; every image is (image_size, image_size, 3) float32, normalised.
    forget_mode="subpopulation": its forget side is pending (D_f empty, D_r = D,
    ``subpopulation`` holds the class and size, a size larger than the class refused now);
    ``experiment.prepare.resolve_forget_set`` chooses D_f once the pre-trained features exist.

  Raises:
    ValueError: a bad config value (the message names the field), or more images asked for than
      a class has (the message names the class and the counts).
    DatasetNotPreparedError: a TFDS dataset is not prepared (the message names the fix).
    ImportError: a TFDS dataset without TensorFlow Datasets installed (the message names the
      extra to install).
  """
  cfg = schema.resolve_data_config(cfg, **overrides)
  pools, fetch = sources.open_source(cfg)
  if cfg.classes is None:  # class_choice="random": drawn now that the counts are known
    cfg = ml_collections.FrozenConfigDict({**cfg.to_dict(),
                                           "classes": choose_classes(pools, cfg)})
  sel = select(pools, cfg)
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
    assert unique.size == idx.size, "an image was selected twice"  # select's invariant
    idx = unique
    x = sources.normalize_images(fetch(pool, idx), cfg.normalization)
    images[pool] = (idx, x)

  def make(pool: str, idx: np.ndarray, source: str) -> schema.Split:
    all_idx, x = images[pool]
    size = cfg.image_size
    if idx.size == 0:
      return schema.Split(np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32),
                          np.zeros((0,), np.int64), source)
    y = remap[labels_of[pool][idx]]
    return schema.Split(x[np.searchsorted(all_idx, idx)], y, idx, source)

  train_idx = np.concatenate(sel["train"])
  holdout_idx = np.concatenate(sel["holdout"])
  pretrain_idx = np.concatenate(sel["pretrain"])
  d = make("train", train_idx, pools.train_source)
  holdout = make(holdout_pool, holdout_idx, holdout_source)
  pretrain = make("train", pretrain_idx, pools.train_source) if pretrain_idx.size else None
  del images  # the splits hold their own copies

  forget_classes, in_forget, test_in_forget = forget_masks(d, holdout, cfg)
  subpopulation = None
  if cfg.forget_mode == "subpopulation":  # D_f pending; its size is checked now
    label = int(cfg.forget_classes[0])
    size = schema.subpopulation_size(cfg.forget_fraction, d.size, int((d.y == label).sum()),
                                     label, d_what=f"the {cfg.num_classes} classes' images")
    subpopulation = schema.Subpopulation(label=label, size=size)

  def subset(s: schema.Split, mask: np.ndarray) -> schema.Split:
    return schema.Split(s.x[mask], s.y[mask], s.index[mask], s.source)

  data = schema.UnlearningData(
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
    subpopulation=subpopulation,
  )
  log.info("Loaded data:\n%s", data.describe())
  return data
