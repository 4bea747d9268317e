"""Train-mode BatchNorm takes its batch statistics over real rows only (no padded rows)."""

import flax.linen as nn
import jax
import numpy as np

from fastntk_jax import train as train_lib
from fastntk_jax.models import trainable as tr
from fastntk_jax.models.layers import BatchNorm, TrainableDense


class BNHead(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return TrainableDense(3, name="head")(BatchNorm(name="bn")(x, train))


def test_running_statistics_ignore_padding_of_the_last_batch():
  rng = np.random.default_rng(0)
  n, bs, seed = 10, 8, 3  # batches of 8 and 2 real rows
  x = rng.normal(loc=2.0, size=(n, 4)).astype(np.float32)
  y = rng.integers(0, 3, n)
  model = BNHead()
  w0, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.0, batch_size=bs, bn_mode="train")
  _, stats, _ = train_lib.fit(model, w0, frozen, (x, y), spec, 3, seed=seed)
  # The reference: the same batch order, each batch's mean over its real rows only.
  order = np.random.default_rng([seed, 0]).permutation(n)
  mean = np.zeros(4)
  var = np.ones(4)
  for rows in (order[:bs], order[bs:]):
    mean = 0.9 * mean + 0.1 * x[rows].mean(axis=0)
    var = 0.9 * var + 0.1 * x[rows].var(axis=0)
  np.testing.assert_allclose(np.asarray(stats["bn"]["mean"]), mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["bn"]["var"]), var, rtol=1e-5)


def test_frozen_bn_still_pads_and_masks():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 4)).astype(np.float32)
  y = rng.integers(0, 3, 10)
  model = BNHead()
  w0, frozen = tr.split(model.init(jax.random.PRNGKey(0), x[:1]))
  spec = train_lib.TrainSpec(epochs=1, learning_rate=0.1, batch_size=8, bn_mode="frozen")
  w, stats, hist = train_lib.fit(model, w0, frozen, (x, y), spec, 3, seed=0)
  assert np.all(np.asarray(stats["bn"]["mean"]) == 0) and np.isfinite(hist[0])
