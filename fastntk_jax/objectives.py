"""Training the trainable collection on an objective over several data streams (the
unlearning methods' losses: NegGrad+, SCRUB, SalUn, Bad Teacher, ...), and the per-example
gradients the influence- and importance-based methods (IU, SSD, SalUn's saliency) are built
from. The plain protocol (`train.fit`) is the one-stream case (tests/test_comparison.py)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax import faults
from fastntk_jax import train
from fastntk_jax.data import batches as batches_lib

PyTree = Any


# An objective: `(apply, params, batches, hparams, aux, loss, lead) -> scalar`, with
# `apply(params, x) -> logits` (the model in inference mode at the run's frozen collections),
# `batches` {stream name: Batch}, `hparams` {name: traced float} (with "epoch_fraction" =
# epoch / epochs added by the trainer), `aux` a pytree of arrays the objective reads (e.g. a
# teacher's logits or the labels, the batch's `y` then indexing them), `loss` the spec's loss
# kind and `lead` the name of the stream the current pass goes over (static).
Objective = Callable[..., jnp.ndarray]


def masked_mean(values: jnp.ndarray, batch) -> jnp.ndarray:
  """The mean of per-example `values` [B] over a batch's real rows (`Batch.mask`)."""
  return jnp.sum(values * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)


def masked_mean_loss(logits: jnp.ndarray, labels: jnp.ndarray, batch, loss: str) -> jnp.ndarray:
  """The mean per-example `loss` of `logits` against `labels` over a batch's real rows."""
  return masked_mean(train.per_example_loss(logits, labels, logits.shape[-1], loss), batch)


@functools.lru_cache(maxsize=64)
def _objective_step(model, objective: Objective, loss: str, optimizer: str, momentum: float,
                    weight_decay: float):
  """One optimiser and compiled step per (model, objective, protocol), the learning rate a
  hyper-parameter of the optimiser state, so that fits at other rates (a tuning grid) reuse
  the compiled step."""
  tx = optax.inject_hyperparams(
      lambda learning_rate: train.make_optimizer(optimizer, learning_rate, momentum=momentum,
                                           weight_decay=weight_decay))(learning_rate=1.0)

  @functools.partial(jax.jit, static_argnames="lead")
  def step(params, opt_state, frozen, batches, hparams, aux, grad_mask, *, lead):
    apply = lambda p, x: model.apply({**frozen, "trainable": p}, x, train=False)
    value, grads = jax.value_and_grad(
        lambda p: objective(apply, p, batches, hparams, aux, loss, lead))(params)
    masked = lambda tree: tree if grad_mask is None else jax.tree_util.tree_map(
        lambda g, m: g * m.astype(g.dtype), tree, grad_mask)
    updates, opt_state = tx.update(masked(grads), opt_state, params)
    return optax.apply_updates(params, masked(updates)), opt_state, value

  return tx, step


