"""Vision Transformer with key/value prompts (prefix tuning), named like the public checkpoints.

Architecture and parameter names follow google-research/vision_transformer (and the AugReg
`.npz` files), so those checkpoints load by name (`checkpoints.load_vit_npz`):

  embedding/{kernel,bias}                     patch embedding conv, kernel (P, P, 3, D)
  cls                                         (1, 1, D) class token
  Transformer/posembed_input/pos_embedding    (1, N + 1, D)
  Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_2
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel
                                              (D, heads, D / heads), bias (heads, D / heads)
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel (heads, D / heads, D)
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_0, Dense_1
  Transformer/encoder_norm
  head/{kernel,bias}                          (D, C), (C,)

All of the above except `head` are in the frozen `params` collection. The trainable
collection holds the head and, in each prompted block,
`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/prompt_k`, `prompt_v`:
L learned tokens of width D that are prepended to that block's keys and values after the
key/value projections (paper Appendix A; prefix tuning as in DualPrompt's implementation).
Queries are not prompted, so the sequence length and the cls output position are unchanged,
and each prompted block adds exactly 2 * L * D trainable parameters.

Sizes (ViT paper, Dosovitskiy et al. 2021, Table 1; DeiT/AugReg for Ti and S):
  Ti/16: D=192, 12 layers, 3 heads, MLP 768;  S/16: D=384, 12, 6, 1536;
  B/16: D=768, 12, 12, 3072.
There is no dropout (the NTK needs a deterministic network) and `train` has no effect.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastntk_jax.models.layers import TrainableDense
from fastntk_jax.models.layers import TRAINABLE

# name -> (hidden size D, layers, heads, MLP dim); patch 16 for all.
VIT_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
}

# Default prompt length L. The paper's value did not survive text extraction; L = 4 is the
# largest L for which the paper's stated bounds hold for both ViT-S/16 and ViT-B/16
# (trainable < 0.4% on ImageNet-R with 20 or 50 classes, < 0.2% on CIFAR-10); L = 5 gives
# 0.23% for ViT-S/16 on CIFAR-10. See `fastntk_jax.models.report`.
DEFAULT_PROMPT_LENGTH = 4

_LN_EPS = 1e-6  # vision_transformer's LayerNorm epsilon (Flax default)


class PromptedAttention(nn.Module):
  """Multi-head self-attention with optional trainable key/value prompts.

  Same parameters and computation as `flax.linen.MultiHeadDotProductAttention` (query/key/
  value/out DenseGeneral, softmax(q k^T / sqrt(d_head)) v) when `prompt_length == 0`.

  Attributes:
    num_heads: number of heads; must divide D.
    prompt_length: L; 0 means no prompts in this block (no variables are created).
    prompt_init_scale: prompts are U(-s, s); None uses VPT's choice
      s = sqrt(6 / (3 * P^2 + D)) via `patch_size`.
    patch_size: used by the default prompt init only.
  """

  num_heads: int
  prompt_length: int = 0
  prompt_init_scale: Optional[float] = None
  patch_size: int = 16

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x: [n, T, D]. Returns: [n, T, D]."""
    n, _, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"hidden size {d} is not divisible by num_heads {self.num_heads}.")
    h, hd = self.num_heads, d // self.num_heads
    init = nn.initializers.xavier_uniform()  # vision_transformer's attention init
    dense = lambda name: nn.DenseGeneral((h, hd), axis=-1, kernel_init=init, name=name)
    q = dense("query")(x)  # [n, T, h, hd]
    k = dense("key")(x)
    v = dense("value")(x)
    if self.prompt_length > 0:
      s = self.prompt_init_scale
      if s is None:
        s = math.sqrt(6.0 / (3 * self.patch_size**2 + d))
      pinit = lambda: jax.random.uniform(self.make_rng("params"), (self.prompt_length, d),
                                         jnp.float32, -s, s)
      # Stored as [L, D] tokens (2 * L * D parameters per block, Appendix A); split into heads
      # like the projected keys/values they are prepended to.
      p_k = self.variable(TRAINABLE, "prompt_k", pinit).value
      p_v = self.variable(TRAINABLE, "prompt_v", pinit).value
      shape = (n, self.prompt_length, h, hd)
      p_k = jnp.broadcast_to(p_k.reshape(1, *shape[1:]), shape)
      p_v = jnp.broadcast_to(p_v.reshape(1, *shape[1:]), shape)
      k = jnp.concatenate([p_k.astype(k.dtype), k], axis=1)  # [n, L + T, h, hd]
      v = jnp.concatenate([p_v.astype(v.dtype), v], axis=1)
    q = q / jnp.sqrt(hd).astype(q.dtype)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
    return nn.DenseGeneral(d, axis=(-2, -1), kernel_init=init, name="out")(out)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense (vision_transformer's MlpBlock).

  Attributes:
    mlp_dim: hidden width.
  """

  mlp_dim: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x: [n, T, D]. Returns: [n, T, D]."""
    d = x.shape[-1]
    kinit = nn.initializers.xavier_uniform()
    binit = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, kernel_init=kinit, bias_init=binit, name="Dense_0")(x)
    x = nn.gelu(x)  # tanh approximation, as the checkpoints were trained with (Flax default)
    return nn.Dense(d, kernel_init=kinit, bias_init=binit, name="Dense_1")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x)).

  Attributes:
    num_heads, mlp_dim: sizes.
    prompt_length: L for this block (0 = unprompted).
    patch_size: for the default prompt init.
  """

  num_heads: int
  mlp_dim: int
  prompt_length: int = 0
  patch_size: int = 16

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x: [n, T, D]. Returns: [n, T, D]."""
    y = nn.LayerNorm(epsilon=_LN_EPS, name="LayerNorm_0")(x)
    y = PromptedAttention(self.num_heads, self.prompt_length, patch_size=self.patch_size,
                          name="MultiHeadDotProductAttention_1")(y)
    x = x + y
    y = nn.LayerNorm(epsilon=_LN_EPS, name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, name="MlpBlock_3")(y)
    return x + y


