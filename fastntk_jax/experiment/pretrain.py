"""The backbone every method starts from (`pretrain_stage`): trained on the task data's own
pre-training split, or on another dataset (the paper: CIFAR-100 for its CIFAR-10 CNNs) with
its accuracy on that dataset's test split and a cache that shares one pre-training between
every run that needs the same backbone; or loaded (a ViT `.npz`, a PyTorch state dict, a
checkpoint); or random.

A backbone trained here keeps the BatchNorm running statistics training left (the EMA,
`pretrain.batch_stats="running"`) or, with `"recompute"`, statistics recomputed in one
train-mode pass over the pre-training images (`settle_batch_stats`, before anything is
saved); the test accuracy with both is recorded either way, and a warning names the knob when
the recomputed ones score clearly higher (the EMA of a short pre-training can be stale).

The cache (`load_or_train`, config `pretrain.cache_dir`) is content-addressed: an entry's
name ends in the SHA-256 of the pre-training config (`cache_key`: model and its options,
dataset, #images per class, image size, normalisation, data seed, the whole training recipe,
the init seed, `pretrain.batch_stats` unless "running", and `CACHE_VERSION`), so every seed
and every config (#IPC 100 or 500, ...) with the same backbone finds the same entry, and a
change of recipe gets a new one. An entry holds:

  <cache_dir>/<model>_<dataset>_<key[:16]>/
    key.json        the pre-training config the key hashes (checked on every hit)
    variables/      the pre-trained model on the pre-training dataset, its own head included,
                    its BatchNorm statistics as `pretrain.batch_stats` asks (orbax; atomic)
    info.json       test accuracy (with the running and the recomputed BatchNorm statistics
                    too), recipe, loss, seconds (written after variables/)
    train.partial   the training state while training (resumable, removed when complete)
    lock            a file lock (fcntl.flock): one run trains, the others wait for it; the
                    kernel releases it if the trainer dies, and the next one resumes from
                    train.partial (the processes of one multi-host run train together and
                    take no lock)

"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from fastntk_jax import batch_stats as bn_stats
from fastntk_jax import models
from fastntk_jax import train as train_lib
from fastntk_jax import workdir as wd
from fastntk_jax.data import schema
from fastntk_jax.data import splits
from fastntk_jax.models import checkpoints
from fastntk_jax.models import trainable as tr

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the pre-training code changes what a key produces
INIT_SEED = 10_001  # the backbone's init and batch-order seed (as before the cache)
RECOMPUTE_SEED = 0  # shuffles the pre-training images into the recompute pass's batches
# pretrain.batch_stats="running" warns when the recomputed statistics score this many
# points of test accuracy more.
STALE_STATS_POINTS = 5.0
_INFO = "info.json"
_KEY = "key.json"
_VARIABLES = "variables"


def _plain(value: Any) -> Any:
  """ConfigDicts, tuples and numpy scalars as JSON-ready plain data (for the key)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def pretrain_data_config(cfg, image_size: int, normalization: str):
  """The data config of the pre-training dataset: every class, `pretrain.images_per_class`
  training images per class (None: all), the dataset's default hold-out (CIFAR: the whole
  test split), at the task's image size and normalisation."""
  pre = schema.default_data_config()
  pre.update(dict(
      name=cfg.pretrain.dataset, data_dir=cfg.data.data_dir, manual_dir=cfg.data.manual_dir,
      image_size=int(image_size), normalization=normalization,
      images_per_class=cfg.pretrain.images_per_class, pretrain_per_class=0,
      forget_classes=[0], seed=cfg.data.seed))
  return pre


def cache_key(cfg, image_size: int, normalization: str) -> tuple[dict, str]:
  """(the pre-training config that determines the backbone, its SHA-256 hex digest).

  Nothing about the task (its dataset, #IPC, classes, seeds, fine-tuning, unlearning) enters,
  nor where the data lives (`data_dir`), so every run needing this backbone shares it."""
  key = {
      "version": CACHE_VERSION,
      "model": cfg.model.name,
      # Resolved, so that spelling out a default option keys the same backbone.
      "model_options": _plain(models.architecture(cfg.model.name,
                                                  **_plain(cfg.model.options))),
      "dataset": cfg.pretrain.dataset,
      "images_per_class": cfg.pretrain.images_per_class,
      "image_size": int(image_size),
      "normalization": normalization,
      "data_seed": int(cfg.data.seed),
      "train": _plain(cfg.pretrain.train),
      "init_seed": INIT_SEED,
  }
  # Only when not the default: the keys (and cache entries) of "running" backbones stay
  # those of before the knob, and a "recompute" backbone never hits a "running" one's entry.
  if cfg.pretrain.batch_stats != "running":
    key["batch_stats"] = cfg.pretrain.batch_stats
  text = json.dumps(key, sort_keys=True)
  return key, hashlib.sha256(text.encode()).hexdigest()


