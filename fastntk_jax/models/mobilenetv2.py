"""MobileNet-v2 (Sandler et al. 2018), CIFAR variant.

Same layers as the ImageNet network (torchvision's `mobilenet_v2`: inverted residual
blocks, ReLU6, residual only when stride 1 and channels unchanged, no projection
shortcuts, 1x1 conv to `last_channel` before the pool) with two CIFAR changes that keep
32x32 inputs from shrinking to 1x1: the stem conv has stride 1 and the second stage
(24 channels) has stride 1, so the total stride is 8 (4x4 final map). Strides do not change
the parameter count: with width 1.0 and 10 classes it is 2,236,682 as torchvision's.

Every conv is followed by a BatchNorm, so the Fast-NTK trainable count is
2 * (sum of conv output channels) + head (paper Appendix A). Dropout before the head is
omitted: the NTK and the unlearning update need a deterministic network.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fastntk_jax.models.layers import BatchNorm, TrainableDense

# (expansion t, output channels c, repeats n, stride s) per stage; s of stage 2 is 1 for CIFAR.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# Kaiming normal (fan_out), as torchvision initialises MobileNetV2 convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """Rounds a channel count to a multiple of `divisor` (torchvision's `_make_divisible`).

  Never goes below 90% of `v`, so width multipliers change channel counts predictably.
  """
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm (+ ReLU6 unless `act=False`).

  Attributes:
    features: output channels.
    kernel: square kernel size (1 or 3).
    strides: stride.
    groups: feature groups (= channels for the depthwise conv).
    act: apply ReLU6 after BN.
  """

  features: int
  kernel: int = 3
  strides: int = 1
  groups: int = 1
  act: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Args: x: [n, H, W, C_in]. Returns: [n, H/strides, W/strides, features]."""
    pad = (self.kernel - 1) // 2  # explicit, PyTorch-style padding (see resnet._conv3x3)
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.strides, self.strides),
                padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                use_bias=False, kernel_init=_conv_init, name="conv")(x)
    x = BatchNorm(name="bn")(x, train)
    return nn.relu6(x) if self.act else x


class InvertedResidual(nn.Module):
  """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection.

  Attributes:
    features: output channels.
    strides: stride of the depthwise conv.
    expand_ratio: t; hidden channels = round(C_in * t).
  """

  features: int
  strides: int
  expand_ratio: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Args: x: [n, H, W, C_in]. Returns: [n, H/strides, W/strides, features]."""
    c_in = x.shape[-1]
    hidden = int(round(c_in * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = ConvBN(hidden, kernel=1, name="expand")(y, train)
    y = ConvBN(hidden, kernel=3, strides=self.strides, groups=hidden, name="depthwise")(y, train)
    y = ConvBN(self.features, kernel=1, act=False, name="project")(y, train)
    if self.strides == 1 and c_in == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNet-v2 for small (CIFAR) images.

  Attributes:
    num_classes: size of the (trainable) head.
    width_mult: channel multiplier (1.0 = the standard network).
    last_channel: channels of the final 1x1 conv; None = 1280 * max(1, width_mult) as
      torchvision (tests pass a small value to make tiny networks).
    block_settings: (t, c, n, s) per stage; default `CIFAR_SETTINGS`.
    stem_channels: channels of the stem conv before the width multiplier (32).
  """

  num_classes: int
  width_mult: float = 1.0
  last_channel: Optional[int] = None
  block_settings: Sequence[tuple[int, int, int, int]] = CIFAR_SETTINGS
  stem_channels: int = 32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Args:
      x: [n, H, W, 3] float32 images (NHWC), normally 32x32.
      train: BatchNorm mode; True needs `mutable=["batch_stats"]`.

    Returns:
      Logits [n, num_classes].
    """
    if self.width_mult <= 0:
      raise ValueError(f"width_mult must be > 0, got {self.width_mult}.")
    x = ConvBN(make_divisible(self.stem_channels * self.width_mult), kernel=3, strides=1,
               name="stem")(x, train)  # stride 1: the CIFAR change
    for stage, (t, c, n, s) in enumerate(self.block_settings):
      features = make_divisible(c * self.width_mult)
      for i in range(n):
        x = InvertedResidual(features, s if i == 0 else 1, t,
                             name=f"stage{stage + 1}_block{i + 1}")(x, train)
    last = self.last_channel
    if last is None:
      last = make_divisible(1280 * max(1.0, self.width_mult))
    x = ConvBN(last, kernel=1, name="last")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return TrainableDense(self.num_classes, name="head")(x)
