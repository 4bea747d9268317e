"""The trainable (PEFT) collection: names, split/merge, and the pure `apply_fn` factories.

Every model in `fastntk_jax.models` keeps its variables in three Flax collections:

  * `"trainable"` (`TRAINABLE`): what Fast-NTK fine-tunes and unlearns -- BatchNorm
    scale/bias of the CNNs, key/value prompts of the ViTs, and the classifier head of both.
    Modules put a variable here *explicitly* with `self.variable(TRAINABLE, ...)`, so
    grepping for `TRAINABLE` in `fastntk_jax/models/` lists every trainable parameter.
  * `"params"` (`FROZEN_PARAMS`): the frozen pre-trained weights (conv kernels, attention
    and MLP weights, embeddings, LayerNorms). Nothing here is ever differentiated.
  * `"batch_stats"` (`BATCH_STATS`): BatchNorm running mean/var (CNNs only). Not
    parameters: they are updated by training-mode forward passes, never by gradients.

The NTK and the unlearning update differentiate only the trainable collection, so its size
`p` sets their cost (design notes section 3). `split` separates it out *before* any `jax.grad`
or kernel, and `make_apply_fn` closes over everything else, giving the pure
`apply_fn(trainable, x) -> logits` that `fastntk_jax.ntk` and `fastntk_jax.unlearn` take.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from fastntk_jax.models.layers import (BATCH_STATS, FROZEN_PARAMS, LINEARIZATION_POINT,
                                       TRAINABLE)

PyTree = Any

__all__ = [
    "TRAINABLE",
    "FROZEN_PARAMS",
    "BATCH_STATS",
    "split",
    "merge",
    "make_apply_fn",
    "make_train_apply_fn",
    "count_params",
    "param_names",
    "init_variables",
    "fresh_head",
    "head_inputs",
]


def _as_dict(tree: Mapping[str, Any]) -> dict:
  """Plain (mutable) dict view of a Flax variables dict, FrozenDict or not."""
  if isinstance(tree, flax.core.FrozenDict):
    return flax.core.unfreeze(tree)
  return dict(tree)


def count_params(tree: PyTree) -> int:
  """Number of scalars in a pytree.

  Works on concrete arrays and on `jax.ShapeDtypeStruct` leaves (from `jax.eval_shape`),
  so real-size models can be counted without allocating them.

  Args:
    tree: any pytree of arrays or shape structs.

  Returns:
    Sum over leaves of the product of the leaf shape.
  """
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def param_names(tree: PyTree) -> list[str]:
  """Slash-joined names of all leaves, e.g. `head/kernel`, sorted. For logs and errors."""
  flat = flax.traverse_util.flatten_dict(_as_dict(tree), sep="/")
  return sorted(flat)


def split(variables: Mapping[str, Any]) -> tuple[PyTree, dict]:
  """Splits a model's variables into the trainable collection and everything else.

  Args:
    variables: the dict returned by `model.init` (or a restored/fine-tuned copy), with
      collections `trainable`, `params` and, for CNNs, `batch_stats`.

  Returns:
    (trainable, frozen): `trainable` is `variables["trainable"]`; `frozen` is a dict of all
    the other collections (`params`, `batch_stats`, ...), to be closed over by
    `make_apply_fn`.

  Raises:
    ValueError: if there is no `trainable` collection, or it holds no scalars. Either means
      the model (or the variables passed) is not a Fast-NTK model, and differentiating
      "nothing" would silently give a zero kernel.
  """
  if not isinstance(variables, Mapping):
    raise ValueError(
        f"split() expects the variables dict of a model (collections -> trees), got "
        f"{type(variables).__name__}.")
  variables = _as_dict(variables)
  if TRAINABLE not in variables:
    raise ValueError(
        f"The variables have no {TRAINABLE!r} collection (collections present: "
        f"{sorted(variables)}). Fast-NTK differentiates only that collection; build the model "
        f"with fastntk_jax.models.get_model(), whose modules put BatchNorm scale/bias, "
        f"prompts and the head there.")
  trainable = variables.pop(TRAINABLE)
  if count_params(trainable) == 0:
    raise ValueError(
        f"The {TRAINABLE!r} collection is empty (leaves: {param_names(trainable)}): there is "
        f"nothing to fine-tune or unlearn. Check the model configuration (e.g. a ViT needs a "
        f"head or prompt_length > 0).")
  return trainable, variables


def merge(trainable: PyTree, frozen: Mapping[str, Any]) -> dict:
  """Inverse of `split`: rebuilds the full variables dict.

  Args:
    trainable: the trainable collection (e.g. after fine-tuning or unlearning).
    frozen: the other collections, as returned by `split`.

  Returns:
    `{**frozen, "trainable": trainable}`, a plain dict usable with `model.apply`.

  Raises:
    ValueError: if `frozen` already holds a trainable collection (the caller passed the
      full variables dict instead of `split`'s second output; merging would silently pick one).
  """
  frozen = _as_dict(frozen)
  if TRAINABLE in frozen:
    raise ValueError(
        f"merge(): `frozen` already contains a {TRAINABLE!r} collection; pass the second "
        f"output of split(), not the full variables dict.")
  return {**frozen, TRAINABLE: trainable}


def make_apply_fn(model: nn.Module, frozen: Mapping[str, Any]
                  ) -> Callable[[PyTree, jnp.ndarray], jnp.ndarray]:
  """The pure `apply_fn(trainable, x) -> logits` that the NTK and `ntk_forget` take.

  BatchNorm runs in inference mode (running statistics), so each sample's logits depend on
  that sample alone -- the per-sample independence the NTK's `vmap_axes=0` relies on
  (design notes section 3). `frozen` (pre-trained weights and running statistics) is closed
  over: it is a constant of the returned function and is never differentiated.

  Args:
    model: a model from `get_model`.
    frozen: the second output of `split` (all collections except `trainable`).

  Returns:
    `apply_fn(trainable, x)`: `trainable` is a tree shaped like the model's trainable
    collection, `x` is `[n, H, W, 3]` float32 images (NHWC); returns logits `[n, C]`.
    Pure and jit-able.
  """
  frozen = _as_dict(frozen)
  if TRAINABLE in frozen:
    raise ValueError(
        f"make_apply_fn(): `frozen` contains the {TRAINABLE!r} collection; pass split()'s "
        f"second output so the trainable parameters are not closed over as constants.")

  def apply_fn(trainable: PyTree, x: jnp.ndarray) -> jnp.ndarray:
    return model.apply({**frozen, TRAINABLE: trainable}, x, train=False)

  return apply_fn


def make_train_apply_fn(model: nn.Module, frozen: Mapping[str, Any]
                        ) -> Callable[..., tuple[jnp.ndarray, dict]]:
  """Training-mode forward pass: batch statistics in BatchNorm, running stats updated.

  Running statistics change every step, so they are an argument of the returned function
  (defaulting to the ones in `frozen`) rather than a closed-over constant: a training loop
  passes the previous step's `new_batch_stats` back in, and a jitted step does not
  recompile when they change.

  Args:
    model: a model from `get_model`.
    frozen: the second output of `split`.

  Returns:
    `train_apply_fn(trainable, x, batch_stats=None) -> (logits [n, C], new_batch_stats)`.
    `batch_stats=None` uses `frozen["batch_stats"]`. Models without BatchNorm (ViTs) return
    `new_batch_stats = {}`. Pure and jit-able.
  """
  frozen = _as_dict(frozen)
  if TRAINABLE in frozen:
    raise ValueError(
        f"make_train_apply_fn(): `frozen` contains the {TRAINABLE!r} collection; pass "
        f"split()'s second output.")
  default_stats = frozen.get(BATCH_STATS)

  def train_apply_fn(trainable: PyTree, x: jnp.ndarray,
                     batch_stats: Optional[PyTree] = None) -> tuple[jnp.ndarray, dict]:
    variables = {**frozen, TRAINABLE: trainable}
    stats = default_stats if batch_stats is None else batch_stats
    if stats is not None:
      variables[BATCH_STATS] = stats
    logits, updates = model.apply(variables, x, train=True, mutable=[BATCH_STATS])
    return logits, updates.get(BATCH_STATS, {})

  return train_apply_fn


def init_variables(model: nn.Module, image_shape, seed: int) -> dict:
  """The model's variables at init for one input shape [H, W, 3], as host (numpy) arrays."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(seed), x)))


def fresh_head(trainable: PyTree, model: nn.Module, image_shape, seed: int) -> PyTree:
  """The trainable collection with the model's head freshly initialised (one per task)."""
  if "head" not in trainable:
    raise ValueError(f"the trainable collection has no 'head' (keys: {sorted(trainable)})")
  return {**trainable, "head": init_variables(model, image_shape, seed)[TRAINABLE]["head"]}


def head_inputs(model: nn.Module, variables: dict, x) -> tuple[Optional[jnp.ndarray],
                                                              jnp.ndarray]:
  """(what the model's top-level submodule named "head" receives [n, ...], the logits [n, C])
  of one inference-mode forward pass, captured with `flax.linen.intercept_methods` while the
  model runs unchanged (no model needs a features method); (None, logits) when the model
  calls no such submodule. The head's input is the representation the classifier sees: the
  pooled penultimate features of the CNNs, the class token of the ViTs."""
  seen = []

  def grab(next_fun, args, kwargs, context):
    scope = getattr(context.module, "scope", None)
    if (not seen and context.method_name == "__call__" and scope is not None
        and tuple(scope.path) == ("head",)):
      seen.append(args[0] if args else next(iter(kwargs.values())))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    logits = model.apply(variables, x, train=False)
  return (seen[0] if seen else None), logits