class AddPositionEmbs(nn.Module):
  """Adds the learned position embedding `pos_embedding` [1, T, D]."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x: [n, T, D]. Returns: [n, T, D]."""
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe


class Encoder(nn.Module):
  """Position embedding, `num_layers` blocks, final LayerNorm (vision_transformer's Encoder)."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  prompt_length: int = 0
  prompt_blocks: Optional[Sequence[int]] = None
  patch_size: int = 16

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x: [n, T, D]. Returns: [n, T, D]."""
    x = AddPositionEmbs(name="posembed_input")(x)
    prompted = prompted_blocks(self.num_layers, self.prompt_blocks)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim,
                       self.prompt_length if i in prompted else 0,
                       patch_size=self.patch_size, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=_LN_EPS, name="encoder_norm")(x)


def prompted_blocks(num_layers: int, prompt_blocks: Optional[Sequence[int]]) -> tuple[int, ...]:
  """Indices of the blocks that get prompts.

  Args:
    num_layers: number of encoder blocks.
    prompt_blocks: None = all blocks; otherwise block indices in [0, num_layers).

  Returns:
    Sorted tuple of distinct indices.

  Raises:
    ValueError: an index is out of range (a typo would otherwise silently prompt nothing).
  """
  if prompt_blocks is None:
    return tuple(range(num_layers))
  blocks = tuple(sorted(set(int(b) for b in prompt_blocks)))
  bad = [b for b in blocks if not 0 <= b < num_layers]
  if bad:
    raise ValueError(f"prompt_blocks {bad} out of range for a ViT with {num_layers} blocks "
                     f"(valid: 0..{num_layers - 1}).")
  return blocks


class VisionTransformer(nn.Module):
  """ViT classifier on the cls token, with optional key/value prompts.

  Attributes:
    num_classes: size of the (trainable, freshly initialised) head.
    patch_size: P.
    hidden_size: D.
    num_layers: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    prompt_length: L (0 = plain ViT; then the head alone is trainable).
    prompt_blocks: blocks that get prompts; None = all.
  """

  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  prompt_length: int = DEFAULT_PROMPT_LENGTH
  prompt_blocks: Optional[Sequence[int]] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Args:
      x: [n, H, W, 3] float32 images (NHWC), H and W multiples of `patch_size` (224 for the
        public checkpoints; other sizes need `load_vit_npz`'s position-embedding resampling).
      train: accepted for a uniform model interface; no effect (no dropout, no BatchNorm).

    Returns:
      Logits [n, num_classes].
    """
    del train
    if self.prompt_length < 0:
      raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}.")
    n, hgt, wid, _ = x.shape
    p = self.patch_size
    if hgt % p or wid % p:
      raise ValueError(f"image size {hgt}x{wid} is not a multiple of the patch size {p}.")
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    x = x.reshape(n, -1, self.hidden_size)  # [n, N, D], row-major patches as vision_transformer
    cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, self.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.hidden_size)), x], axis=1)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.prompt_length,
                self.prompt_blocks, patch_size=p, name="Transformer")(x)
    return TrainableDense(self.num_classes, name="head")(x[:, 0])