def _split_variables(variables: dict) -> tuple[dict, dict]:
  trainable = variables["trainable"]
  frozen = {k: v for k, v in variables.items() if k != "trainable"}
  return trainable, frozen


def accuracy(model, variables: dict, split, batch_size: int) -> Optional[float]:
  """Top-1 accuracy (%) of a full variables dict on a `Split` (inference-mode BN)."""
  trainable, frozen = _split_variables(variables)
  logits = train_lib.predict(model, trainable, frozen, split.x, batch_size=batch_size)
  return train_lib.accuracy(logits, split.y)


def settle_batch_stats(cfg, model, variables: dict, train_x, test, batch_size: int,
                       eval_batch_size: int) -> tuple[dict, dict]:
  """The BatchNorm running statistics a freshly pre-trained backbone keeps.

  Recomputes them from the pre-training images alone (`batch_stats.recompute_batch_stats`,
  one train-mode pass in batches of the pre-training's `batch_size`, shuffled by
  `RECOMPUTE_SEED`), evaluates the test split with the running (EMA) and the recomputed ones,
  and keeps the ones `cfg.pretrain.batch_stats` names ("running" | "recompute"). With
  "running", a warning names the knob when the recomputed ones score `STALE_STATS_POINTS` or
  more above them. A model without `batch_stats` is returned as it is, with its test accuracy
  alone.

  Args:
    cfg: the run's config. model: the pre-trained model. variables: its variables (with
      `trainable`). train_x: the pre-training images. test: the `Split` it is evaluated on.
    batch_size: the pre-training's. eval_batch_size: the evaluation's.

  Returns:
    (the variables with the statistics kept, the info entries: `test_accuracy` (with the kept
    statistics) and, with `batch_stats`, `batch_stats` (the mode),
    `test_accuracy_running_stats` and `test_accuracy_recomputed_stats`).
  """
  if "batch_stats" not in variables:
    return variables, {"test_accuracy": accuracy(model, variables, test, eval_batch_size)}
  mode = cfg.pretrain.batch_stats
  trainable, frozen = _split_variables(variables)
  try:
    stats = bn_stats.recompute_batch_stats(model, trainable, frozen, train_x,
                                           batch_size=batch_size, seed=RECOMPUTE_SEED)
  except ValueError as e:  # e.g. statistics no train-mode pass moves (BN frozen in training)
    if mode == "recompute":
      raise ValueError(f"pretrain.batch_stats='recompute': {e}") from e
    log.warning("the pre-trained backbone's BatchNorm statistics cannot be recomputed (%s); "
                "keeping the running ones", e)
    running_acc = accuracy(model, variables, test, eval_batch_size)
    return variables, {"batch_stats": mode, "test_accuracy": running_acc,
                       "test_accuracy_running_stats": running_acc,
                       "test_accuracy_recomputed_stats": None}
  recomputed = {**variables, "batch_stats": stats}
  running_acc = accuracy(model, variables, test, eval_batch_size)
  recomputed_acc = accuracy(model, recomputed, test, eval_batch_size)
  info = {"batch_stats": mode, "test_accuracy_running_stats": running_acc,
          "test_accuracy_recomputed_stats": recomputed_acc}
  if mode == "recompute":
    return recomputed, {**info, "test_accuracy": recomputed_acc}
  if (running_acc is not None and recomputed_acc is not None
      and recomputed_acc - running_acc >= STALE_STATS_POINTS):
    log.warning("the pre-trained backbone's BatchNorm running statistics look stale: test "
                "accuracy %.2f%% with them, %.2f%% with them recomputed on the %d pre-training "
                "images; set pretrain.batch_stats='recompute' to keep the recomputed ones",
                running_acc, recomputed_acc, len(train_x))
  return variables, {**info, "test_accuracy": running_acc}


