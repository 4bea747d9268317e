"""Everything that can refuse a run, before any work and before its workdir is touched
(`prepare`), and the run's data by seed: every config field, each plug-in's block, the
pretrained file, the data (loaded), a forget set that repeats or shares a sample, a model
that does not build on the data's images, a solver the damping rule excludes, and the batch
sizes under data parallelism."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from fastntk_jax import config as config_lib
from fastntk_jax import models
from fastntk_jax import pretrained_files
from fastntk_jax import sharding
from fastntk_jax.data import splits as data_splits
from fastntk_jax.experiment import methods as methods_lib
from fastntk_jax.models import trainable as tr

log = logging.getLogger(__name__)


POPULATION_SEED_BASE = config_lib.POPULATION_SEED_BASE


def data_mesh(cfg) -> Optional[Any]:
  """All devices (of all processes) on one "data" axis, or None with a single device.

  Every training batch is split evenly over the devices (no padding: padded rows would
  change BatchNorm's batch statistics), so each batch size must be a multiple of the
  device count; a config that is not is refused here, naming the field.
  """
  n = jax.device_count()
  if n == 1:
    return None
  for group in config_lib.train_groups(cfg):
    node = config_lib.node(cfg, group)
    if node.batch_size % n:
      raise ValueError(f"config.{group}.batch_size={node.batch_size} must be a multiple of "
                       f"the {n} devices to split batches over them")
  log.info("data-parallel over %d devices (%d processes)", n, jax.process_count())
  return sharding.make_data_mesh()


def data_for_seed(cfg, data, seed: int):
  """The data of run seed `seed`: `data` itself, or with data.draw_per_seed its own draw of
  classes, forget classes and images (data seed `data.seed + seed`)."""
  if not cfg.data.draw_per_seed or seed == 0:
    return data
  seed_data = data_splits.load_unlearning_data(cfg.data, seed=cfg.data.seed + seed)
  log.info("data of seed %d: %s", seed, seed_data.describe())
  return seed_data


def data_draw(data) -> dict:
  """What a run's data is made of: classes (dataset ids, names), forget classes, counts."""
  return {"seed": int(data.config.seed), "classes": list(data.dataset_classes),
          "class_names": list(data.class_names), "forget_classes": list(data.forget_classes),
          "counts": data.counts()}


def _preflight(cfg, model, data) -> None:
  """What can be refused from shapes alone, before the workdir is touched: a model whose
  options do not build (its variables are traced abstractly at the data's image size), and
  a solver the damping rule excludes for this p and n·C."""
  from fastntk_jax.unlearn import validate  # pylint: disable=g-import-not-at-top
  shape = jax.ShapeDtypeStruct((1,) + tuple(data.image_shape), np.float32)
  try:
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), shape)
  except Exception as e:  # pylint: disable=broad-except  # any failure to build is the options'
    raise ValueError(f"config.model: {cfg.model.name} with options "
                     f"{dict(cfg.model.options)} does not build on {data.image_shape} "
                     f"images: {type(e).__name__}: {e}") from None
  p = tr.count_params(tr.split(dict(variables))[0])
  n, c = data.train.size, data.num_classes
  try:
    validate.allowed_solvers(validate.parse(validate.Solver, cfg.unlearn.solver, name="solver"),
                             float(cfg.unlearn.damping), num_params=p, num_outputs=n * c,
                             cg_budget=0, cg_dim=0)
  except ValueError as e:
    raise ValueError(f"config.unlearn.damping={cfg.unlearn.damping}, unlearn.solver="
                     f"{cfg.unlearn.solver!r}: {e}") from None


def _check_forget_set(cfg, data) -> None:
  """A forget set with a repeated sample, or one the retain set also holds, is refused now
  (as the Forgetter would after training): Retrain on D_r would still have seen it."""
  from fastntk_jax.unlearn import validate  # pylint: disable=g-import-not-at-top
  try:
    validate.check_disjoint((data.retain.x, data.retain.y), (data.forget.x, data.forget.y),
                            tolerance=float(cfg.unlearn.duplicate_tolerance))
  except ValueError as e:
    raise ValueError(f"config.data (forget classes {list(data.forget_classes)}): {e} "
                     "(unlearn.duplicate_tolerance sets what counts as the same sample)") from None


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A run checked before any work (`prepare`): the validated config, its data, model,
  method plug-ins and mesh."""
  cfg: ml_collections.ConfigDict
  data: Any
  model: Any
  plugins: tuple
  mesh: Any


def prepare(cfg: ml_collections.ConfigDict) -> Prepared:
  """Everything that can refuse a run, before any work and before the workdir is touched:
  every config field (`config.validate`, each method's block), the model's options, the data
  (loaded: a dataset not prepared is refused here), a model that does not build on the data's
  images, a solver the damping rule excludes, the batch sizes under data parallelism.

  Raises:
    ValueError: naming the field, the value and what is allowed.
  """
  cfg = config_lib.validate(cfg)
  pretrained_files.check(cfg)
  plugins = methods_lib.checked_plugins(cfg)
  # The model's options are checked before the data load (minutes for ImageNet-R): an
  # unknown option is refused by get_model, whatever the number of classes.
  models.get_model(cfg.model.name, 2, **dict(cfg.model.options))
  data = data_splits.load_unlearning_data(cfg.data)
  _check_forget_set(cfg, data)
  model = models.get_model(cfg.model.name, data.num_classes, **dict(cfg.model.options))
  _preflight(cfg, model, data)
  return Prepared(cfg=cfg, data=data, model=model, plugins=plugins, mesh=data_mesh(cfg))
