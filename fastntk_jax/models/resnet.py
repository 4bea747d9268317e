"""CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, basic blocks, 16/32/64 channels.

Architecture: 3x3 conv stem (16 channels, stride 1, no max-pool), three stages of n basic
blocks (3x3 conv-BN-ReLU, 3x3 conv-BN, add, ReLU) with 16/32/64 channels and strides 1/2/2,
global average pool, linear head.

Shortcut: option A (identity; when the shape changes, subsample by 2 and zero-pad the new
channels) is the default because it is what He et al. used on CIFAR ("we use identity
shortcuts in all cases (i.e., option A)") and it reproduces their parameter counts:
ResNet-110 has 1,727,962 parameters with a 10-class head (published: 1.7M). Option B
(1x1 conv + BN projection) is available as `shortcut="B"`; it adds 2,752 parameters to
ResNet-110 (1,730,714), which also rounds to 1.7M, so the count alone cannot tell them
apart -- the paper's text decides.

Collections: conv kernels in `params` (frozen), BN scale/bias and the head in `trainable`,
BN running statistics in `batch_stats`. Convs have no bias (BN follows every conv).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fastntk_jax.models.layers import BatchNorm, TrainableDense

# He-normal (fan_in), as PyTorch's kaiming_normal_ default used by common CIFAR ResNet code.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv3x3(features: int, strides: int, name: str) -> nn.Conv:
  # Explicit (1, 1) padding as PyTorch: "SAME" pads (0, 1) for stride 2 on even sizes,
  # which would make imported PyTorch weights see shifted inputs.
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=_conv_init, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first conv (and of the shortcut subsampling).
    shortcut: "A" (parameter-free: subsample + zero-pad channels) or "B" (1x1 conv + BN).
  """

  features: int
  strides: int = 1
  shortcut: str = "A"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Args: x: [n, H, W, C_in]. Returns: [n, H/strides, W/strides, features]."""
    y = _conv3x3(self.features, self.strides, "conv1")(x)
    y = nn.relu(BatchNorm(name="bn1")(y, train))
    y = _conv3x3(self.features, 1, "conv2")(y)
    y = BatchNorm(name="bn2")(y, train)
    c_in = x.shape[-1]
    if self.strides != 1 or c_in != self.features:
      if self.shortcut == "A":
        x = x[:, ::self.strides, ::self.strides, :]
        pad = self.features - c_in
        if pad < 0:
          raise ValueError(f"Option-A shortcut cannot reduce channels ({c_in} -> {self.features}).")
        # Zero channels split evenly on both sides, as the common PyTorch option-A code
        # (F.pad(..., (0, 0, 0, 0, planes // 4, planes // 4)) for a doubling).
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
      elif self.shortcut == "B":
        x = nn.Conv(self.features, (1, 1), strides=(self.strides, self.strides),
                    use_bias=False, kernel_init=_conv_init, name="shortcut_conv")(x)
        x = BatchNorm(name="shortcut_bn")(x, train)
      else:
        raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}.")
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs.

  Attributes:
    depth: 6n+2 (8, 20, 32, 44, 56, 110, ...).
    num_classes: size of the (trainable) head.
    widths: channels of the stem/first stage and of the three stages (16, 32, 64).
    shortcut: "A" (default, as He et al. on CIFAR) or "B"; see the module docstring.
  """

  depth: int
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  shortcut: str = "A"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Args:
      x: [n, H, W, 3] float32 images (NHWC), normally 32x32.
      train: BatchNorm mode (see `BatchNorm`); True needs `mutable=["batch_stats"]`.

    Returns:
      Logits [n, num_classes].
    """
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}.")
    if len(self.widths) != 3:
      raise ValueError(f"widths must have 3 entries (one per stage), got {self.widths}.")
    n = (self.depth - 2) // 6
    x = _conv3x3(self.widths[0], 1, "conv_init")(x)
    x = nn.relu(BatchNorm(name="bn_init")(x, train))
    for stage, features in enumerate(self.widths):
      for block in range(n):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.shortcut,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return TrainableDense(self.num_classes, name="head")(x)
