"""Pieces the objective-based plug-ins share: distillation losses, index streams, teachers.

A stream of `objectives.fit_objective` carries (x, row index) when an objective needs more per
example than one label (a teacher's logits, a true label beside a random one): the batch's
`y` then indexes tables passed as `aux`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.models import trainable as tr
from fastntk_jax.unlearn import linear


def check_objective_group(block, group: str) -> None:
  """Refuses what `objectives.fit_objective` does not train with, naming the field: a
  learning-rate schedule or warm-up, BatchNorm in train mode, augmentation."""
  for field, allowed in (("schedule", "constant"), ("bn_mode", "frozen"), ("augment", "none")):
    if block[field] != allowed:
      raise ValueError(f"config.{group}.{field}={block[field]!r}: the method plug-ins train "
                       "the collection at a constant learning rate with BatchNorm frozen and "
                       f"no augmentation; set {field}={allowed!r}")
  if block.warmup_epochs:
    raise ValueError(f"config.{group}.warmup_epochs={block.warmup_epochs!r}: the method "
                     "plug-ins train at a constant learning rate; set warmup_epochs=0")


def check_number(block, group: str, field: str, *, low: float = -math.inf,
                 high: float = math.inf, low_open: bool = False, integer: bool = False) -> None:
  """Refuses a field that is not a finite number in [low, high] ((low, high] with
  `low_open`), or not an int with `integer`, naming it."""
  v = block[field]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
      (v > low if low_open else v >= low) and v <= high) and (not integer or isinstance(v, int))
  if not ok:
    bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"config.{group}.{field}={v!r} must be a finite "
                     f"{'int' if integer else 'number'} in {bound}")


lead_loss = objectives.lead_loss  # the objective of plain training


def lead_ascent(apply, params, batches, h, aux, loss, lead):
  """Gradient ascent on the stream in pass: minus `lead_loss`."""
  return -lead_loss(apply, params, batches, h, aux, loss, lead)


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy [B] (what the references' gradients are of)."""
  return train.per_example_loss(logits, labels, logits.shape[-1], "ce")


def per_example_gradients(ctx, params, split) -> np.ndarray:
  """The cross-entropy gradient of each example of `split` at `params` over the trainable
  collection, [n, p] float32 (`objectives.per_example_gradients`), through the table of a
  linearised network where it fits (`unlearn.linear.tabulated_gradients`)."""
  x, y = split.x, split.y
  rows = linear.tabulated_gradients(ctx.net, params, ctx.frozen, x, y, cross_entropy)
  if rows is None:
    rows = objectives.per_example_gradients(ctx.net, params, ctx.frozen, (x, y), loss="ce")
  return rows


def indexed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A stream over `x` whose labels are the row indices (into `aux` tables)."""
  return x, np.arange(len(x), dtype=np.int32)


def distillation_kl(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                    temperature) -> jnp.ndarray:
  """Per-example KL(p_teacher ‖ p_student) of the softmaxes at `temperature` T, times T²
  (Hinton et al.; SCRUB's `DistillKL`): [B]."""
  log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * temperature ** 2


def logits_of(ctx, params, x: np.ndarray) -> np.ndarray:
  """`ctx.net`'s logits of `x` at `params` with Full's frozen collections: [n, C] float32."""
  return train.predict(ctx.net, params, ctx.frozen, x).astype(np.float32)


def random_collection_logits(ctx, x: np.ndarray, seed: int) -> np.ndarray:
  """The logits of a randomly initialised trainable collection (the model's own init, seeded)
  on the frozen backbone, the network itself (not its linearisation): an incompetent teacher
  within the collection every method acts on. [n, C] float32."""
  model = getattr(ctx.net, "model", ctx.net)  # `unlearn.linear.Linearized` wraps the model
  init = tr.init_variables(model, ctx.data.image_shape, seed)
  frozen = {k: v for k, v in ctx.frozen.items() if k != tr.LINEARIZATION_POINT}
  return train.predict(model, init[tr.TRAINABLE], frozen, x).astype(np.float32)


def flat_params(params) -> np.ndarray:
  """The trainable collection flattened (`ravel_pytree` order), float64."""
  return np.concatenate([np.ravel(np.asarray(l, np.float64))
                         for l in jax.tree_util.tree_leaves(params)])


def unflatten_like(params, flat: np.ndarray):
  """`flat` (ravel order) back into the structure and dtypes of `params`."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.size(leaf))
    out.append(np.asarray(flat[start:start + size], np.asarray(leaf).dtype).reshape(np.shape(leaf)))
    start += size
  return jax.tree_util.tree_unflatten(treedef, out)