def _abstract_variables(model, image_shape) -> dict:
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.float32)
  return dict(jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(INIT_SEED), x), x))


def pretrain_model(cfg):
  """The architecture of the task with the pre-training dataset's head (all its classes)."""
  num_classes = schema.NUM_DATASET_CLASSES[cfg.pretrain.dataset]
  return models.get_model(cfg.model.name, num_classes, **dict(cfg.model.options))


def train_backbone(cfg, spec, image_size: int, normalization: str, *,
                   progress: Optional[Callable[[int, float], None]] = None,
                   checkpoint_path: Optional[str] = None, eval_batch_size: int = 256,
                   mesh=None) -> tuple[dict, dict]:
  """Trains the task's architecture on `cfg.pretrain.dataset` (its own head) with `spec`,
  then evaluates it on that dataset's test split (keeping the BatchNorm statistics
  `cfg.pretrain.batch_stats` asks for: `settle_batch_stats`).

  Args:
    cfg: the experiment config (model, pretrain.*, data.data_dir/manual_dir/seed).
    spec: the `train.TrainSpec` of `cfg.pretrain.train`.
    image_size, normalization: the task's (the backbone must see images as the task will).
    progress: per-epoch callback (epoch, loss).
    checkpoint_path: the resumable training state (a killed pre-training resumes).
    eval_batch_size: inference batch of the evaluation.
    mesh: data-parallel mesh or None.

  Returns:
    (variables of the pre-trained model with its own head, info dict: dataset, recipe,
    #classes, #train/#test images, final training loss, test accuracy, seconds and, for a
    model with BatchNorm, `batch_stats` and the test accuracy with either statistics).
  """
  start = time.perf_counter()
  pre_data = splits.load_unlearning_data(pretrain_data_config(cfg, image_size, normalization))
  model = pretrain_model(cfg)
  init = tr.init_variables(model, pre_data.image_shape, INIT_SEED)
  trained = {"params": init["params"], "trainable": init["trainable"]}
  frozen = {k: v for k, v in init.items() if k not in trained}
  train = pre_data.train
  trained, stats, history = train_lib.fit_collections(
      model, trained, frozen, train, spec, pre_data.num_classes, seed=INIT_SEED,
      progress=progress, checkpoint_path=checkpoint_path,
      tag=f"pretrain/{cfg.pretrain.dataset}", mesh=mesh)
  variables = {**frozen, **trained}
  if stats is not None:
    variables["batch_stats"] = stats
  variables = jax.tree_util.tree_map(np.asarray, variables)
  test = pre_data.test
  variables, settled = settle_batch_stats(cfg, model, variables, train.x, test, spec.batch_size,
                                          eval_batch_size)
  test_acc = settled.pop("test_accuracy")
  info = {
      "source": "train",
      "dataset": cfg.pretrain.dataset,
      "num_classes": int(pre_data.num_classes),
      "train_images": int(train.size),
      "test_split": test.source,
      "test_images": int(test.size),
      "test_accuracy": test_acc,
      "final_train_loss": float(history[-1]) if history else None,
      "epochs": int(spec.epochs),
      "recipe": spec.describe(),
      **settled,  # batch_stats and the test accuracy with either statistics
      "seconds": time.perf_counter() - start,
  }
  log.info("pre-trained %s on %s (%d images, %s): test accuracy %.2f%% on %s (%d images)",
           cfg.model.name, cfg.pretrain.dataset, train.size, spec.describe(),
           -1.0 if test_acc is None else test_acc, test.source, test.size)
  return variables, info


