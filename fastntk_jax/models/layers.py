"""Layers whose parameters live in the trainable collection: BatchNorm and the classifier head.

Flax's own `nn.BatchNorm`/`nn.Dense` put their parameters in `params`; Fast-NTK needs BN
scale/bias and the head in a separate collection (`TRAINABLE`) so they can be split out and
differentiated alone, while conv kernels stay frozen in `params`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# The Flax collections of every model (`models.trainable` documents and splits them).
TRAINABLE = "trainable"
FROZEN_PARAMS = "params"
BATCH_STATS = "batch_stats"
# w0, beside the frozen collections, for a model linearised at w0 (`unlearn.linear`).
LINEARIZATION_POINT = "linearization_point"

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with trainable scale/bias and running statistics.

  Variables:
    trainable/scale, trainable/bias: [C] (init 1 and 0): the Fast-NTK parameters of a CNN,
      2*C per layer (paper Appendix A).
    batch_stats/mean, batch_stats/var: [C] (init 0 and 1): running statistics.

  Attributes:
    momentum: running = momentum * running + (1 - momentum) * batch (0.9 as Flax/PyTorch's 0.1).
    epsilon: added to the variance (1e-5 as PyTorch, so PyTorch CIFAR weights behave alike).
  """

  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Normalises `x`.

    Args:
      x: [..., C] activations (NHWC for convs).
      train: True uses the batch statistics (over all axes but the last) and updates the
        running ones (requires `mutable=["batch_stats"]`); False uses the running ones, so
        each sample's output depends on that sample alone.

    Returns:
      Array shaped like `x`.
    """
    c = x.shape[-1]
    scale = self.variable(TRAINABLE, "scale", lambda: jnp.ones((c,), jnp.float32))
    bias = self.variable(TRAINABLE, "bias", lambda: jnp.zeros((c,), jnp.float32))
    ra_mean = self.variable(BATCH_STATS, "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable(BATCH_STATS, "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      # Biased variance for both normalising and the running average, as flax.linen.BatchNorm.
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      # `init` runs in inference mode; this guard only matters if someone inits with train=True.
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = jax.lax.rsqrt(var + self.epsilon) * scale.value
    return (x - mean) * inv + bias.value


class TrainableDense(nn.Module):
  """Dense layer (the classifier head) with kernel and bias in the trainable collection.

  Variables:
    trainable/kernel: [D, features]; trainable/bias: [features].

  Attributes:
    features: number of outputs (classes).
    kernel_init: defaults to LeCun normal, *not* zeros (the ViT papers zero-init the head):
      with a zero head, d logits / d (prompts or BN) = 0 at initialisation, so the NTK at the
      linearisation point w0 would see only the head.
    bias_init: zeros.
  """

  features: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x: [n, D]. Returns: [n, features]."""
    d = x.shape[-1]
    # The init functions only run when the variable does not exist yet (model.init), so
    # `make_rng("params")` is never needed at apply time.
    kernel = self.variable(TRAINABLE, "kernel",
                           lambda: self.kernel_init(self.make_rng("params"), (d, self.features),
                                                    jnp.float32))
    bias = self.variable(TRAINABLE, "bias",
                         lambda: self.bias_init(self.make_rng("params"), (self.features,),
                                                jnp.float32))
    return jnp.dot(x, kernel.value) + bias.value
