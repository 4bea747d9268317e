"""Flax models whose trainable (PEFT) parameters live in their own `trainable` collection.

    model = get_model("resnet110", num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    trainable, frozen = split(variables)          # BN scale/bias + head | conv kernels + BN stats
    apply_fn = make_apply_fn(model, frozen)       # apply_fn(trainable, x) -> logits [n, C]

Collections: `trainable` (BN scale/bias, ViT prompts, head), `params` (frozen weights),
`batch_stats` (CNN running statistics). See `trainable.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from fastntk_jax import enums
from fastntk_jax.models import trainable
from fastntk_jax.models.mobilenetv2 import MobileNetV2
from fastntk_jax.models.resnet import CifarResNet
from fastntk_jax.models.trainable import *  # noqa: F401,F403  the collections' names and helpers
from fastntk_jax.models.vit import DEFAULT_PROMPT_LENGTH, VIT_SIZES, VisionTransformer

__all__ = ["MODEL_NAMES", "get_model", "architecture", "default_input_shape", "CifarResNet",
           "MobileNetV2", "VisionTransformer", "DEFAULT_PROMPT_LENGTH", *trainable.__all__]

_RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56,
                  "resnet110": 110}
_VITS = {"vit_ti16": "Ti", "vit_s16": "S", "vit_b16": "B"}

# Keyword arguments each family accepts (anything else is a ValueError, not a TypeError from
# deep inside a dataclass).
_RESNET_KWARGS = enums.MODEL_OPTIONS["resnet"]
_MOBILENET_KWARGS = enums.MODEL_OPTIONS["mobilenetv2"]
_VIT_KWARGS = enums.MODEL_OPTIONS["vit"]

# Listed in the light `enums.ModelName`, so that the configs check a name without importing Flax.
MODEL_NAMES: tuple[str, ...] = enums.values(enums.ModelName)


def _check_kwargs(name: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; "
                     f"valid options: {list(allowed)}.")


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of `MODEL_NAMES`: resnet8 (tiny, for tests), resnet20/32/44/56/110 (CIFAR,
      option-A shortcuts), mobilenetv2 (CIFAR variant), vit_ti16 / vit_s16 / vit_b16
      (prompted ViTs, `DEFAULT_PROMPT_LENGTH` prompts in every block unless overridden).
    num_classes: size of the trainable head (a fresh head per task).
    **kwargs: per family --
      resnet*: widths=(16, 32, 64), shortcut="A" | "B".
      mobilenetv2: width_mult=1.0, last_channel=None, block_settings, stem_channels=32.
      vit_*: prompt_length, prompt_blocks (None = all), and size overrides patch_size,
        hidden_size, num_layers, num_heads, mlp_dim (for tiny test models).

  Returns:
    An unbound Flax module with `__call__(x, train=False)`; x is [n, H, W, 3] float32.

  Raises:
    ValueError: unknown name (the message lists the valid names), unknown option, or
      num_classes < 1.
  """
  if name not in MODEL_NAMES:
    raise ValueError(f"Unknown model {name!r}; valid names: {list(MODEL_NAMES)}.")
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  num_classes = int(num_classes)
  if name in _RESNET_DEPTHS:
    _check_kwargs(name, kwargs, _RESNET_KWARGS)
    if "widths" in kwargs:
      kwargs["widths"] = tuple(kwargs["widths"])
    return CifarResNet(depth=_RESNET_DEPTHS[name], num_classes=num_classes, **kwargs)
  if name == "mobilenetv2":
    _check_kwargs(name, kwargs, _MOBILENET_KWARGS)
    if "block_settings" in kwargs:
      kwargs["block_settings"] = tuple(tuple(s) for s in kwargs["block_settings"])
    return MobileNetV2(num_classes=num_classes, **kwargs)
  _check_kwargs(name, kwargs, _VIT_KWARGS)
  hidden, layers, heads, mlp = VIT_SIZES[_VITS[name]]
  cfg = dict(patch_size=16, hidden_size=hidden, num_layers=layers, num_heads=heads,
             mlp_dim=mlp, prompt_length=DEFAULT_PROMPT_LENGTH, prompt_blocks=None)
  cfg.update(kwargs)
  if cfg["prompt_blocks"] is not None:
    cfg["prompt_blocks"] = tuple(cfg["prompt_blocks"])
  return VisionTransformer(num_classes=num_classes, **cfg)


def architecture(name: str, **options: Any) -> dict:
  """Every option of the named model as `get_model` builds it, defaults filled in.

  Two option dicts that build the same network (one spelling out a default, one omitting it)
  give the same dict, so it can identify an architecture (e.g. in a cache key).

  Args:
    name: one of `MODEL_NAMES`.
    **options: the model's options, as for `get_model`.

  Returns:
    {option: value} without the head size (num_classes) and Flax's own fields.

  Raises:
    ValueError: as `get_model` (unknown name or option).
  """
  module = get_model(name, 1, **options)
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("num_classes", "parent", "name")}


def default_input_shape(name: str) -> tuple[int, int, int]:
  """(H, W, 3) the named model is meant for: 32x32 for the CIFAR CNNs, 224x224 for ViTs."""
  if name not in MODEL_NAMES:
    raise ValueError(f"Unknown model {name!r}; valid names: {list(MODEL_NAMES)}.")
  return (224, 224, 3) if name in _VITS else (32, 32, 3)
