"""Pieces the objective-based plug-ins share: distillation losses, index streams, teachers.

A stream of `objectives.fit_objective` carries (x, row index) when an objective needs more per
example than one label (a teacher's logits, a true label beside a random one): the batch's
`y` then indexes tables passed as `aux`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.models import trainable as tr
from fastntk_jax.unlearn import linear


def lead_loss(apply, params, batches, h, aux, loss, lead):
  """The objective of plain training: the mean loss of the batch of the stream in pass."""
  del h, aux
  batch = batches[lead]
  return objectives.masked_mean_loss(apply(params, batch.x), batch.y, batch, loss)


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
