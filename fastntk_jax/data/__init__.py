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
  whole pipeline runs offline and in seconds, without TensorFlow. The images are upsampled to
  ``image_size`` and the grey channel is repeated three times. One pool is carved per class, in
  this order, from one seeded permutation: hold-out (30), pre-training (80), fine-tuning D (#IPC,
  60 by default). Classes hold 174..183 images, so the defaults use at most 170 per class.
* ``"cifar10"`` / ``"cifar100"`` (TFDS): D and the optional pre-training split come from the TFDS
  ``train`` split, the hold-out from the ``test`` split. ``pretrain`` is ``None`` by default: the
  paper starts from a backbone pre-trained elsewhere (CIFAR-100 for its CIFAR-10 CNNs); set
  ``pretrain_per_class`` to carve "the rest of CIFAR train" (disjoint from D) when no checkpoint
  is available.
* ``"imagenet_r"`` (TFDS): TFDS ships only a ``test`` split whose labels are ImageNet-1k ids. The
  200 ids present are mapped to 0..199 in increasing ImageNet-1k id order (``class_names`` holds
  the WordNet ids), and each class is split, seeded, into hold-out / pre-training / D like digits.

The TFDS datasets need TensorFlow and tensorflow-datasets (``pip install -e '.[tfds]'``), imported
only when one of them is loaded; without them loading one raises an ImportError naming the extra.
Nothing is downloaded unless ``manual_dir`` is given (then TFDS prepares from the archive found
there); a dataset that is not prepared raises :class:`DatasetNotPreparedError` naming the fix.

Images are resized with (antialiased) bilinear interpolation straight to ``image_size`` x
``image_size``; there is no cropping, so non-square ImageNet-R images are stretched, as in
big_vision's plain ``resize`` preprocessing.

Modules (a reader can go top to bottom; none imports JAX or TensorFlow at import time):

* :mod:`~fastntk_jax.data.schema`: the config (defaults, allowed values, validation) and the
  result containers :class:`Split` and :class:`UnlearningData`;
* :mod:`~fastntk_jax.data.sources`: digits, the TFDS readers, pixel normalisation;
* :mod:`~fastntk_jax.data.splits`: the selection rules (per-class seeded streams, class and
  sample forgetting) and :func:`load_unlearning_data`;
* :mod:`~fastntk_jax.data.batches`: fixed-shape padded minibatches.
"""

from fastntk_jax.data.batches import (REMAINDERS, Batch, iterate_batches, num_batches,
                                      random_crop_flip)
from fastntk_jax.data.schema import (DATASETS, FORGET_MODES, NORMALIZATIONS, Split, UnlearningData,
                                     default_data_config, resolve_data_config)
from fastntk_jax.data.sources import TFDS_INSTALL, DatasetNotPreparedError, normalize_images
from fastntk_jax.data.splits import load_unlearning_data

__all__ = [
  "DATASETS",
  "NORMALIZATIONS",
  "FORGET_MODES",
  "REMAINDERS",
  "TFDS_INSTALL",
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
  "random_crop_flip",
]