def transfer(pretrained: dict, init: dict) -> dict:
  """The task's variables: everything of the pre-trained model but its head (which has the
  pre-training dataset's classes); the task's fresh head from `init`."""
  variables = dict(init)
  variables["params"] = pretrained["params"]
  variables["trainable"] = {**pretrained["trainable"], "head": init["trainable"]["head"]}
  if "batch_stats" in pretrained:
    variables["batch_stats"] = pretrained["batch_stats"]
  return variables


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive fcntl.flock on `path` (released by the kernel if the holder dies).

  On a filesystem that does not support flock (Lustre mounted without `-o flock`, some NFS
  setups: ENOSYS, ENOLCK, EINVAL, ...) it warns and holds no lock: the runs sharing the
  cache must then not pre-train at the same time (launch/sweep.py's SLURM backend starts the
  other jobs of a network after the first)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: another run holds it
      log.info("waiting for another run pre-training into %s", os.path.dirname(path))
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:  # no flock on this filesystem: no one holds it, nothing to wait for
      log.warning("cannot lock %s (%s): using the pre-training cache without the lock; runs "
                  "sharing it must not pre-train the same backbone at the same time", path, e)
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def entry_dir(cfg, cache_dir: str, image_size: int, normalization: str) -> tuple[str, dict]:
  """(the cache entry folder of this config's backbone, the key it hashes)."""
  key, digest = cache_key(cfg, image_size, normalization)
  name = f"{cfg.model.name}_{cfg.pretrain.dataset}_{digest[:16]}"
  return os.path.join(os.path.abspath(cache_dir), name), {**key, "sha256": digest}


def load_or_train(cfg, spec, image_size: int, normalization: str, cache_dir: str, *,
                  progress: Optional[Callable[[int, float], None]] = None,
                  eval_batch_size: int = 256, mesh=None) -> tuple[dict, dict, dict]:
  """The pre-trained backbone of `cfg` from the cache, training it there first if missing.

  Returns:
    (variables of the pre-trained model with its own head, its info (as
    `train_backbone`), {"cache_entry", "cache_hit"}).

  Raises:
    ValueError: the entry's key.json differs from this config's key (a hash collision or
      a hand-edited cache).
  """
  entry, key = entry_dir(cfg, cache_dir, image_size, normalization)
  os.makedirs(entry, exist_ok=True)
  variables_path = os.path.join(entry, _VARIABLES)
  info_path = os.path.join(entry, _INFO)
  key_path = os.path.join(entry, _KEY)
  # The processes of one multi-host run train together (their steps are collectives): a
  # lock that let one of them in would deadlock it. They all train and write the same
  # files, as they do in a shared workdir (BUILD.md); the lock serialises separate runs.
  lock = (contextlib.nullcontext() if jax.process_count() > 1
          else _file_lock(os.path.join(entry, "lock")))
  with lock:
    if os.path.exists(key_path):
      with open(key_path) as f:
        stored = json.load(f)
      if stored != json.loads(json.dumps(key)):
        raise ValueError(f"pre-training cache entry {entry} holds another config's backbone "
                         f"(its {_KEY} differs); remove that folder")
    else:
      wd.atomic_write_json(key_path, key)
    hit = os.path.isdir(variables_path) and os.path.exists(info_path)
    if hit:
      with open(info_path) as f:
        info = json.load(f)
      model = pretrain_model(cfg)
      target = _abstract_variables(model, (image_size, image_size, 3))
      variables = checkpoints.restore_checkpoint(variables_path, target)
      log.info("pre-trained backbone from the cache: %s (test accuracy %s%% on %s)", entry,
               info.get("test_accuracy"), info.get("test_split"))
    else:
      partial = os.path.join(entry, "train.partial")
      variables, info = train_backbone(cfg, spec, image_size, normalization,
                                       progress=progress, checkpoint_path=partial,
                                       eval_batch_size=eval_batch_size, mesh=mesh)
      checkpoints.save_checkpoint(variables_path, variables, overwrite=True)
      wd.atomic_write_json(info_path, info)  # last: an entry is complete once it exists
      if os.path.exists(partial):
        os.remove(partial)
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  return variables, info, {"cache_entry": entry, "cache_hit": hit}


PRETRAIN_INFO = "pretrain.json"


