"""A `tfds.testing.mock_data(as_dataset_fn=...)` that gives every class of a classification
dataset a fixed number of random images per split (plain mock data draws labels at random,
so with few examples some of CIFAR-100's classes are missing)."""

import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def balanced(per_class: dict, size=(32, 32)):
  """as_dataset_fn: `per_class[split]` images of every class, labels in class order
  shuffled by a fixed seed; uint8 noise images of `size` (or the feature's own shape)."""

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del read_config, kwargs
    features = self.info.features
    split = str(split).split("[")[0]
    classes = features["label"].num_classes
    shape = features["image"].shape
    h, w = (shape[0], shape[1]) if shape[0] else size
    rng = np.random.default_rng(zlib.crc32(f"{self.name}/{split}".encode()))
    labels = rng.permutation(np.repeat(np.arange(classes), per_class[split]))
    examples = []
    for k, label in enumerate(labels):
      ex = {"image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "label": int(label)}
      for name in features.keys():
        if name not in ex:  # e.g. imagenet_r's file_name, cifar100's coarse_label, id
          ex[name] = f"fake/{k}" if isinstance(features[name], tfds.features.Text) else 0
      examples.append(features.encode_example(ex))
    specs = {k: tf.TensorSpec(t.shape, t.tf_dtype)
             for k, t in features.get_serialized_info().items()}
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=specs)
    return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))

  return as_dataset


# ImageNet-R's 200 classes carry ImageNet-1k ids (1, 6, 11, ... here, not 0..199), so the
# 0..199 mapping and the per-class split are checkable.
IMAGENET_R_IDS = np.arange(200) * 5 + 1


def imagenet_r(counts, image_size=(8, 8)):
  """as_dataset_fn of a fake ImageNet-R: `counts` images of each class (an int, or one per
  class), labels shuffled by a fixed seed; uint8 noise images of `image_size`, or of random
  sizes from 6 to 39 pixels when it is None."""

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del split, read_config, kwargs
    features = self.info.features
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(IMAGENET_R_IDS, counts))
    examples = []
    for k, label in enumerate(labels):
      h, w = rng.integers(6, 40, size=2) if image_size is None else image_size
      examples.append(features.encode_example({
          "image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "label": int(label),
          "file_name": f"fake/{k}.jpg"}))
    specs = {k: tf.TensorSpec(t.shape, t.tf_dtype)
             for k, t in features.get_serialized_info().items()}
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=specs)
    return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))

  return as_dataset
