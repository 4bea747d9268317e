"""Where images come from: scikit-learn's digits and the TFDS readers of CIFAR-10/100 and
ImageNet-R, plus pixel normalisation.

A source gives the labels of its pools up front (:class:`Pools`) and a ``fetch(pool, indices)``
that decodes only the images chosen, as (n, S, S, 3) float32 in [0, 1].

Nothing heavy is imported with this module: scikit-learn and JAX are imported when digits are
loaded, TensorFlow and tensorflow-datasets only by the TFDS readers. Without them the TFDS readers
raise an ImportError naming the extra to install (:data:`TFDS_INSTALL`); digits need neither.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fastntk_jax.data import schema

log = logging.getLogger(__name__)

# What to install for the TFDS datasets (the `tfds` extra of setup.cfg).
TFDS_INSTALL = "pip install -e '.[tfds]'"

# The archive TFDS looks for in manual_dir (file name from TFDS's checksum files), and its source.
_TFDS_ARCHIVES = {
  "cifar10": ("cifar-10-binary.tar.gz",
              "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
  "cifar100": ("cifar-100-binary.tar.gz",
               "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"),
  "imagenet_r": ("imagenet-r.tar",
                 "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"),
}


class DatasetNotPreparedError(ValueError):
  """A TFDS dataset is not prepared in ``data_dir``; the message names the fix (one line)."""


class Pools(NamedTuple):
  """Source labels in the dataset's class space; images are fetched lazily by index."""

  train_labels: np.ndarray  # (n,) int: pool of D and pretrain (and of the hold-out if no test)
  test_labels: np.ndarray | None  # (n_test,) int, separate hold-out pool (CIFAR), else None
  train_source: str
  test_source: str | None
  class_names: tuple[str, ...]  # per dataset class id
  source_labels: tuple[int, ...]  # per dataset class id: label as stored by the source


# fetch(pool, indices) -> (len(indices), S, S, 3) float32 in [0, 1]; pool is "train" or "test".
Fetch = Callable[[str, np.ndarray], np.ndarray]


def open_source(cfg) -> tuple[Pools, Fetch]:
  """The labels and the image reader of the dataset a resolved data config names."""
  return _digits_source(cfg) if cfg.name == "digits" else _tfds_source(cfg)


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def normalize_images(x01: np.ndarray, normalization: str) -> np.ndarray:
  """Normalises images scaled to [0, 1].

  Args:
    x01: (..., 3) float array in [0, 1].
    normalization: a key of ``NORMALIZATIONS``.

  Returns:
    float32 array of the same shape.
  """
  schema.check_choice("normalization", normalization, tuple(schema.NORMALIZATIONS))
  x01 = np.asarray(x01, np.float32)
  spec = schema.NORMALIZATIONS[normalization]
  if spec == "none":
    return x01
  if spec is None:
    return x01 * np.float32(2.0) - np.float32(1.0)
  mean, std = (np.asarray(v, np.float32) for v in spec)
  return (x01 - mean) / std


# --------------------------------------------------------------------------------------------------
# digits (scikit-learn)
# --------------------------------------------------------------------------------------------------


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


def _digits_source(cfg) -> tuple[Pools, Fetch]:
  from sklearn.datasets import load_digits  # local: keeps `import fastntk_jax.data` light

  digits = load_digits()
  images01 = digits.images.astype(np.float32) / np.float32(16.0)  # pixel values are 0..16
  labels = digits.target.astype(np.int64)
  pools = Pools(labels, None, "digits", None, tuple(str(n) for n in digits.target_names),
                tuple(int(n) for n in digits.target_names))

  def fetch(pool: str, indices: np.ndarray) -> np.ndarray:
    del pool  # single pool
    return _resize_digits(images01[indices], cfg.image_size)

  return pools, fetch


# --------------------------------------------------------------------------------------------------
# CIFAR-10/100 and ImageNet-R (TFDS)
# --------------------------------------------------------------------------------------------------


def _import_tf_tfds(dataset: str):
  """(tensorflow, tensorflow_datasets), or an ImportError that names the extra to install."""
  try:
    import tensorflow as tf

    # Why: JAX owns the accelerator. TF would otherwise reserve most of the GPU memory for an
    # input pipeline that only needs the CPU.
    try:
      tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices already initialised: nothing we can change now
      pass
    import tensorflow_datasets as tfds
  except ImportError as e:
    missing = getattr(e, "name", None) or "tensorflow / tensorflow-datasets"
    raise ImportError(
      f"dataset {dataset!r} is read with TensorFlow Datasets, which could not be imported "
      f"({missing}: {e}); install it with `{TFDS_INSTALL}` (the digits default needs neither "
      "TensorFlow nor tensorflow-datasets)"
    ) from e
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
  _, tfds = _import_tf_tfds(cfg.name)
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
  _, tfds = _import_tf_tfds(builder.name)
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
  tf, _ = _import_tf_tfds(cfg.name)
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


def _tfds_source(cfg) -> tuple[Pools, Fetch]:
  builder = _tfds_builder(cfg)
  label_names = builder.info.features["label"].names
  if cfg.name == "imagenet_r":
    raw = _read_labels(builder, "test")
    source_ids = np.unique(raw)  # sorted ImageNet-1k ids present: 200 on the real dataset
    if source_ids.size != schema.NUM_DATASET_CLASSES["imagenet_r"]:
      log.warning("imagenet_r: %d classes present, expected 200", source_ids.size)
    # Map ImageNet-1k ids -> 0..199 in increasing id order.
    train_labels = np.searchsorted(source_ids, raw)
    pools = Pools(train_labels, None, "imagenet_r/test", None,
                  tuple(label_names[i] for i in source_ids), tuple(int(i) for i in source_ids))
    raw_by_pool = {"train": raw}
    split_of_pool = {"train": "test"}
  else:
    train_raw = _read_labels(builder, "train")
    test_raw = _read_labels(builder, "test")
    pools = Pools(train_raw, test_raw, f"{cfg.name}/train", f"{cfg.name}/test",
                  tuple(label_names), tuple(range(len(label_names))))
    raw_by_pool = {"train": train_raw, "test": test_raw}
    split_of_pool = {"train": "train", "test": "test"}

  def fetch(pool: str, indices: np.ndarray) -> np.ndarray:
    return _read_images(builder, split_of_pool[pool], indices, raw_by_pool[pool], cfg)

  return pools, fetch
