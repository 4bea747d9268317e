"""Bad Teacher: the student (from Full) distils an incompetent teacher on D_f and a competent
one (Full) on part of D_r.

Reference: Chundawat et al., "Can Bad Teaching Induce Forgetting? Unlearning in Deep Networks
Using an Incompetent Teacher" (AAAI 2023), github.com/vikram2000b/bad-teaching-unlearning
(`unlearn.py` `UnlearnerLoss`, `blindspot_unlearner`; `dataset.py` `UnLearningData`).

Data: D_f together with a seeded random `retain_fraction` of D_r, shuffled. Per sample the
target is softmax(teacher/T), the incompetent teacher's for D_f rows and Full's for D_r rows;
the loss is KL(target ‖ softmax(student/T)) averaged over batch × classes (PyTorch's
`kl_div` with its default 'mean' reduction, no T²). The incompetent teacher is a randomly
initialised trainable collection (the model's own init) on the frozen backbone: within the
collection every method acts on, as a random network is in the reference. Defaults (the
reference's): T = 1, Adam lr 1e-4, 1 epoch, retain_fraction 0.3; batch 64 here (256 there).
Config block: `baselines.bad_teacher` (a training group plus `temperature`,
`retain_fraction`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import objectives
from fastntk_jax import train
from fastntk_jax.experiment import methods
from fastntk_jax.experiment.methods import _objectives as obj

_INCOMPETENT_SEED = 50_000  # + run seed: the random teacher's init


def objective(apply, params, batches, h, aux, loss, lead):
  del loss, lead
  batch = batches["mixed"]
  t = h["temperature"]
  log_student = jax.nn.log_softmax(apply(params, batch.x) / t, axis=-1)
  target = jax.nn.softmax(aux["teacher"][batch.y] / t, axis=-1)
  kl = jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-30)) - log_student), axis=-1)
  return objectives.masked_mean(kl, batch) / log_student.shape[-1]


def run(ctx: methods.Context, block) -> methods.Result:
  data = ctx.data
  rng = np.random.default_rng([ctx.seed, 0xBAD])
  n_keep = int(round(float(block.retain_fraction) * data.retain.size))
  keep = np.sort(rng.choice(data.retain.size, n_keep, replace=False))
  x = np.concatenate([data.forget.x, data.retain.x[keep]])
  teacher = np.concatenate([
      obj.random_collection_logits(ctx, data.forget.x, _INCOMPETENT_SEED + ctx.seed),
      obj.logits_of(ctx, ctx.full, data.retain.x[keep])])
  params, seconds = ctx.fit_objective(
      ctx.full, {"mixed": obj.indexed(x)}, objective, train.TrainSpec.from_config(block),
      hparams={"temperature": float(block.temperature)}, aux={"teacher": teacher},
      seed_offset=15)
  return methods.Result(params, seconds, {"retain_rows": int(n_keep)})


def validate(block) -> None:
  name = "baselines.bad_teacher"
  obj.check_objective_group(block, name)
  obj.check_number(block, name, "temperature", low=0.0, low_open=True)
  obj.check_number(block, name, "retain_fraction", low=0.0, high=1.0)
  if block.loss != "ce":
    raise ValueError(f"config.{name}.loss={block.loss!r}: Bad Teacher's loss is the KL "
                     "divergence to its teachers' softmax (the reference's); set loss='ce'")


METHOD = methods.Method(
    name="bad_teacher", label="Bad Teacher", run=run, config_group="baselines.bad_teacher",
    reference="Chundawat et al. AAAI 2023 (vikram2000b/bad-teaching-unlearning)",
    validate=validate,
    search_space=lambda cfg: {"learning_rate": (1e-4, 1e-3, 3e-3, 1e-2),
                              "epochs": (1, 3, 10)})