def fit_objective(model, trainable: PyTree, frozen: dict, streams: dict, objective: Objective,
                  spec: train.TrainSpec, *, seed: int, hparams: Optional[dict] = None,
                  aux: Any = None, grad_mask: Optional[PyTree] = None,
                  batch_sizes: Optional[dict] = None,
                  passes: Optional[Callable[[int], Sequence[str]]] = None,
                  progress: Optional[Callable[[int, float], None]] = None,
                  checkpoint_path: Optional[str] = None,
                  tag: str = "",
                  on_epoch: Optional[Callable[[int, PyTree], None]] = None
                  ) -> tuple[PyTree, list[float]]:
  """Minimises `objective` over the trainable collection (only), on several data streams.

  The unlearning methods whose loss mixes D_r and D_f (NegGrad+, SCRUB, SalUn, Bad Teacher,
  ...) are each an objective. An epoch is one pass over each stream `passes(epoch)` names,
  in order (default: the first stream); during a pass the other streams give one batch per
  step each, cycling through their own shuffles. One optimiser state runs through every
  pass, on one device (no data-parallel mesh). BatchNorm normalises with the frozen running
  statistics (inference mode), so every
  method changes only the trainable collection. (The harness passes a linearised model
  tabulated on the streams' inputs, `unlearn.linear.tabulated_streams`, when it fits.)

  Args:
    model: the Flax model (or `unlearn.linear.Linearized`).
    trainable: the start.
    frozen: the other collections.
    streams: {name: (x, y) or `epoch -> (x, y)`} (a callable for data drawn anew each epoch,
      e.g. random labels); none may be empty.
    objective: see `Objective`; a module-level function, so its compiled step is reused.
    spec: epochs, learning_rate, batch_size, optimizer, momentum, weight_decay and loss of
      the fit (a constant learning rate; BatchNorm frozen).
    seed: seeds the batch orders.
    hparams: {name: float} the objective reads (traced: other values reuse the step).
    aux: arrays the objective reads (a teacher's logits, labels).
    grad_mask: a 0/1 tree like `trainable` (SalUn's saliency mask): the gradient and the
      update are multiplied by it, so entries at 0 stay exactly where they are (weight decay
      included), as the SalUn reference's current code restores its masked-out weights.
    batch_sizes: {stream name: rows per batch}, for streams other than spec.batch_size.
    passes: `epoch -> stream names` (e.g. SCRUB's max pass over D_f in the first epochs).
    progress, checkpoint_path, tag: as for `train.fit_collections`.
    on_epoch: `(epoch, params)` after each epoch trained here (not the restored ones), e.g.
      to measure the model along the way.

  Returns:
    (trained params, per-epoch mean objective).

  Raises:
    FloatingPointError: the objective is not finite (the message names the epoch).
  """
  what = tag or "fit_objective"
  if spec.schedule != "constant" or spec.warmup_epochs or spec.bn_mode != "frozen" or (
      spec.augment != "none"):
    raise ValueError(f"{what}: an objective trains at a constant learning rate with BatchNorm "
                     "frozen and no augmentation (schedule='constant', warmup_epochs=0, "
                     "bn_mode='frozen', augment='none')")
  if spec.ascent or spec.head_only or spec.l2_to_init:
    raise ValueError(f"{what}: an objective states ascent, frozen leaves (grad_mask) and "
                     "penalties itself; the spec's ascent, head_only and l2_to_init must be off")
  if not streams:
    raise ValueError(f"{what}: needs at least one data stream")
  names = list(streams)
  unknown = set(batch_sizes or {}) - set(names)
  if unknown:
    raise ValueError(f"{what}: batch_sizes names {sorted(unknown)}, not streams {names}")
  sizes = {name: int((batch_sizes or {}).get(name, spec.batch_size)) for name in names}
  passes = passes or (lambda epoch: (names[0],))
  tx, step = _objective_step(model, objective, spec.loss, spec.optimizer, float(spec.momentum),
                             float(spec.weight_decay))
  opt_state = tx.init(trainable)
  lr = opt_state.hyperparams["learning_rate"]
  opt_state.hyperparams["learning_rate"] = jnp.asarray(spec.learning_rate, lr.dtype)
  (trainable, opt_state), history = train.restore_training_state(
      checkpoint_path, (trainable, opt_state), spec.epochs, progress)
  for epoch in range(len(history), spec.epochs):
    h = {k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()}
    h["epoch_fraction"] = jnp.asarray(epoch / spec.epochs, jnp.float32)
    data = {name: (s(epoch) if callable(s) else s) for name, s in streams.items()}
    epoch_batches = {}
    for i, name in enumerate(names):
      if len(data[name][0]) == 0:
        raise ValueError(f"{what}: the stream {name!r} is empty")
      epoch_batches[name] = list(batches_lib.iterate_batches(
          data[name], sizes[name], seed=seed + 7919 * i, epoch=epoch))
    total, steps = 0.0, 0
    leads = tuple(passes(epoch))
    if not leads or set(leads) - set(names):
      raise ValueError(f"{what}: passes({epoch}) = {leads!r} must name one or more of the "
                       f"streams {names}")
    for lead in leads:
      for index, b in enumerate(epoch_batches[lead]):
        batches = {name: (b if name == lead else
                          epoch_batches[name][index % len(epoch_batches[name])])
                   for name in names}
        trainable, opt_state, value = step(trainable, opt_state, frozen, batches, h, aux,
                                           grad_mask, lead=lead)
        total, steps = total + float(value), steps + 1
    history.append(total / max(steps, 1))
    if not np.isfinite(history[-1]):
      raise FloatingPointError(f"{what}: the objective became {history[-1]} in epoch "
                               f"{epoch + 1}; lower the learning rate")
    if progress is not None:
      progress(epoch, history[-1])
    if on_epoch is not None:
      on_epoch(epoch, trainable)
    if checkpoint_path and epoch + 1 < spec.epochs:
      train.save_training_state(checkpoint_path, (trainable, opt_state), history, spec.epochs)
    faults.maybe_kill(f"{tag}:epoch{epoch}")
  return trainable, history


@functools.lru_cache(maxsize=16)
def _gradient_fns(model, loss: str):
  def example_loss(params, frozen, x, y):
    logits = model.apply({**frozen, "trainable": params}, x[None], train=False)
    return train.per_example_loss(logits, y[None], logits.shape[-1], loss)[0]

  def flat(tree):
    return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(tree)])

  @jax.jit
  def per_example(params, frozen, x, y, mask):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, None, 0, 0))(params, frozen, x, y)
    rows = jax.vmap(flat)(grads)
    return rows * mask[:, None].astype(rows.dtype)
  return per_example


def per_example_gradients(model, trainable: PyTree, frozen: dict, split, *, loss: str,
                          batch_size: int = 64) -> np.ndarray:
  """The gradient of each example's `loss` over the trainable collection, flattened in
  `jax.flatten_util.ravel_pytree`'s order: [n, p] float32, rows in the split's order
  (BatchNorm in inference mode). Influence-style methods (IU's Fisher, SSD's and SalUn's
  importances) are built from these."""
  x, y = split
  per_example = _gradient_fns(model, loss)
  out = []
  for b in batches_lib.iterate_batches((x, y), batch_size, shuffle=False):
    rows = np.asarray(per_example(trainable, frozen, b.x, b.y, b.mask))
    out.append(rows[b.mask > 0])
  p = sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(trainable))
  return np.concatenate(out).astype(np.float32) if out else np.zeros((0, p), np.float32)


def lead_loss(apply, params, batches, h, aux, loss, lead):
  """The objective of plain training: the mean loss of the batch of the stream in pass."""
  del h, aux
  batch = batches[lead]
  return masked_mean_loss(apply(params, batch.x), batch.y, batch, loss)