def pretrain_stage(cfg, model, data, workdir: str, progress, mesh=None) -> dict:
  """The backbone every method starts from: trained here or in the shared cache, loaded, or
  random. What it is (and, when trained, its test accuracy, with both BatchNorm statistics
  where it has them: `settle_batch_stats`, which also replaces the running ones by recomputed
  ones with `pretrain.batch_stats="recompute"`) goes to `pretrain.json` (`pretrain_info`),
  written before the checkpoint, so a resumed run still reports it and keeps the statistics.

  Args:
    cfg: the run's config. model: the task's model. data: the task's `UnlearningData`.
    workdir: the run's folder. progress: `experiment.progress.Progress`. mesh: or None.

  Returns:
    The variables of the task's model (host arrays), its head fresh.
  """
  path = os.path.join(workdir, "pretrain")
  info_path = os.path.join(workdir, PRETRAIN_INFO)
  init = tr.init_variables(model, data.image_shape, seed=10_000)
  if os.path.isdir(path):  # host arrays, as below (not committed to one device)
    return jax.tree_util.tree_map(np.asarray, checkpoints.restore_checkpoint(path, init))
  source = cfg.pretrain.source
  info = {"source": source}
  if source == "train" and cfg.pretrain.dataset:
    spec = train_lib.TrainSpec.from_config(cfg.pretrain.train)
    size, norm = data.image_shape[0], data.config.normalization
    epochs = progress.epochs(f"pretrain/{cfg.pretrain.dataset}", spec.epochs)
    if cfg.pretrain.cache_dir:
      pre_vars, info, cache = load_or_train(
          cfg, spec, size, norm, cfg.pretrain.cache_dir, progress=epochs,
          eval_batch_size=cfg.eval.batch_size, mesh=mesh)
      info = {**info, **cache}
    else:
      pre_vars, info = train_backbone(
          cfg, spec, size, norm, progress=epochs, checkpoint_path=path + ".partial",
          eval_batch_size=cfg.eval.batch_size, mesh=mesh)
    info["cache_key"] = cache_key(cfg, size, norm)[1]
    variables = transfer(pre_vars, init)
  elif source == "train":
    if data.pretrain is None or data.pretrain.size == 0:
      raise ValueError("config.pretrain.source='train' but the data has no pretrain split; set "
                       "data.pretrain_per_class > 0 or use pretrain.source='npz'/'checkpoint'")
    start = time.perf_counter()
    spec = train_lib.TrainSpec.from_config(cfg.pretrain.train)
    trained = {"params": init["params"], "trainable": init["trainable"]}
    frozen = {k: v for k, v in init.items() if k not in trained}
    trained, stats, history = train_lib.fit_collections(
        model, trained, frozen, data.pretrain, spec, data.num_classes, seed=10_000,
        progress=progress.epochs("pretrain", spec.epochs),
        checkpoint_path=os.path.join(workdir, "pretrain.partial"), tag="pretrain", mesh=mesh)
    variables = {**frozen, **trained}
    if stats is not None:
      variables["batch_stats"] = stats
    test = data.test  # the task's hold-out: same classes, same head
    variables, settled = settle_batch_stats(cfg, model, variables, data.pretrain.x, test,
                                            spec.batch_size, cfg.eval.batch_size)
    info.update(dataset=f"{data.config.name} (pretrain split)", train_images=data.pretrain.size,
                test_split=f"{test.source} (hold-out)", test_images=test.size,
                **settled, final_train_loss=float(history[-1]) if history else None,
                epochs=spec.epochs, recipe=spec.describe(),
                seconds=time.perf_counter() - start)
  elif source == "npz":
    loaded = {}
    variables = checkpoints.load_vit_npz(cfg.pretrain.path, init,
                                         dont_load=tuple(cfg.pretrain.dont_load), report=loaded)
    info.update(path=cfg.pretrain.path, **loaded)
  elif source == "state_dict":
    from fastntk_jax.models import torch_import  # pylint: disable=g-import-not-at-top
    variables = torch_import.load_state_dict(cfg.model.name, cfg.pretrain.path, init,
                                             dont_load=tuple(cfg.pretrain.dont_load),
                                             model=model)
    info["path"] = cfg.pretrain.path
  elif source == "checkpoint":
    variables = checkpoints.restore_checkpoint(cfg.pretrain.path, init)
    info["path"] = cfg.pretrain.path
  else:  # "none": a randomly initialised backbone
    variables = init
  if info.get("test_accuracy") is not None:
    log.info("pre-trained backbone: test accuracy %.2f%% on %s (%d images)",
             info["test_accuracy"], info["test_split"], info["test_images"])
  wd.atomic_write_json(info_path, info)
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  checkpoints.save_checkpoint(path, variables, overwrite=True)
  if os.path.exists(path + ".partial"):
    os.remove(path + ".partial")
  return variables


def pretrain_info(workdir: str) -> dict:
  """What `pretrain_stage` recorded about the backbone ({} for a workdir from before it did)."""
  path = os.path.join(workdir, PRETRAIN_INFO)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


