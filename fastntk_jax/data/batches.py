"""Fixed-shape minibatches: one epoch, shuffled by (seed, epoch), the last batch padded and masked
(or dropped), so a jitted step never recompiles."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from fastntk_jax.data import schema

REMAINDERS = ("pad", "drop", "partial")


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
  return n // batch_size if remainder == "drop" else math.ceil(n / batch_size)


def _check_batch_args(batch_size: int, remainder: str) -> None:
  if not schema.is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if remainder not in REMAINDERS:
    raise ValueError(f"remainder must be one of {list(REMAINDERS)}, got {remainder!r}")


def iterate_batches(data: schema.Split | tuple[np.ndarray, np.ndarray], batch_size: int, *,
                    seed: int = 0, epoch: int = 0, shuffle: bool = True,
                    remainder: str = "pad") -> Iterator[Batch]:
  """Yields one epoch of fixed-shape minibatches, shuffled by ``(seed, epoch)``.

  Every batch has exactly ``batch_size`` rows so a jitted step never recompiles. The last,
  incomplete batch is either padded (``remainder="pad"``, the default: no example is ever
  dropped, which matters for small D_f, and ``mask`` marks the padding) or dropped
  (``remainder="drop"``: every example of an epoch still appears at most once; ``mask`` is all
  ones; an epoch with n < batch_size yields nothing), or kept as a smaller batch of its real
  rows only (``remainder="partial"``: a second shape, so one more compile; what train-mode
  BatchNorm needs, whose batch statistics would otherwise include the padded rows).

  Args:
    data: a ``Split`` or an ``(x, y)`` pair with leading dimension n.
    batch_size: rows per batch.
    seed: base seed of the shuffle.
    epoch: epoch number; each epoch gets its own permutation ``default_rng([seed, epoch])``.
    shuffle: False keeps the data order (evaluation).
    remainder: "pad", "drop" or "partial".

  Yields:
    :class:`Batch` with x (batch_size, ...) float32, y (batch_size,) int32, mask (batch_size,)
    (the last one shorter with ``remainder="partial"``).
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
    pad = 0 if remainder == "partial" else batch_size - idx.size
    xb = x[idx].astype(np.float32, copy=False)
    yb = y[idx].astype(np.int32, copy=False)
    mask = np.ones((idx.size + pad,), np.float32)
    if pad:
      xb = np.concatenate([xb, np.zeros((pad,) + x.shape[1:], np.float32)])
      yb = np.concatenate([yb, np.zeros((pad,), np.int32)])
      mask[idx.size:] = 0.0
    yield Batch(xb, yb, mask)


def random_crop_flip(x: np.ndarray, rng: np.random.Generator, *, pad: int = 4) -> np.ndarray:
  """The CIFAR training augmentation: a random ``H x W`` crop of each image zero-padded by
  ``pad`` pixels on every side, then a horizontal flip with probability 1/2.

  The padding is zeros of the array as given, i.e. of the *normalised* image (the dataset's
  mean colour for per-channel mean/std normalisation), as in TF/JAX CIFAR pipelines that
  augment after normalising; torchvision's ``RandomCrop(32, padding=4)`` before ``Normalize``
  pads black instead. Every image draws its own offset and flip from ``rng``.

  Args:
    x: (n, H, W, C) images.
    rng: a NumPy Generator (e.g. ``default_rng([seed, epoch, batch])`` for reproducibility).
    pad: padding in pixels (4 for 32x32 CIFAR).

  Returns:
    (n, H, W, C) array of the same dtype.
  """
  x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"random_crop_flip expects (n, H, W, C) images, got shape {x.shape}")
  if not schema.is_int(pad) or pad < 0:
    raise ValueError(f"pad must be an int >= 0, got {pad!r}")
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=n)
  dx = rng.integers(0, 2 * pad + 1, size=n)
  flip = rng.random(n) < 0.5
  rows = dy[:, None] + np.arange(h)[None, :]  # (n, H)
  cols = dx[:, None] + np.arange(w)[None, :]  # (n, W)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
