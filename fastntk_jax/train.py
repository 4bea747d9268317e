"""Optax training over the trainable collection only, plus evaluation helpers.

One jitted step function per (model, loss, optimiser) does all the work; epochs iterate
fixed-shape, padded batches from `fastntk_jax.data.iterate_batches` so nothing recompiles.

BatchNorm running statistics are handled explicitly by `bn_mode`:
  * "frozen": BN normalises with the given running statistics, which are never updated
    (used for relearning, baselines and probes, which start from a fine-tuned model).
  * "train" (the default for fine-tuning Full/Retrain, as in ordinary fine-tuning): BN
    uses batch statistics and updates the running ones (momentum 0.9); the returned
    `batch_stats` are the updated ones and are what the fine-tuned model is evaluated with.
    The NTK, however, is always taken at w0 with the *pre-trained* statistics (docs/derivation.md
    §1); measured on digits, that combination forgets best (README "Regimes").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastntk_jax.data import batches as batches_lib
from fastntk_jax import enums
from fastntk_jax import faults
from fastntk_jax import workdir as workdir_lib
from fastntk_jax.models.layers import LINEARIZATION_POINT

PyTree = Any

# The allowed values (enums.Loss, enums.Optimizer, enums.BNMode), as strings.
LOSSES = enums.values(enums.Loss)
OPTIMIZERS = enums.values(enums.Optimizer)
BN_MODES = enums.values(enums.BNMode)


def per_example_loss(logits: jnp.ndarray, labels: jnp.ndarray, num_classes: int,
                     loss: str) -> jnp.ndarray:
  """Per-example loss [n].

  "mse" is the loss Eq. (1) is derived for: 0.5·||f(x) - one_hot(y)||² (docs/derivation.md §1).
  "ce" is softmax cross-entropy.
  """
  if loss == "mse":
    return 0.5 * jnp.sum(jnp.square(logits - jax.nn.one_hot(labels, num_classes)), axis=-1)
  if loss == "ce":
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def make_optimizer(name: str, learning_rate, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with momentum or Adam(W); weight decay applies to every trainable leaf.

  `learning_rate` is a float or an optax schedule (`learning_rate_schedule`). SGD's weight
  decay is coupled (added to the gradient, as PyTorch's SGD and the CIFAR recipes); Adam's
  is AdamW's decoupled decay.
  """
  if name == "sgd":
    tx = optax.sgd(learning_rate, momentum=momentum or None)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
  if name == "adam":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How to train: every field is part of the reported protocol."""
  epochs: int
  learning_rate: float
  batch_size: int
  optimizer: str = "sgd"
  momentum: float = 0.9
  weight_decay: float = 0.0
  loss: str = "mse"
  bn_mode: str = "frozen"
  ascent: bool = False  # gradient *ascent* (Max Loss baseline)
  head_only: bool = False  # train only trainable/head (linear probing); the rest stays fixed
  # ½·l2_to_init·‖w - w0‖² added to the mean loss, w0 = the frozen "linearization_point"
  # collection: with l2_to_init = λ/n it is the ridge penalty of the update (linearised mode).
  l2_to_init: float = 0.0
  # Train-time augmentation of every batch (`data.random_crop_flip`): "none" | "crop_flip"
  # (random crop of the zero-padded image + horizontal flip, the CIFAR recipe).
  augment: str = "none"
  # Learning-rate schedule over the steps of the whole fit (`learning_rate_schedule`):
  # "constant" | "cosine" (to 0 at the last step) | "step" (× decay_factor at each epoch of
  # decay_epochs); every schedule starts with a linear warm-up over warmup_epochs.
  schedule: str = "constant"
  warmup_epochs: float = 0.0
  decay_epochs: tuple = ()
  decay_factor: float = 0.1

  @classmethod
  def from_config(cls, group, **overrides) -> "TrainSpec":
    """The spec of a training group of the config (`config.train_group`: epochs,
    learning_rate, batch_size, optimizer, momentum, weight_decay, loss, bn_mode, augment,
    schedule, warmup_epochs, decay_epochs, decay_factor), with `overrides` applied."""
    fields = dict(epochs=int(group.epochs), learning_rate=float(group.learning_rate),
                  batch_size=int(group.batch_size), optimizer=group.optimizer,
                  momentum=float(group.momentum), weight_decay=float(group.weight_decay),
                  loss=group.loss, bn_mode=group.bn_mode, augment=group.augment,
                  schedule=group.schedule, warmup_epochs=float(group.warmup_epochs),
                  decay_epochs=tuple(int(e) for e in group.decay_epochs),
                  decay_factor=float(group.decay_factor))
    fields.update(overrides)
    return cls(**fields)

  def describe(self) -> str:
    extra = ""
    if self.weight_decay:
      extra += f", weight decay {self.weight_decay:g}"
    if self.schedule != "constant" or self.warmup_epochs:
      extra += f", {self.schedule} schedule"
      if self.schedule == "step":
        extra += (f" (x{self.decay_factor:g} at epochs "
                  f"{', '.join(str(e) for e in self.decay_epochs)})")
      if self.warmup_epochs:
        extra += f", {self.warmup_epochs:g} warm-up epoch(s)"
    if self.augment != "none":
      extra += f", augment {self.augment}"
    return (f"{self.optimizer}(lr={self.learning_rate:g}"
            + (f", momentum={self.momentum:g}" if self.optimizer == "sgd" else "")
            + f"), batch {self.batch_size}, {self.loss} loss, BN {self.bn_mode}{extra}")


SCHEDULES = enums.values(enums.Schedule)
AUGMENTATIONS = enums.values(enums.Augment)


def learning_rate_schedule(spec: TrainSpec, steps_per_epoch: int):
  """The learning rate of `spec` per optimiser step: a float (constant, no warm-up) or an
  optax schedule over `spec.epochs * steps_per_epoch` steps.

  Warm-up: linear over the first `warmup_epochs` (in steps: k = warmup_epochs ·
  steps_per_epoch), lr·(t+1)/k at step t < k (no step at rate 0). "cosine": then
  cosine decay from lr to 0 over the remaining steps. "step": then constant, multiplied by
  `decay_factor` from the first step of each epoch in `decay_epochs` (e.g. (80, 120) of 160
  epochs: He et al.'s CIFAR schedule). "constant": then lr.
  """
  if spec.schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {spec.schedule!r}; choose one of {SCHEDULES}")
  lr = float(spec.learning_rate)
  warm = int(round(float(spec.warmup_epochs) * steps_per_epoch))
  total = max(int(spec.epochs) * int(steps_per_epoch), 1)
  if spec.schedule == "constant" and not warm:
    return lr
  if spec.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(lr, decay_steps=max(total - warm, 1))
    after = lambda count: cosine(jnp.maximum(count - warm, 0))
  elif spec.schedule == "step":
    boundaries = {int(e) * int(steps_per_epoch): float(spec.decay_factor)
                  for e in spec.decay_epochs}
    after = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    after = optax.constant_schedule(lr)
  if not warm:
    return after
  # lr·(t+1)/warm at step t < warm: linear, never 0, reaching lr at the last warm-up step.
  return lambda count: jnp.where(count < warm, lr * (count + 1) / warm, after(count))


def make_train_step(model, spec: TrainSpec, num_classes: int,
                    tx: optax.GradientTransformation) -> Callable:
  """Jitted `(trainable, opt_state, batch_stats, frozen, x, y, mask) -> (..., loss)`.

  The frozen weights are an argument, not a closed-over constant, so large backbones are
  not baked into the compiled program.
  """
  stats_key = "batch_stats"

  def loss_fn(trained, batch_stats, frozen, x, y, mask):
    variables = {**frozen, **trained}  # `trained`: {collection name: tree}
    if spec.bn_mode == "train" and batch_stats is not None:
      variables[stats_key] = batch_stats
      logits, updates = model.apply(variables, x, train=True, mutable=[stats_key])
      new_stats = updates[stats_key]
    else:
      if batch_stats is not None:
        variables[stats_key] = batch_stats
      logits = model.apply(variables, x, train=False)
      new_stats = batch_stats
    losses = per_example_loss(logits, y, num_classes, spec.loss)
    mean = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if spec.l2_to_init:
      diff = jax.tree_util.tree_map(jnp.subtract, trained["trainable"], frozen[LINEARIZATION_POINT])
      mean = mean + 0.5 * spec.l2_to_init * sum(jnp.vdot(d, d) for d in jax.tree_util.tree_leaves(diff))
    return (-mean if spec.ascent else mean), (new_stats, mean)

  @jax.jit
  def step(trained, opt_state, batch_stats, frozen, x, y, mask):
    grads, (new_stats, loss) = jax.grad(loss_fn, has_aux=True)(
        trained, batch_stats, frozen, x, y, mask)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, new_stats, loss

  return step


@functools.lru_cache(maxsize=64)
def _cached_step(model, spec: TrainSpec, num_classes: int, steps_per_epoch: int = 0):
  """One optimiser and compiled step per (model, protocol): reused across fits and seeds.

  `steps_per_epoch` only matters for a learning-rate schedule (0 for a constant rate, so
  fits of any size share one step)."""
  tx = make_optimizer(spec.optimizer, learning_rate_schedule(spec, steps_per_epoch),
                      momentum=spec.momentum, weight_decay=spec.weight_decay)
  if spec.head_only:
    # multi_transform with set_to_zero really freezes the other leaves (optax.masked would
    # pass their raw gradients through).
    def labels(tree):
      return {col: {k: jax.tree_util.tree_map(lambda _: "train" if k == "head" else "freeze", v)
                    for k, v in sub.items()} for col, sub in tree.items()}
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, make_train_step(model, spec, num_classes, tx)


def fit(model, trainable: PyTree, frozen: dict, split, spec: TrainSpec, num_classes: int, *,
        seed: int, progress: Optional[Callable[[int, float], None]] = None,
        stop_below: Optional[float] = None, checkpoint_path: Optional[str] = None,
        tag: str = "", mesh=None) -> tuple[PyTree, Optional[PyTree], list[float]]:
  """Trains the trainable collection (only) on `split` for `spec.epochs` epochs.

  Args:
    model: Flax module from `fastntk_jax.models.get_model`.
    trainable: initial trainable collection.
    frozen: the other collections (`params`, `batch_stats`), from `trainable.split`.
    split: (x, y) numpy arrays.
    spec: the training protocol.
    num_classes: C.
    seed: seeds the batch order.
    progress: called with (epoch, mean loss) after every epoch.
    stop_below: stop early once an epoch's mean loss is below this (relearn time).
    checkpoint_path: periodic training-state checkpoint (see `fit_collections`).
    tag: names this stage for progress and fault injection.
    mesh: a `sharding.make_data_mesh()` mesh: each batch is split over its devices and the
      step runs data-parallel (same result as one device; batch_size must be a multiple
      of the device count). None: the plain single-device step.

  Returns:
    (trained params, batch_stats after training (None for models without BN),
     per-epoch mean training loss).
  """
  frozen = dict(frozen)
  trained = {"trainable": trainable}
  trained, stats, history = fit_collections(model, trained, frozen, split, spec, num_classes,
                                            seed=seed, progress=progress, stop_below=stop_below,
                                            checkpoint_path=checkpoint_path, tag=tag,
                                            mesh=mesh)
  return trained["trainable"], stats, history


def fit_collections(model, trained: dict, frozen: dict, split, spec: TrainSpec,
                    num_classes: int, *, seed: int,
                    progress: Optional[Callable[[int, float], None]] = None,
                    stop_below: Optional[float] = None,
                    checkpoint_path: Optional[str] = None, checkpoint_every: int = 1,
                    tag: str = "", mesh=None) -> tuple[dict, Optional[PyTree], list]:
  """Like `fit`, but trains every collection in `trained` ({name: tree}); used to pre-train
  a whole backbone (`params` and `trainable` together).

  With `checkpoint_path`, the full training state (params, optimiser state, BN statistics,
  epoch, loss history) is saved atomically every `checkpoint_every` epochs and restored on
  the next call, so a killed run resumes mid-stage; batch order depends only on
  (seed, epoch), so the resumed run is bit-identical to an uninterrupted one.
  """
  frozen = dict(frozen)
  batch_stats = frozen.pop("batch_stats", None)
  tx, step = _fit_step(_cached_step, model, spec, num_classes, split)
  if mesh is not None:
    from fastntk_jax import sharding  # pylint: disable=g-import-not-at-top
    step = sharding.sharded_train_step(step, mesh)
  opt_state = tx.init(trained)
  (trained, opt_state, batch_stats), history = restore_training_state(
      checkpoint_path, (trained, opt_state, batch_stats), spec.epochs, progress)
  first_epoch = len(history)
  # Train-mode BatchNorm takes its statistics over every row of a batch: the last batch then
  # holds only its real rows (no padding), at the cost of one more compiled shape.
  batch_statistics = spec.bn_mode == "train" and batch_stats is not None
  devices = 1 if mesh is None else int(mesh.size)
  for epoch in range(first_epoch, spec.epochs):
    total, count = 0.0, 0.0
    for b in _epoch_batches(split, spec, seed, epoch, batch_statistics):
      if b.x.shape[0] % devices:
        # A mesh splits a batch evenly: the few rows beyond a multiple of the device count
        # wait for a later epoch (the shuffle differs per epoch).
        b = batches_lib.Batch(*(a[:b.x.shape[0] - b.x.shape[0] % devices] for a in b))
        if not b.x.shape[0]:
          continue
      trained, opt_state, batch_stats, loss = step(trained, opt_state, batch_stats,
                                                   frozen, b.x, b.y, b.mask)
      total += float(loss) * float(b.mask.sum())
      count += float(b.mask.sum())
    history.append(total / max(count, 1.0))
    if progress is not None:
      progress(epoch, history[-1])
    if checkpoint_path and ((epoch + 1) % checkpoint_every == 0) and epoch + 1 < spec.epochs:
      save_training_state(checkpoint_path, (trained, opt_state, batch_stats), history, spec.epochs)
    faults.maybe_kill(f"{tag}:epoch{epoch}")
    if stop_below is not None and history[-1] < stop_below:
      break
  return trained, batch_stats, history


_AUGMENT_STREAM = 0xA46  # the random stream of train-time augmentation


def _fit_step(cached: Callable, model, spec: TrainSpec, num_classes: int, split):
  """(optimiser, compiled step) of a fit of `spec` on `split` from `cached` (`_cached_step`
  or `_cached_seeds_step`): a schedule's steps depend on the epochs and on the batches per
  epoch; a constant rate shares one step across fits of any size.

  Raises:
    ValueError: an unknown `spec.augment`.
  """
  if spec.augment not in AUGMENTATIONS:
    raise ValueError(f"unknown augment {spec.augment!r}; choose one of {AUGMENTATIONS}")
  if spec.schedule == "constant" and not spec.warmup_epochs:
    return cached(model, dataclasses.replace(spec, epochs=0), num_classes)
  x, _ = split
  return cached(model, spec, num_classes, batches_lib.num_batches(len(x), spec.batch_size))


def _epoch_batches(split, spec: TrainSpec, seed: int, epoch: int, batch_statistics: bool):
  """The batches of one epoch of a fit seeded `seed`: shuffled by (seed, epoch), augmented
  as `spec.augment` asks (drawn from (seed, epoch, batch), so a resumed fit sees the same
  batches); with train-mode BatchNorm the last batch holds only its real rows."""
  batches = batches_lib.iterate_batches(split, spec.batch_size, seed=seed, epoch=epoch,
                                        remainder="partial" if batch_statistics else "pad")
  for index, b in enumerate(batches):
    if spec.augment == "crop_flip":
      rng = np.random.default_rng([seed, epoch, index, _AUGMENT_STREAM])
      b = batches_lib.Batch(batches_lib.random_crop_flip(b.x, rng), b.y, b.mask)
    yield b


def fit_seeds(model, trainables: PyTree, frozen: dict, split, spec: TrainSpec,
              num_classes: int, *, seeds) -> tuple[PyTree, Optional[PyTree], np.ndarray]:
  """`fit` for S seeds at once: one compiled step vmapped over the seeds (a population).

  Seed k's fit is `fit(model, trainables[k], frozen, split, spec, seed=seeds[k])`: the same
  batch order, augmentation, optimiser and BatchNorm handling, so the result equals S calls
  of `fit` up to the order of float reductions. The frozen collections (the backbone, the
  pre-trained BN statistics) are shared, not copied per seed.

  Args:
    model: the Flax module.
    trainables: the S initial trainable collections, stacked: every leaf [S, ...].
    frozen: the other collections, unstacked and shared by every seed (its `batch_stats`
      are every seed's starting statistics).
    split: (x, y) numpy arrays.
    spec: the training protocol (no mesh: a population chunk runs on one device).
    num_classes: C.
    seeds: the S seeds (batch order and augmentation of each).

  Returns:
    (trained params [S, ...], batch_stats [S, ...] after training (None without BN),
     per-epoch mean training loss [S, epochs]).
  """
  seeds = [int(s) for s in seeds]
  sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(trainables)}
  if sizes != {len(seeds)}:
    raise ValueError(f"fit_seeds: the trainable leaves are stacked over {sorted(sizes)} "
                     f"seeds, but {len(seeds)} seeds were given")
  frozen = dict(frozen)
  batch_stats = frozen.pop("batch_stats", None)
  tx, step = _fit_step(_cached_seeds_step, model, spec, num_classes, split)
  trained = {"trainable": trainables}
  opt_state = jax.vmap(tx.init)(trained)
  if batch_stats is not None:  # each seed starts from the same statistics
    batch_stats = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (len(seeds),) + np.shape(a)), batch_stats)
  batch_statistics = spec.bn_mode == "train" and batch_stats is not None
  history = np.zeros((len(seeds), spec.epochs))
  for epoch in range(spec.epochs):
    total, count = 0.0, 0.0
    # Every seed has as many batches of the same shapes (one split): zip and stack them.
    for bs in zip(*(_epoch_batches(split, spec, s, epoch, batch_statistics) for s in seeds)):
      x, y, mask = (np.stack(a) for a in zip(*bs))
      trained, opt_state, batch_stats, loss = step(trained, opt_state, batch_stats, frozen,
                                                   x, y, mask)
      weight = mask.sum(axis=1)
      total = total + np.asarray(loss, np.float64) * weight
      count = count + weight
    history[:, epoch] = total / np.maximum(count, 1.0)
  return trained["trainable"], batch_stats, history


def step_memory_bytes(model, spec: TrainSpec, num_classes: int, trainable: PyTree,
                      frozen: dict, batch_shape: tuple) -> Optional[int]:
  """Bytes one training step of `spec` holds beyond its inputs (temporaries and outputs:
  the batch's activations and gradients), by XLA's own count after compiling it; None when
  the backend does not report it.

  Args:
    model: the Flax module.
    spec: the training protocol (its schedule does not change the count).
    num_classes: C.
    trainable: the trainable collection (one seed's, unstacked).
    frozen: the other collections (with `batch_stats` for a model with BatchNorm).
    batch_shape: (batch, H, W, C) of one batch of images.

  Returns:
    XLA's temp_size + output_size of the compiled step, in bytes; None when the backend
    does not report it. The arguments (weights, optimiser state, batch) are not counted.

  Raises:
    Whatever compiling the step raises (a trainable or frozen tree the model does not take).
  """
  # The step's own optimiser (head_only's masks it): the state it takes.
  tx, step = _cached_step(model, dataclasses.replace(spec, epochs=0, schedule="constant",
                                                     warmup_epochs=0.0), num_classes)
  frozen = dict(frozen)
  stats = frozen.pop("batch_stats", None)
  trained = {"trainable": trainable}
  n = int(batch_shape[0])
  compiled = step.lower(trained, tx.init(trained), stats, frozen,
                        jnp.zeros(batch_shape, jnp.float32), jnp.zeros((n,), jnp.int32),
                        jnp.ones((n,), jnp.float32)).compile()
  try:  # only the count may be missing: a step that does not compile is an error
    memory = compiled.memory_analysis()
    return int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    return None


@functools.lru_cache(maxsize=16)
def _cached_seeds_step(model, spec: TrainSpec, num_classes: int, steps_per_epoch: int = 0):
  """`_cached_step`'s optimiser and step, vmapped over seeds (the frozen weights shared)."""
  tx, step = _cached_step(model, spec, num_classes, steps_per_epoch)
  batched = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, 0, 0, 0)))
  return tx, batched


def restore_training_state(checkpoint_path: Optional[str], state, epochs: int,
             progress: Optional[Callable[[int, float], None]]) -> tuple[Any, list]:
  """The training state and per-epoch history saved by `save_training_state` at `checkpoint_path`, or
  (`state`, []) when there is none; `progress` is replayed for the restored epochs."""
  if not checkpoint_path:
    return state, []
  template = {"state": state, "epoch": 0, "history": np.zeros(epochs, np.float64)}
  saved = workdir_lib.load_state(checkpoint_path, template)
  if saved is None:
    return state, []
  history = [float(h) for h in np.asarray(saved["history"])[:int(saved["epoch"])]]
  for e, h in enumerate(history):
    if progress is not None:
      progress(e, h)
  return saved["state"], history


def save_training_state(checkpoint_path: str, state, history: list, epochs: int) -> None:
  """Saves a training state after `len(history)` epochs, atomically (`restore_training_state` reads it)."""
  padded = np.zeros(epochs, np.float64)
  padded[:len(history)] = history
  workdir_lib.save_state(checkpoint_path, {"state": state, "epoch": len(history),
                                           "history": padded})


@functools.partial(jax.jit, static_argnums=0)
def _infer(model, variables, x):
  return model.apply(variables, x, train=False)


def predict(model, trainable: PyTree, frozen: dict, x: np.ndarray,
            batch_size: int = 256) -> np.ndarray:
  """Logits [n, C] in inference mode, in fixed-size padded batches (one compile)."""
  variables = {**frozen, "trainable": trainable}
  out = []
  for b in batches_lib.iterate_batches((x, np.zeros(x.shape[0], np.int32)), batch_size,
                                    shuffle=False):
    out.append(np.asarray(_infer(model, variables, b.x))[b.mask > 0])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Optional[float]:
  """Top-1 accuracy in %; None for an empty split."""
  if len(labels) == 0:
    return None
  return float(100.0 * np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels)))
